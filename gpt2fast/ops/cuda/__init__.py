"""CUDA C++ backend: the kernels in ``csrc/`` through the pybind11 module ``gpt2fast._C``, one module per op
(each registers its implementation).

``gpt2fast._C`` has no PyTorch headers, so it builds against any torch: each kernel takes one named parameter
struct (``_C.LayerNormParams``, ...) of device pointers (ints), element strides, sizes, the CUDA stream and
the device.  :mod:`._ext` is the one place that loads the extension, probes the device and fills those structs;
each op module (``layer_norm.py``, ``bias_gelu.py``, ``attention.py``, ``decode_attention.py``):

* declares what it supports (strides, head dims, sizes) as a metadata-only ``supports`` predicate that returns
  ``None`` or the reason, so "auto" falls through on inputs the kernels cannot take and a named call raises the
  reason before any launch (the shared checks already ran, in ``gpt2fast.ops.specs``);
* registers a ``torch.library.custom_op`` (namespace ``gpt2fast``) with a fake implementation, so
  ``torch.compile`` traces through it and CUDA graphs capture it (decode attention declares that it mutates the
  caches).  The custom op checks the device and the 16-byte alignment of the data pointers on the real tensors,
  allocates the outputs, and launches under the tensors' device on its current stream.

Adding an op is adding one module here: every module without a leading underscore is imported below.
"""

from __future__ import annotations

import importlib
import pkgutil

import torch

from gpt2fast.ops._registry import register_backend
from gpt2fast.ops.cuda import _ext
from gpt2fast.ops.cuda._ext import CudaBackendError

__all__ = ["PRIORITY", "CudaBackendError", "describe", "is_available"]

#: Priority among backends under "auto" (triton is 20, reference 0).
PRIORITY = 30


def is_available(device: torch.device) -> str | None:
    """``None`` when the CUDA kernels can run tensors on ``device``, else why not (extension not built, no usable
    CUDA runtime, not a CUDA device)."""
    return _ext.unavailable_reason(device)


def describe(device: torch.device) -> str:
    """What runs on ``device`` (where :func:`is_available` says it can)."""
    major, minor = torch.cuda.get_device_capability(device)
    return f"gpt2fast._C CUDA kernels on {torch.cuda.get_device_name(device)} (sm_{major}{minor})"


register_backend("cuda", priority=PRIORITY, is_available=is_available, describe=describe)
for _mod in pkgutil.iter_modules(__path__):
    if not _mod.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_mod.name}")
