"""LayerNorm, optionally fused with the residual add, through ``_C.layer_norm`` (``csrc/layer_norm.cu``).

The kernel reads rows of ``x`` (and ``residual``) through one row stride each, so any [..., N] tensor that views
as [rows, N] runs without a copy; ``weight`` and ``bias`` must be contiguous.  It uses 128-bit loads when N,
the row strides and the pointers allow it, scalar loads otherwise.
"""

from __future__ import annotations

import torch

from gpt2fast.ops._registry import register_impl
from gpt2fast.ops.cuda import _ext
from gpt2fast.ops.specs import layer_norm as spec
from gpt2fast.ops.specs import layer_norm_backward as backward_spec

#: Longest row the kernel takes (its int32 column math).
MAX_N = 2**30


def size_reason(rows: int, n: int) -> str | None:
    """The kernel's limits: N <= 2**30; a grid of ceil(rows / 4) blocks (N <= 256) or one block per row."""
    if n > MAX_N:
        return f"cuda backend: layer_norm rows must have N <= 2**30 elements, got {n}"
    limit = _ext.INT32_MAX if n > 256 else 4 * _ext.INT32_MAX
    if rows > limit:
        return f"cuda backend: layer_norm over {rows} rows of {n} exceeds the grid limit ({limit} rows)"
    return None


def supports(x, weight, bias, eps, residual) -> str | None:
    """Rows of ``x``/``residual`` with one row stride each, contiguous ``weight``/``bias``, sizes within the grid
    and an ``eps`` that fp32 represents."""
    n = x.shape[-1]
    return (
        _ext.dtype_reason("x", x)
        or _ext.rows_reason("x", x)
        or size_reason(x.numel() // n, n)
        or (None if residual is None else _ext.rows_reason("residual", residual))
        or _ext.contiguous_1d_reason("weight", weight)
        or _ext.contiguous_1d_reason("bias", bias)
        or _ext.fp32_param_reason("eps", float(eps))
    )


def _run(x, weight, bias, eps: float, residual) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Check the device, allocate ``y`` (and ``h`` with a residual), launch; returns ``(y, h)``."""
    device = _ext.check_device(x=x, weight=weight, bias=bias, residual=residual)
    x2, xs = _ext.rows_view("x", x)
    r2, rs = (None, 0) if residual is None else _ext.rows_view("residual", residual)
    y = _ext.new_like(x)
    h = None if residual is None else _ext.new_like(x)
    tensors = dict(x=x2, residual=r2, weight=weight, bias=bias, y=y, h=h)
    rows, n = x2.shape
    _ext.launch("layer_norm", device, x, tensors, x_row_stride=xs, residual_row_stride=rs, rows=rows, n=n, eps=eps)
    return y, h


@torch.library.custom_op("gpt2fast::cuda_layer_norm", mutates_args=())
def layer_norm_op(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float) -> torch.Tensor:
    """LN(x) over the last dim (contiguous output)."""
    return _run(x, weight, bias, eps, None)[0]


@layer_norm_op.register_fake
def _(x, weight, bias, eps):
    return _ext.new_like(x)


@torch.library.custom_op("gpt2fast::cuda_layer_norm_residual", mutates_args=())
def layer_norm_residual_op(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float, residual: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(LN(x + residual), x + residual)`` in one kernel (contiguous outputs)."""
    return _run(x, weight, bias, eps, residual)


@layer_norm_residual_op.register_fake
def _(x, weight, bias, eps, residual):
    return _ext.new_like(x), _ext.new_like(x)


backward_spec.register_autograd(layer_norm_op, layer_norm_residual_op, "cuda")

#: The registered implementation: ``LN(x)``, or ``(LN(x + residual), x + residual)`` in one kernel; differentiable
#: (its backward: ``layer_norm_backward`` on cuda, csrc/layer_norm_backward.cu; rows wider than 4096 fall through).
layer_norm = register_impl("layer_norm", "cuda", supports=supports, differentiable=True)(
    spec.plain_or_fused(layer_norm_op, layer_norm_residual_op)
)
