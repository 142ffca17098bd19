"""Flash-decoding through ``_C.decode_attention`` (``csrc/decode_attention.cu``): one query token per sequence
against a KV cache split into :func:`choose_splits` chunks, with the append of ``k_new``/``v_new`` done by the
split that owns the slot and the merge of the splits done by the last one to finish, all in one launch.

The split count depends on B·H and T_max only, and the scratch buffers on B, H, D and that count, so a call is
CUDA-graph capturable; ``cache_seqlens`` is read on the device only (clamped to [0, T_max] there).
"""

from __future__ import annotations

import math

import torch

from gpt2fast.ops._registry import register_impl
from gpt2fast.ops._workspace import counters
from gpt2fast.ops.cuda import _ext
from gpt2fast.ops.specs import decode_attention as spec

#: Most KV splits a call uses.
MAX_SPLITS = 64


def choose_splits(batch_heads: int, t_max: int, num_sms: int) -> int:
    """Number of KV splits for decode attention, from B·H and T_max only (no device data).

    Aims for about two blocks per SM, with at least 64 cache positions per split, at most
    :data:`MAX_SPLITS`; then trims splits that would cover no position.
    """
    want = math.ceil(2 * num_sms / max(batch_heads, 1))
    splits = max(1, min(want, math.ceil(t_max / 64), MAX_SPLITS))
    chunk = math.ceil(t_max / splits)
    return math.ceil(t_max / chunk)


def supports(q, k_cache, v_cache, cache_seqlens, k_new, v_new, scale) -> str | None:
    """A supported head dim, 16-byte aligned strides, a contiguous ``cache_seqlens``, B/H (and B·H) within the
    grids, T_max within int32 position math and a scale that fp32 represents."""
    b, h, d = q.shape
    reason = (
        _ext.dtype_reason("q", q)
        or _ext.head_dim_reason(d)
        or _ext.vec_aligned_reason("q", q, 2)
        or _ext.vec_aligned_reason("k_cache", k_cache, 3)
        or _ext.vec_aligned_reason("v_cache", v_cache, 3)
        or (None if k_new is None else _ext.vec_aligned_reason("k_new", k_new, 2))
        or (None if v_new is None else _ext.vec_aligned_reason("v_new", v_new, 2))
    )
    if reason is not None:
        return reason
    if cache_seqlens.dim() != 1 or (cache_seqlens.shape[0] > 1 and cache_seqlens.stride(0) != 1):
        return f"cuda backend: cache_seqlens must be contiguous, got strides {tuple(cache_seqlens.stride())}"
    reason = _ext.grid_reason(b, h)
    if reason is not None:
        return reason
    if b * h > _ext.INT32_MAX:
        return f"cuda backend: B*H must be <= 2**31 - 1 (the merge's counters), got {b * h}"
    return _ext.seq_reason("T_max", k_cache.shape[2]) or _ext.fp32_param_reason("scale", _ext.default_scale(d, scale))


@torch.library.custom_op("gpt2fast::cuda_decode_attention", mutates_args=spec.MUTATES, schema=spec.SCHEMA)
def decode_attention_op(q, k_cache, v_cache, cache_seqlens, k_new, v_new, scale):
    """Split-KV decode attention ([B, H, D] output); appends ``k_new``/``v_new`` to the caches when given."""
    device = _ext.check_device(
        q=q, k_cache=k_cache, v_cache=v_cache, cache_seqlens=cache_seqlens, k_new=k_new, v_new=v_new
    )
    _ext.check_ptr(q=q, k_cache=k_cache, v_cache=v_cache, k_new=k_new, v_new=v_new)
    b, h, d = q.shape
    t_max = k_cache.shape[2]
    splits = choose_splits(b * h, t_max, _ext.num_sms(device))
    out = _ext.new_like(q)
    o_part = lse = cnt = None
    if splits > 1:  # sized by B, H, D and the split count only: graph-capture safe
        o_part = torch.empty((b, h, splits, d), dtype=torch.float32, device=q.device)
        lse = torch.empty((b, h, splits), dtype=torch.float32, device=q.device)
        cnt = counters(q.device, b * h)  # zero before and after the launch
    tensors = dict(cache_seqlens=cache_seqlens, out=out, o_part=o_part, lse=lse, counters=cnt)
    strided = dict(q=q, k_cache=k_cache, v_cache=v_cache, k_new=k_new, v_new=v_new)
    sizes = dict(batch=b, heads=h, t_max=t_max, head_dim=d, num_splits=splits)
    _ext.launch("decode_attention", device, q, tensors, strided, **sizes, scale=scale)
    return out


@decode_attention_op.register_fake
def _(q, k_cache, v_cache, cache_seqlens, k_new, v_new, scale):
    return _ext.new_like(q)


@register_impl("decode_attention", "cuda", supports=supports)
def decode_attention(q, k_cache, v_cache, cache_seqlens, k_new, v_new, scale) -> torch.Tensor:
    """Split-KV decode attention; appends ``k_new``/``v_new`` in the same launch (caches mutated)."""
    return decode_attention_op(q, k_cache, v_cache, cache_seqlens, k_new, v_new, _ext.default_scale(q.shape[-1], scale))
