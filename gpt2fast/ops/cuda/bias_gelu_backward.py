"""The backward of ``gelu_tanh(x + bias)`` through ``_C.bias_gelu_backward`` (``csrc/bias_gelu_backward.cu``).

Rows of ``grad_y`` and ``x`` are read through one row stride each; ``bias`` must be contiguous.  The partial
``dbias`` sums go to an fp32 workspace of one row per row group, summed by a second kernel: no atomics.
"""

from __future__ import annotations

import torch

from gpt2fast.ops._registry import register_impl
from gpt2fast.ops.cuda import _ext
from gpt2fast.ops.cuda.layer_norm_backward import rows


def supports(grad_y: torch.Tensor, x: torch.Tensor, bias: torch.Tensor) -> str | None:
    """Rows of ``x`` with one row stride and a contiguous ``bias`` (``grad_y`` in another layout is copied)."""
    return _ext.dtype_reason("x", x) or _ext.rows_reason("x", x) or _ext.contiguous_1d_reason("bias", bias)


@torch.library.custom_op("gpt2fast::cuda_bias_gelu_backward", mutates_args=())
def bias_gelu_backward_op(
    grad_y: torch.Tensor, x: torch.Tensor, bias: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(dx, dbias)`` (contiguous dx)."""
    device = _ext.check_device(grad_y=grad_y, x=x, bias=bias)
    g2, gs = _ext.rows_view("grad_y", grad_y)
    x2, xs = _ext.rows_view("x", x)
    rows, n = x2.shape
    dx, dbias = _ext.new_like(x), _ext.new_like(bias)
    programs = _ext.partial_programs(rows, device)
    partial = torch.empty((programs, n), dtype=torch.float32, device=x.device)
    tensors = dict(grad_y=g2, x=x2, bias=bias, dx=dx, dbias=dbias, partial=partial)
    _ext.launch("bias_gelu_backward", device, x, tensors, grad_y_row_stride=gs, x_row_stride=xs,
                programs=programs, rows=rows, n=n)  # fmt: skip
    return dx, dbias


@bias_gelu_backward_op.register_fake
def _(grad_y, x, bias):
    return _ext.new_like(x), _ext.new_like(bias)


@register_impl("bias_gelu_backward", "cuda", supports=supports)
def bias_gelu_backward(grad_y: torch.Tensor, x: torch.Tensor, bias: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(dx, dbias)``; a ``grad_y`` that does not view as rows (an expanded gradient) is copied first."""
    return tuple(bias_gelu_backward_op(rows(grad_y), x, bias))
