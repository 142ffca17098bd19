"""Backend parameters shared by the parity, stress and determinism tests."""

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
