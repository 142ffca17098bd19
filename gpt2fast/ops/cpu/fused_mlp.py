"""``fused_mlp`` on CPU: LayerNorm, c_fc + bias (one BLAS call), GELU in place, c_proj + bias, residual in place."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from gpt2fast.ops._registry import register_impl
from gpt2fast.ops.cpu._common import gelu_, linear


@register_impl("fused_mlp", "cpu", differentiable=True)
def fused_mlp(x, ln_weight, ln_bias, eps, fc_weight, fc_bias, proj_weight, proj_bias) -> torch.Tensor:
    """``x + c_proj(gelu(c_fc(LN(x))))`` (out of place when a gradient is needed)."""
    a = linear(F.layer_norm(x, (x.shape[-1],), ln_weight, ln_bias, eps), fc_weight, fc_bias)
    if torch.is_grad_enabled() and a.requires_grad:
        return x + linear(F.gelu(a, approximate="tanh"), proj_weight, proj_bias)
    return linear(gelu_(a), proj_weight, proj_bias).add_(x)
