"""Build script: the Python package always; the CUDA extension ``gpt2fast._C`` only when nvcc is found."""

from setuptools import setup

setup()
