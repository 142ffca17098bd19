"""Building blocks of the ops' shared argument checks (each op's ``validate`` in ``gpt2fast/ops/specs``).

Each check raises ``ValueError`` (bad shape/value), ``TypeError`` (bad dtype) or
``RuntimeError`` (device mismatch) with a message that names the argument and what
was expected.
"""

from __future__ import annotations

import math

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def fmt(shape) -> str:
    """``[2, 3]`` for a shape."""
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
        raise ValueError(f"{name} must have shape {fmt(shape)}, got {fmt(t.shape)}")


def check_rank(name: str, t: torch.Tensor, rank: int, layout: str) -> None:
    """``t.dim() == rank``; ``layout`` describes the expected axes, e.g. "[B, H, T, D]"."""
    if t.dim() != rank:
        raise ValueError(f"{name} must be {rank}-D {layout}, got shape {fmt(t.shape)}")


def check_nonempty(name: str, t: torch.Tensor) -> None:
    """``t`` has at least one element."""
    if t.numel() == 0:
        raise ValueError(f"{name} is empty (shape {fmt(t.shape)}); every dimension must be >= 1")


def positive_finite(value) -> bool:
    """A real number (not a bool) in (0, inf)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and 0 < value < math.inf


def check_scale(scale) -> None:
    """``scale`` is None or a positive finite number."""
    if scale is not None and not positive_finite(scale):
        raise ValueError(f"scale must be None or a positive finite number, got {scale!r}")


def has_internal_overlap(t: torch.Tensor) -> bool:
    """Whether two elements of ``t`` share memory (e.g. an ``expand``-ed view), from its sizes and strides."""
    span = 1
    for size, stride in sorted((p for p in zip(t.shape, t.stride()) if p[0] > 1), key=lambda p: p[1]):
        if stride < span:
            return True
        span = stride * size
    return False


# ---- KV caches (decode_attention, chunk_attention) --------------------------------------------------------------
def check_writable_caches(k_cache: torch.Tensor, v_cache: torch.Tensor, why: str) -> None:
    """Neither cache has overlapping memory (an ``expand()``-ed view): ``why`` says what writes it in place."""
    for name, cache in (("k_cache", k_cache), ("v_cache", v_cache)):
        if has_internal_overlap(cache):
            raise ValueError(
                f"{name} has overlapping strides {tuple(cache.stride())} for shape {fmt(cache.shape)} (e.g. an "
                f"expand()-ed view); {why}, so pass a tensor with distinct memory per element"
            )


def check_cache_seqlens(cache_seqlens: object, batch: int, q: torch.Tensor) -> None:
    """``cache_seqlens`` is an int32 tensor ``[batch]`` on ``q``'s device (its values are not read)."""
    if not isinstance(cache_seqlens, torch.Tensor):
        raise TypeError(f"cache_seqlens must be an int32 torch.Tensor, got {type(cache_seqlens).__name__}")
    if cache_seqlens.dtype != torch.int32:
        raise TypeError(f"cache_seqlens must be int32, got {cache_seqlens.dtype}")
    check_shape("cache_seqlens", cache_seqlens, (batch,))
    if cache_seqlens.device != q.device:
        raise RuntimeError(f"cache_seqlens is on {cache_seqlens.device} but q is on {q.device}")


def longest_seqlen(cache_seqlens: torch.Tensor, check: bool) -> int | None:
    """The largest of ``cache_seqlens`` after refusing a negative one (a device read-back), or None when ``check``
    is False or a CUDA graph is being captured (the caller owns the values then)."""
    if not check or (cache_seqlens.device.type == "cuda" and torch.cuda.is_current_stream_capturing()):
        return None
    lo, hi = int(cache_seqlens.min()), int(cache_seqlens.max())
    if lo < 0:
        raise ValueError(f"cache_seqlens has a negative length ({lo})")
    return hi
