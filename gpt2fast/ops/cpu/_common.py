"""What the CPU backend's ops share: the matmul layout choice and the in-place GELU."""

from __future__ import annotations

import torch
import torch.nn.functional as F

#: From this many rows on, ``y = (W @ x.T).T`` beats ``F.linear`` (``x @ W.T``) on CPU for [N, K] weights
#: (measured: benchmarks/results/, see :func:`linear`).
WT_FROM_ROWS = 2


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``x @ weight.T + bias`` for ``x`` [M, K], ``weight`` [N, K]; a new contiguous [M, N] tensor.

    One row is a GEMV either way (``F.linear``).  For several rows the BLAS call is fastest with the weight as
    the left, row-major operand: ``weight @ x.T`` (an [N, M] product, bias added by ``addmm`` as a column),
    transposed back with a copy of the small output.
    """
    if x.shape[0] < WT_FROM_ROWS or weight.stride(1) != 1:
        return F.linear(x, weight, bias)
    y = torch.mm(weight, x.t()) if bias is None else torch.addmm(bias[:, None], weight, x.t())
    return y.t().contiguous()


def gelu_(y: torch.Tensor) -> torch.Tensor:
    """GPT-2's tanh GELU of ``y``, in place (ATen's fused kernel, not the formula's chain of ops)."""
    return torch.ops.aten.gelu_(y, approximate="tanh")
