"""Triton backend: fused LayerNorm(+residual), bias+GELU, FlashAttention-2 style causal attention and
flash-decoding with in-launch KV append, one module per op (each registers its implementation).

Each op is registered with ``torch.library.custom_op`` (namespace ``gpt2fast_triton``) with a fake
implementation, so ``torch.compile`` traces through it and CUDA graphs capture it; the decode op declares
that it mutates the caches.  The shared checks already ran (``gpt2fast.ops.specs``); each module's
``supports`` adds only its own (head dims, int32-indexable strides, row widths), before any launch.

Kernels autotune on the GPU unless ``GPT2FAST_AUTOTUNE=0`` (then a fixed heuristic config is used); the
configs of both, pruned per GPU generation so none spills registers, are in ``_tuning``.  On CPU
they run only under Triton's interpreter (``TRITON_INTERPRET=1``, tests); "auto" picks this backend for CUDA
tensors only, naming it runs it wherever it is available.
"""

from __future__ import annotations

import importlib
import os
import pkgutil

import torch

from gpt2fast.ops._registry import register_backend

#: Priority among backends under "auto" (cuda is 30, reference 0).
PRIORITY = 20

try:
    import triton

    from gpt2fast.ops.triton._common import interpreting

    _IMPORT_ERROR: str | None = None
except ImportError as exc:  # triton missing or too old: the backend reports why, gpt2fast still imports
    _IMPORT_ERROR = f"{type(exc).__name__}: {exc}"


def is_available(device: torch.device) -> str | None:
    """``None`` when the Triton kernels can run on ``device`` tensors, else why not."""
    if _IMPORT_ERROR is not None:
        return f"triton is not importable ({_IMPORT_ERROR}); install it with pip install 'gpt2fast[triton]'"
    version = f"triton {triton.__version__}"
    if device.type == "cuda":
        if interpreting():
            return f"{version}: TRITON_INTERPRET=1 is set, so the kernels run interpreted (CPU tensors only)"
        if not torch.cuda.is_available():
            return f"{version}: torch sees no CUDA device"
        major, minor = torch.cuda.get_device_capability(device)
        if major < 8:
            return f"{version}: {torch.cuda.get_device_name(device)} is sm_{major}{minor}; the kernels need sm_80+"
        return None
    if device.type == "cpu":
        if interpreting():
            return None
        hint = "set TRITON_INTERPRET=1 before importing gpt2fast to run them interpreted (slow, for tests)"
        if os.environ.get("TRITON_INTERPRET") == "1":
            hint = "TRITON_INTERPRET=1 was set only after triton/gpt2fast were imported; set it before"
        return f"{version} kernels run on CUDA tensors; for CPU tensors {hint}"
    return f"{version}: no Triton target for {device.type} tensors"


def describe(device: torch.device) -> str:
    """What runs on ``device`` (where :func:`is_available` says it can)."""
    if device.type == "cpu":
        return f"triton {triton.__version__} interpreter on CPU (TRITON_INTERPRET=1): correct but very slow, for tests"
    major, minor = torch.cuda.get_device_capability(device)
    return f"triton {triton.__version__} on {torch.cuda.get_device_name(device)} (sm_{major}{minor})"


register_backend("triton", priority=PRIORITY, is_available=is_available, auto_devices=("cuda",), describe=describe)
if _IMPORT_ERROR is None:
    for _mod in pkgutil.iter_modules(__path__):
        if not _mod.name.startswith("_"):
            importlib.import_module(f"{__name__}.{_mod.name}")
