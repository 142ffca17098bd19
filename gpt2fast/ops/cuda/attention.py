"""Prefill attention over [B, H, T, D] through ``_C.attention`` (``csrc/attention.cu``): FlashAttention-2 style
with ``mma.sync`` tensor cores for fp16/bf16, a CUDA-core kernel for fp32.

q, k and v are read through their (batch, head, time) strides, so the model's views of one QKV projection run
without copies; the last dim must have unit stride and the other strides (and the data pointers) must be
16-byte multiples.  Head dims 32, 64 and 128.
"""

from __future__ import annotations

import torch

from gpt2fast.ops._registry import register_impl
from gpt2fast.ops.cuda import _ext


def supports(q, k, v, causal, scale) -> str | None:
    """A supported head dim, 16-byte aligned strides, B/H within the grid, T within int32 position math and a
    scale that fp32 represents."""
    d = q.shape[-1]
    return (
        _ext.dtype_reason("q", q)
        or _ext.head_dim_reason(d)
        or _ext.vec_aligned_reason("q", q, 3)
        or _ext.vec_aligned_reason("k", k, 3)
        or _ext.vec_aligned_reason("v", v, 3)
        or _ext.grid_reason(q.shape[0], q.shape[1])
        or _ext.seq_reason("T", q.shape[2])
        or _ext.fp32_param_reason("scale", _ext.default_scale(d, scale))
    )


@torch.library.custom_op("gpt2fast::cuda_attention", mutates_args=())
def attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, scale: float) -> torch.Tensor:
    """Attention of q over k/v (contiguous [B, H, T, D] output)."""
    device = _ext.check_device(q=q, k=k, v=v)
    _ext.check_ptr(q=q, k=k, v=v)
    b, h, t, d = q.shape
    out = _ext.new_like(q)
    sizes = dict(batch=b, heads=h, seqlen=t, head_dim=d)
    _ext.launch("attention", device, q, dict(out=out), dict(q=q, k=k, v=v), **sizes, causal=causal, scale=scale)
    return out


@attention_op.register_fake
def _(q, k, v, causal, scale):
    return _ext.new_like(q)


# Not differentiable: this kernel saves no log-sum-exp, so a call that needs a gradient is declined (a named call
# raises, "auto" falls through to triton, whose training forward saves it and whose backward runs).
@register_impl("attention", "cuda", supports=supports)
def attention(q, k, v, causal, scale) -> torch.Tensor:
    """Softmax attention over ``[B, H, T, D]`` (D in 32/64/128), causal or full; ``scale`` None is 1/sqrt(D)."""
    return attention_op(q, k, v, causal, _ext.default_scale(q.shape[-1], scale))
