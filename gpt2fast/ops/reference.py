"""Reference backend: plain PyTorch, any device, computed in the input dtype.

This is the parity oracle.  Run on fp32 inputs it gives the fp32 reference; run
on fp16/bf16 inputs it gives "what PyTorch itself gets in that dtype", the
baseline of the FlashAttention tolerance rule (see :mod:`gpt2fast.testing`).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def is_available(device: torch.device) -> tuple[bool, str]:
    """The reference backend runs everywhere PyTorch does."""
    return True, "pure PyTorch, runs on any device"


def layer_norm(x, weight, bias, eps=1e-5, residual=None):
    """LayerNorm over the last dim; with ``residual`` returns ``(LN(x + residual), x + residual)``."""
    h = x if residual is None else x + residual
    y = F.layer_norm(h, (h.shape[-1],), weight, bias, eps)
    return y if residual is None else (y, h)


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    """GPT-2's "gelu_new": 0.5·x·(1 + tanh(√(2/π)·(x + 0.044715·x³)))."""
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))))


def bias_gelu(x, bias):
    """gelu_tanh(x + bias)."""
    return gelu_tanh(x + bias)


def attention(q, k, v, causal=True, scale=None):
    """softmax(q·kᵀ·scale [+ causal mask])·v over ``[B, H, T, D]`` tensors."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale
    if causal:
        t = q.shape[-2]
        mask = torch.ones(t, t, dtype=torch.bool, device=q.device).tril()
        scores = scores.masked_fill(~mask, float("-inf"))
    return torch.matmul(torch.softmax(scores, dim=-1), v)


def append_kv(k_cache, v_cache, cache_seqlens, k_new, v_new) -> None:
    """Write ``k_new``/``v_new`` ([B, H, D]) into the caches at position ``cache_seqlens[b]``."""
    b = torch.arange(k_cache.shape[0], device=k_cache.device)
    pos = cache_seqlens.long()
    k_cache[b, :, pos] = k_new
    v_cache[b, :, pos] = v_new


def decode_attention(q, k_cache, v_cache, cache_seqlens, k_new=None, v_new=None, scale=None):
    """One query token per sequence against its first ``cache_seqlens[b]`` (+1 if appending) keys.

    A sequence that attends to no position gets a zero output.
    """
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    lengths = cache_seqlens.long()
    if k_new is not None:
        append_kv(k_cache, v_cache, cache_seqlens, k_new, v_new)
        lengths = lengths + 1
    t_max = k_cache.shape[2]
    scores = torch.einsum("bhd,bhtd->bht", q, k_cache) * scale
    valid = torch.arange(t_max, device=q.device)[None, :] < lengths[:, None]  # [B, T_max]
    scores = scores.masked_fill(~valid[:, None, :], float("-inf"))
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # an empty row is all -inf -> NaN -> 0
    return torch.einsum("bht,bhtd->bhd", probs, v_cache)
