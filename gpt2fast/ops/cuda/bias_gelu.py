"""``gelu_tanh(x + bias)`` through ``_C.bias_gelu`` (``csrc/bias_gelu.cu``), computed in fp32.

Rows of ``x`` are read through one row stride (a column slice of a wider tensor runs without a copy); ``bias``
must be contiguous.  128-bit loads when N, the row stride and the pointers allow it, scalar loads otherwise.
"""

from __future__ import annotations

import torch

from gpt2fast.ops._registry import register_impl
from gpt2fast.ops.cuda import _ext
from gpt2fast.ops.specs import bias_gelu_backward as backward_spec


def supports(x: torch.Tensor, bias: torch.Tensor) -> str | None:
    """Rows of ``x`` with one row stride and a contiguous ``bias``."""
    return _ext.dtype_reason("x", x) or _ext.rows_reason("x", x) or _ext.contiguous_1d_reason("bias", bias)


@torch.library.custom_op("gpt2fast::cuda_bias_gelu", mutates_args=())
def bias_gelu_op(x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """gelu_tanh(x + bias) (contiguous output)."""
    device = _ext.check_device(x=x, bias=bias)
    x2, xs = _ext.rows_view("x", x)
    y = _ext.new_like(x)
    tensors = dict(x=x2, bias=bias, y=y)
    _ext.launch("bias_gelu", device, x, tensors, x_row_stride=xs, rows=x2.shape[0], n=x2.shape[1])
    return y


@bias_gelu_op.register_fake
def _(x, bias):
    return _ext.new_like(x)


backward_spec.register_autograd(bias_gelu_op, "cuda")

#: The registered implementation (the custom op itself); differentiable (its backward: ``bias_gelu_backward``).
bias_gelu = register_impl("bias_gelu", "cuda", supports=supports, differentiable=True)(bias_gelu_op)
