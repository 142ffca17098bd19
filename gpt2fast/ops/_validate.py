"""Argument checks shared by every backend, run before any kernel launch.

Each check raises ``ValueError`` (bad shape/value), ``TypeError`` (bad dtype) or
``RuntimeError`` (device mismatch) with a message that names the argument and what
was expected.
"""

from __future__ import annotations

import math

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _fmt(shape) -> str:
    return "[" + ", ".join(str(s) for s in shape) + "]"


def check_float(name: str, t: torch.Tensor) -> None:
    """``t`` is a tensor of fp32/fp16/bf16."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32, float16 or bfloat16, got {t.dtype}")


def check_same(ref_name: str, ref: torch.Tensor, **others: torch.Tensor | None) -> None:
    """Every tensor in ``others`` is a float tensor with ``ref``'s dtype and device."""
    for name, t in others.items():
        if t is None:
            continue
        check_float(name, t)
        if t.device != ref.device:
            raise RuntimeError(f"{name} is on {t.device} but {ref_name} is on {ref.device}; move them to one device")
        if t.dtype != ref.dtype:
            raise TypeError(f"{name} has dtype {t.dtype} but {ref_name} has {ref.dtype}; they must match")


def check_shape(name: str, t: torch.Tensor, shape: tuple) -> None:
    """``t.shape == shape``."""
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {_fmt(shape)}, got {_fmt(t.shape)}")


def check_rank(name: str, t: torch.Tensor, rank: int, layout: str) -> None:
    """``t.dim() == rank``; ``layout`` describes the expected axes, e.g. "[B, H, T, D]"."""
    if t.dim() != rank:
        raise ValueError(f"{name} must be {rank}-D {layout}, got shape {_fmt(t.shape)}")


def check_nonempty(name: str, t: torch.Tensor) -> None:
    """``t`` has at least one element."""
    if t.numel() == 0:
        raise ValueError(f"{name} is empty (shape {_fmt(t.shape)}); every dimension must be >= 1")


def layer_norm(x, weight, bias, eps, residual) -> None:
    """Checks for ``ops.layer_norm``."""
    check_float("x", x)
    if x.dim() < 1:
        raise ValueError("x must have at least 1 dimension [..., N]")
    check_nonempty("x", x)
    check_same("x", x, weight=weight, bias=bias, residual=residual)
    n = x.shape[-1]
    check_shape("weight", weight, (n,))
    check_shape("bias", bias, (n,))
    if residual is not None:
        check_shape("residual", residual, tuple(x.shape))
    if not _positive_finite(eps):
        raise ValueError(f"eps must be a positive finite number, got {eps!r}")


def bias_gelu(x, bias) -> None:
    """Checks for ``ops.bias_gelu``."""
    check_float("x", x)
    if x.dim() < 1:
        raise ValueError("x must have at least 1 dimension [..., N]")
    check_nonempty("x", x)
    check_same("x", x, bias=bias)
    check_shape("bias", bias, (x.shape[-1],))


def attention(q, k, v, causal, scale) -> None:
    """Checks for ``ops.attention``."""
    check_float("q", q)
    check_rank("q", q, 4, "[B, H, T, D]")
    check_nonempty("q", q)
    check_same("q", q, k=k, v=v)
    check_shape("k", k, tuple(q.shape))
    check_shape("v", v, tuple(q.shape))
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be a bool, got {type(causal).__name__}")
    _check_scale(scale)


def _positive_finite(value) -> bool:
    """A real number (not a bool) in (0, inf)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and 0 < value < math.inf


def _check_scale(scale) -> None:
    if scale is not None and not _positive_finite(scale):
        raise ValueError(f"scale must be None or a positive finite number, got {scale!r}")


def has_internal_overlap(t: torch.Tensor) -> bool:
    """Whether two elements of ``t`` share memory (e.g. an ``expand``-ed view), from its sizes and strides."""
    span = 1
    for size, stride in sorted((p for p in zip(t.shape, t.stride()) if p[0] > 1), key=lambda p: p[1]):
        if stride < span:
            return True
        span = stride * size
    return False


def decode_attention(q, k_cache, v_cache, cache_seqlens, k_new, v_new, scale, check_seqlens=True) -> None:
    """Checks for ``ops.decode_attention``.

    The values of ``cache_seqlens`` are checked too (needs a device-to-host copy), unless
    ``check_seqlens`` is False or a CUDA graph is being captured, where the caller owns them.
    """
    check_float("q", q)
    check_rank("q", q, 3, "[B, H, D]")
    check_nonempty("q", q)
    check_float("k_cache", k_cache)
    check_rank("k_cache", k_cache, 4, "[B, H, T_max, D]")
    check_same("q", q, k_cache=k_cache, v_cache=v_cache, k_new=k_new, v_new=v_new)
    b, h, d = q.shape
    t_max = k_cache.shape[2]
    check_shape("k_cache", k_cache, (b, h, t_max, d))
    check_shape("v_cache", v_cache, (b, h, t_max, d))
    if t_max == 0:
        raise ValueError("k_cache has T_max = 0; the cache must hold at least one position")
    if (k_new is None) != (v_new is None):
        raise ValueError("k_new and v_new must be given together (both or neither)")
    if k_new is not None:
        check_shape("k_new", k_new, (b, h, d))
        check_shape("v_new", v_new, (b, h, d))
        for name, cache in (("k_cache", k_cache), ("v_cache", v_cache)):
            if has_internal_overlap(cache):
                raise ValueError(
                    f"{name} has overlapping strides {tuple(cache.stride())} for shape {_fmt(cache.shape)} (e.g. an "
                    "expand()-ed view); appending k_new/v_new writes the cache in place, so pass a tensor with "
                    "distinct memory per element"
                )
    if not isinstance(cache_seqlens, torch.Tensor):
        raise TypeError(f"cache_seqlens must be an int32 torch.Tensor, got {type(cache_seqlens).__name__}")
    if cache_seqlens.dtype != torch.int32:
        raise TypeError(f"cache_seqlens must be int32, got {cache_seqlens.dtype}")
    check_shape("cache_seqlens", cache_seqlens, (b,))
    if cache_seqlens.device != q.device:
        raise RuntimeError(f"cache_seqlens is on {cache_seqlens.device} but q is on {q.device}")
    _check_scale(scale)
    if not check_seqlens or (q.device.type == "cuda" and torch.cuda.is_current_stream_capturing()):
        return
    lo, hi = int(cache_seqlens.min()), int(cache_seqlens.max())
    limit = t_max - 1 if k_new is not None else t_max
    if lo < 0:
        raise ValueError(f"cache_seqlens has a negative length ({lo})")
    if hi > limit:
        what = "appending k_new/v_new would overflow the cache" if k_new is not None else "exceeds the cache"
        raise ValueError(f"cache_seqlens has length {hi}: {what} (T_max = {t_max})")
