"""Backend parameters shared by the tests, read from the registry (no test keeps its own list of backends)."""

from __future__ import annotations

import pytest
import torch

from gpt2fast import ops

#: Where the kernels run in this session: the GPU when there is one, else the CPU (Triton interpreted).
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def backend_param(name: str, marks=(), device: str = DEVICE):
    """A ``pytest.param`` for backend ``name`` that skips, with the reason, where it is unavailable."""
    status = ops.backend_status(name, device)
    skip = pytest.mark.skipif(not status.available, reason=f"{name} unavailable: {status.reason}")
    return pytest.param(name, marks=[skip, *marks], id=name)


def backend_params(op: str, reference: bool = True, device: str = DEVICE) -> list:
    """A :func:`backend_param` for every backend that implements ``op`` (``reference`` too unless False)."""
    names = [r.backend for r in ops.implementations(device) if r.op == op]
    return [backend_param(n, device=device) for n in names if reference or n != ops.REFERENCE]


def auto_backend(op: str, device: str = "cpu", *, grad: bool = False, skip: str = "") -> str:
    """The backend "auto" runs ``op`` on for ``device`` tensors (a call needing gradients: the first
    differentiable one), passing over backends whose names start with ``skip`` (e.g. a test's toy backends)."""
    from gpt2fast.ops._registry import candidates

    impls = candidates(op, ops.AUTO, torch.device(device))
    return next(
        i.backend for i in impls if not (skip and i.backend.startswith(skip)) and (i.differentiable or not grad)
    )
