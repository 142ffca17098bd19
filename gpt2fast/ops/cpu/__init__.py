"""CPU backend: the ops as the fastest plain-PyTorch code on CPU tensors, one module per op.

The reference backend is the parity oracle: it computes each op literally (the decode attention over every
cache position, the GELU as its formula, the fused ops one after the other) and stays sync-free on any device.
This backend runs the same math the way CPU kernels (oneDNN / MKL / ATen) run it fastest: fused matmul+bias
(``addmm``) with in-place GELU and residual adds, SDPA for attention, decode attention over the live cache
length only (read on the host: free for CPU tensors) with the append as row copies.  The conformance suite holds
it to the reference like any other backend.  "auto" picks it for CPU tensors only (priority 10: above the
reference, below the kernel backends, which do not run on CPU outside the Triton interpreter).
"""

from __future__ import annotations

import importlib
import pkgutil

import torch

from gpt2fast.ops._registry import register_backend

#: Priority among backends under "auto" (reference is 0, triton 20, cuda 30).
PRIORITY = 10


def is_available(device: torch.device) -> str | None:
    """``None`` for CPU tensors; the kernel backends serve the others."""
    return None if device.type == "cpu" else f"the cpu backend runs CPU tensors only, not {device.type}"


def describe(device: torch.device) -> str:
    """What runs (intra-op threads included: the decode GEMVs are memory-bound and use all of them)."""
    return f"PyTorch CPU kernels ({torch.get_num_threads()} threads), tuned for decode"


register_backend("cpu", priority=PRIORITY, is_available=is_available, auto_devices=("cpu",), describe=describe)
for _mod in pkgutil.iter_modules(__path__):
    if not _mod.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_mod.name}")
