"""The four GPT-2 ops, each dispatched to a backend ("reference", "triton", "cuda" or "auto").

Every op validates its arguments here, once, before any backend sees them; a
backend only adds the checks that are its own (e.g. supported head dims).
"""

from __future__ import annotations

import torch

from gpt2fast.ops import _validate
from gpt2fast.ops._dispatch import (
    BACKENDS,
    BackendStatus,
    BackendUnavailableError,
    available_backends,
    backend_status,
    get_backend,
    resolve,
    set_backend,
)

__all__ = [
    "BACKENDS",
    "BackendStatus",
    "BackendUnavailableError",
    "attention",
    "available_backends",
    "backend_status",
    "bias_gelu",
    "decode_attention",
    "get_backend",
    "layer_norm",
    "set_backend",
]


def layer_norm(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    eps: float = 1e-5,
    residual: torch.Tensor | None = None,
    backend: str | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """LayerNorm over the last dim of ``x`` ([..., N]).

    With ``residual`` it returns ``(y, h)`` where ``h = x + residual`` and ``y = LN(h)``:
    the fused add-and-norm of a pre-LN block.
    """
    _validate.layer_norm(x, weight, bias, eps, residual)
    return resolve(backend, x.device).layer_norm(x, weight, bias, eps, residual)


def bias_gelu(x: torch.Tensor, bias: torch.Tensor, backend: str | None = None) -> torch.Tensor:
    """gelu_tanh(x + bias) (GPT-2's "gelu_new") for ``x`` [..., N] and ``bias`` [N]."""
    _validate.bias_gelu(x, bias)
    return resolve(backend, x.device).bias_gelu(x, bias)


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    causal: bool = True,
    scale: float | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """Scaled dot-product attention over ``[B, H, T, D]`` tensors; returns ``[B, H, T, D]``.

    ``scale`` defaults to ``D ** -0.5``.
    """
    _validate.attention(q, k, v, causal, scale)
    return resolve(backend, q.device).attention(q, k, v, causal, scale)


def decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cache_seqlens: torch.Tensor,
    k_new: torch.Tensor | None = None,
    v_new: torch.Tensor | None = None,
    scale: float | None = None,
    backend: str | None = None,
    check_seqlens: bool = True,
) -> torch.Tensor:
    """Single-token attention against a KV cache (``flash_attn_with_kvcache`` semantics).

    ``q`` is [B, H, D]; the caches are [B, H, T_max, D]; ``cache_seqlens`` is int32 [B].
    When ``k_new``/``v_new`` ([B, H, D]) are given they are written into the caches at
    ``cache_seqlens[b]`` and attention covers ``cache_seqlens[b] + 1`` positions.
    ``cache_seqlens`` is not modified.  Returns [B, H, D].

    The values of ``cache_seqlens`` are range-checked, which reads them back to the host.  A caller
    that already guarantees ``0 <= cache_seqlens[b] (+1 when appending) <= T_max`` (the model does, with
    a host-side bound) passes ``check_seqlens=False`` to avoid that sync on every layer.
    """
    _validate.decode_attention(q, k_cache, v_cache, cache_seqlens, k_new, v_new, scale, check_seqlens)
    return resolve(backend, q.device).decode_attention(q, k_cache, v_cache, cache_seqlens, k_new, v_new, scale)
