"""``bias_gelu`` on CPU: the bias add, then ATen's fused tanh GELU in place (one pass instead of the formula's)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from gpt2fast.ops._registry import register_impl
from gpt2fast.ops.cpu._common import gelu_


@register_impl("bias_gelu", "cpu", differentiable=True)
def bias_gelu(x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """``gelu_tanh(x + bias)``."""
    u = x + bias
    if torch.is_grad_enabled() and u.requires_grad:
        return F.gelu(u, approximate="tanh")
    return gelu_(u)
