"""Triton backend of :mod:`gpt2fast.ops`: fused LayerNorm(+residual), bias+GELU, FlashAttention-2
style causal attention and flash-decoding with in-launch KV append.

Each op is registered with ``torch.library.custom_op`` (namespace ``gpt2fast_triton``) with a
fake implementation, so ``torch.compile`` traces through it and CUDA graphs capture it; the
decode op declares that it mutates the caches.  Generic argument checks already ran in
:mod:`gpt2fast.ops`; this module adds only its own (head dims, int32-indexable strides), before launch.

Kernels autotune on the GPU unless ``GPT2FAST_AUTOTUNE=0`` (then a fixed heuristic config is
used).  On CPU they run only under Triton's interpreter (``TRITON_INTERPRET=1``, tests).
"""

from __future__ import annotations

import os

import torch

try:
    import triton

    from gpt2fast.ops.triton import attention as _attention
    from gpt2fast.ops.triton import bias_gelu as _bias_gelu
    from gpt2fast.ops.triton import decode_attention as _decode
    from gpt2fast.ops.triton import layer_norm as _layer_norm
    from gpt2fast.ops.triton._common import interpreting

    _IMPORT_ERROR: str | None = None
except ImportError as exc:  # triton missing or too old: the backend reports why, gpt2fast still imports
    _IMPORT_ERROR = f"{type(exc).__name__}: {exc}"

__all__ = ["attention", "bias_gelu", "decode_attention", "is_available", "layer_norm"]


def is_available(device: torch.device) -> tuple[bool, str]:
    """Whether the Triton kernels can run on ``device`` tensors, and why (not)."""
    if _IMPORT_ERROR is not None:
        return False, f"triton is not importable ({_IMPORT_ERROR}); install it with pip install 'gpt2fast[triton]'"
    version = f"triton {triton.__version__}"
    if device.type == "cuda":
        if interpreting():
            return False, f"{version}: TRITON_INTERPRET=1 is set, so the kernels run interpreted (CPU tensors only)"
        if not torch.cuda.is_available():
            return False, f"{version}: torch sees no CUDA device"
        major, minor = torch.cuda.get_device_capability(device)
        name = torch.cuda.get_device_name(device)
        if major < 8:
            return False, f"{version}: {name} is sm_{major}{minor}; the kernels need sm_80 or newer"
        return True, f"{version} on {name} (sm_{major}{minor})"
    if device.type == "cpu":
        if interpreting():
            return True, f"{version} interpreter on CPU (TRITON_INTERPRET=1): correct but very slow, for tests"
        hint = "set TRITON_INTERPRET=1 before importing gpt2fast to run them interpreted (slow, for tests)"
        if os.environ.get("TRITON_INTERPRET") == "1":
            hint = "TRITON_INTERPRET=1 was set only after triton/gpt2fast were imported; set it before"
        return False, f"{version} kernels run on CUDA tensors; for CPU tensors {hint}"
    return False, f"{version}: no Triton target for {device.type} tensors"


def layer_norm(x, weight, bias, eps, residual):
    """LN(x), or ``(LN(x + residual), x + residual)`` fused in one kernel."""
    if x.shape[-1] > _layer_norm.MAX_N:
        raise ValueError(
            f"triton layer_norm keeps a row in registers: N must be <= {_layer_norm.MAX_N}, got {x.shape[-1]}"
        )
    if residual is None:
        return _layer_norm.layer_norm_op(x, weight, bias, float(eps))
    return tuple(_layer_norm.add_layer_norm_op(x, residual, weight, bias, float(eps)))


def bias_gelu(x, bias):
    """gelu_tanh(x + bias), fp32 math, output in x's dtype."""
    return _bias_gelu.bias_gelu_op(x, bias)


def attention(q, k, v, causal, scale):
    """FlashAttention-2 style forward over [B, H, T, D] (head dims 32/64/128)."""
    _attention.check(q, k, v)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    return _attention.attention_op(q, k, v, causal, scale)


def decode_attention(q, k_cache, v_cache, cache_seqlens, k_new, v_new, scale):
    """Flash-decoding against the cache, appending k_new/v_new at ``cache_seqlens[b]`` in the same launch."""
    _decode.check(q, k_cache, v_cache)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    return _decode.decode_attention_op(q, k_cache, v_cache, cache_seqlens, k_new, v_new, scale)
