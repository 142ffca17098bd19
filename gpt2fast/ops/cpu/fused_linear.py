"""``fused_linear`` on CPU: ``F.layer_norm``, one BLAS call with the bias fused, the GELU and the residual in place."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from gpt2fast.ops._registry import register_impl
from gpt2fast.ops.cpu._common import gelu_, linear


@register_impl("fused_linear", "cpu", differentiable=True)
def fused_linear(x, weight, bias, ln_weight, ln_bias, eps, gelu, residual) -> torch.Tensor:
    """``[residual +] gelu?(LN?(x) @ weight.T + bias)``: in-place epilogue on the fresh product (unless a
    gradient is needed, where in-place ops on it would be wrong to autograd's eyes: then out of place)."""
    h = x if ln_weight is None else F.layer_norm(x, (x.shape[-1],), ln_weight, ln_bias, eps)
    y = linear(h, weight, bias)
    inplace = not (torch.is_grad_enabled() and y.requires_grad)
    if gelu:
        y = gelu_(y) if inplace else F.gelu(y, approximate="tanh")
    if residual is not None:
        y = y.add_(residual) if inplace else y + residual
    return y
