"""``attention`` on CPU: ``F.scaled_dot_product_attention`` (ATen's CPU flash attention: no T x T matrix)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from gpt2fast.ops._registry import register_impl


@register_impl("attention", "cpu", differentiable=True)
def attention(q, k, v, causal, scale) -> torch.Tensor:
    """softmax(q·kᵀ·scale [+ causal mask])·v over ``[B, H, T, D]``."""
    return F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale)
