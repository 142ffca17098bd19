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
