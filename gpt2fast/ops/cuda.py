"""CUDA C++ backend: the kernels in ``csrc/`` through the pybind11 module ``gpt2fast._C``.

``gpt2fast._C`` takes raw device pointers, element strides and the CUDA stream as Python ints and
has no PyTorch headers, so it builds against any torch.  This module does everything else:

* checks the backend-specific properties (strides, head dims) and then the device before any
  launch, raising a clear error (the generic checks already ran in ``_validate``); the 16-byte
  alignment of data pointers is checked inside the custom ops, on real tensors, right before launch;
* allocates outputs (and the split-KV scratch of decode attention) with torch;
* registers each op as a ``torch.library.custom_op`` with a fake implementation, so
  ``torch.compile`` traces through it and CUDA graphs capture it (decode attention declares that
  it mutates the caches).

Checks run in this order: layout (metadata only: works on CPU and on torch.compile's fake tensors,
so it is unit-tested on CPU), then device (CUDA tensor, on the current device, with a CUDA runtime
the extension can use), then pointer alignment, then launch.
"""

from __future__ import annotations

import math
from types import ModuleType

import torch

from gpt2fast.ops._registry import register_backend, register_impl

_ext_module: ModuleType | None = None
_ext_error: str | None = None
_runtime: tuple[int, int, str] | None = None  # (device count, error code, message) of the extension's runtime
_sm_count: dict[int, int] = {}

HEAD_DIMS = (32, 64, 128)
MAX_SPLITS = 64
INT32_MAX = 2**31 - 1
MAX_SEQ = 2**30  # T / T_max bound: the kernels' int32 position math (position + tile) cannot overflow


class CudaBackendError(RuntimeError):
    """The CUDA backend cannot run here (no extension, no device, wrong device)."""


# --------------------------------------------------------------------------- extension / device
def _load_ext() -> ModuleType | None:
    global _ext_module, _ext_error
    if _ext_module is None and _ext_error is None:
        try:
            from gpt2fast import _C  # type: ignore[attr-defined]

            _ext_module = _C
        except ImportError as exc:
            _ext_error = str(exc)
    return _ext_module


def _ext() -> ModuleType:
    """The compiled extension, or a CudaBackendError saying it is not built."""
    ext = _load_ext()
    if ext is None:
        raise CudaBackendError(_not_built_reason())
    return ext


def _not_built_reason() -> str:
    return (
        f"the CUDA extension gpt2fast._C is not built ({_ext_error}); reinstall with nvcc on PATH "
        "(pip install -e .) or run `python setup.py build_ext --inplace`"
    )


def _runtime_status() -> tuple[int, int, str]:
    """(device count, error code, message) as the extension's own (static) CUDA runtime sees it; cached."""
    global _runtime
    if _runtime is None:
        count, code, msg = _ext().device_count()
        _runtime = (int(count), int(code), str(msg))
    return _runtime


def _no_device_reason() -> str | None:
    """Why no CUDA device can be used (None when one can)."""
    if not torch.cuda.is_available():
        return "no CUDA device: torch.cuda.is_available() is False"
    count, code, msg = _runtime_status()
    if code != 0:
        return f"no CUDA device usable by gpt2fast._C: cudaGetDeviceCount failed with error {code} ({msg})"
    if count == 0:
        return "no CUDA device: gpt2fast._C's CUDA runtime sees 0 devices"
    return None


def is_available(device: torch.device) -> str | None:
    """``None`` when the CUDA backend can run tensors on ``device``, else why not."""
    device = torch.device(device)
    if _load_ext() is None:
        return _not_built_reason()
    reason = _no_device_reason()
    if reason is not None:
        return reason
    if device.type != "cuda":
        return f"the cuda backend runs CUDA tensors only, not {device.type} tensors"
    return None


def _check_device(**tensors: torch.Tensor | None) -> int:
    """Every tensor is a CUDA tensor on the current device and the runtime works; returns the device index."""
    if _load_ext() is None:
        raise CudaBackendError(_not_built_reason())
    reason = _no_device_reason()
    if reason is not None:
        raise CudaBackendError(f"cuda backend: {reason}")
    for name, t in tensors.items():
        if t is not None and t.device.type != "cuda":
            raise CudaBackendError(f"cuda backend: {name} is a {t.device.type} tensor; it needs CUDA tensors")
    current = torch.cuda.current_device()
    for name, t in tensors.items():
        if t is not None and t.device.index != current:
            raise CudaBackendError(
                f"cuda backend: {name} is on {t.device} but the current device is cuda:{current}; "
                f"use `with torch.cuda.device({t.device.index}):` or torch.cuda.set_device"
            )
    return current


def _stream(device: int) -> int:
    """The current torch CUDA stream of ``device`` as an int (cudaStream_t)."""
    return torch.cuda.current_stream(device).cuda_stream


def _num_sms(device: int) -> int:
    if device not in _sm_count:
        _sm_count[device] = torch.cuda.get_device_properties(device).multi_processor_count
    return _sm_count[device]


# --------------------------------------------------------------------------- layout checks
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_DTYPE_CODE = {t: i for i, t in enumerate(FLOAT_DTYPES)}  # = _C.F32, _C.F16, _C.BF16 (G2F_* in csrc)


def _dtype_code(name: str, t: torch.Tensor) -> int:
    if t.dtype not in _DTYPE_CODE:
        raise TypeError(f"cuda backend: {name} must be float32, float16 or bfloat16, got {t.dtype}")
    return _DTYPE_CODE[t.dtype]


def _vec_elems(t: torch.Tensor) -> int:
    """Elements in 16 bytes of ``t``'s dtype (the kernels' vector width)."""
    return 16 // t.element_size()


def _check_unit_last(name: str, t: torch.Tensor) -> None:
    if t.shape[-1] > 1 and t.stride(-1) != 1:
        raise ValueError(f"cuda backend: {name} must have unit stride in its last dim, got strides {tuple(t.stride())}")


def _check_vec_aligned(name: str, t: torch.Tensor, dims: int) -> None:
    """Unit last stride and the first ``dims`` strides multiples of 16 bytes (metadata only, so it
    also runs on the fake tensors of torch.compile; the data pointer is checked by :func:`_check_ptr`)."""
    _check_unit_last(name, t)
    w = _vec_elems(t)
    bad = [s for s, n in zip(t.stride()[:dims], t.shape[:dims]) if n > 1 and s % w != 0]  # size-1 dims: any stride
    if bad:
        raise ValueError(
            f"cuda backend: {name} strides {tuple(t.stride())} must be multiples of {w} elements (16 bytes) "
            "except the last; pass a .contiguous() tensor"
        )


def _check_ptr(**tensors: torch.Tensor | None) -> None:
    """Every tensor's data is 16-byte aligned (run inside the custom ops, on real tensors, before launch)."""
    for name, t in tensors.items():
        if t is not None and t.data_ptr() % 16 != 0:
            raise ValueError(f"cuda backend: {name} must be 16-byte aligned (got data_ptr % 16 = {t.data_ptr() % 16})")


def _rows(name: str, t: torch.Tensor) -> tuple[torch.Tensor, int]:
    """View ``t`` [..., N] as [rows, N] without copying; returns (view, row stride)."""
    _check_unit_last(name, t)
    n = t.shape[-1]
    try:
        t2 = t.view(-1, n)
    except RuntimeError:
        raise ValueError(
            f"cuda backend: {name} (shape {tuple(t.shape)}, strides {tuple(t.stride())}) cannot be viewed as "
            f"[rows, {n}] with one row stride; pass a .contiguous() tensor"
        ) from None
    return t2, (t2.stride(0) if t2.shape[0] > 1 else n)


def _check_contiguous_1d(name: str, t: torch.Tensor) -> None:
    if t.dim() != 1 or (t.shape[0] > 1 and t.stride(0) != 1):
        raise ValueError(f"cuda backend: {name} must be a contiguous 1-D tensor, got strides {tuple(t.stride())}")


def _check_head_dim(d: int) -> None:
    if d not in HEAD_DIMS:
        raise ValueError(f"cuda backend: head dim D = {d} is not supported; supported: {HEAD_DIMS}")


def _check_grid(batch: int, heads: int) -> None:
    if batch > 65535 or heads > 65535:
        raise ValueError(f"cuda backend: B and H must be <= 65535 (grid limits), got B={batch}, H={heads}")


def _check_seq(name: str, t: int) -> None:
    if t > MAX_SEQ:
        raise ValueError(f"cuda backend: {name} must be <= 2**30 (int32 position math in the kernels), got {t}")


FP32_MIN_NORMAL = 1.1754943508222875e-38
FP32_MAX = 3.4028234663852886e38


def _check_fp32_param(name: str, value: float) -> None:
    """The kernels use ``value`` in fp32 (scale times log2(e)): it must stay a normal, finite fp32 number."""
    if not FP32_MIN_NORMAL <= value <= FP32_MAX / 2:
        raise ValueError(
            f"cuda backend: {name} = {value!r} is outside [{FP32_MIN_NORMAL:g}, {FP32_MAX / 2:g}]; the kernels use "
            "it in fp32, where it would round to 0 or overflow"
        )


def _check_ln_size(rows: int, n: int) -> None:
    """The layer_norm kernel's limits: N <= 2**30; grid of ceil(rows / 4) blocks (N <= 256) or rows blocks."""
    if n > 2**30:
        raise ValueError(f"cuda backend: layer_norm rows must have N <= 2**30 elements, got {n}")
    limit = INT32_MAX if n > 256 else 4 * INT32_MAX
    if rows > limit:
        raise ValueError(f"cuda backend: layer_norm over {rows} rows of {n} exceeds the grid limit ({limit} rows)")


def _ptr(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.data_ptr()


def choose_splits(batch_heads: int, t_max: int, num_sms: int) -> int:
    """Number of KV splits for decode attention, from B·H and T_max only (no device data).

    Aims for about two blocks per SM, with at least 64 cache positions per split, at most
    :data:`MAX_SPLITS`; then trims splits that would cover no position.
    """
    want = math.ceil(2 * num_sms / max(batch_heads, 1))
    splits = max(1, min(want, math.ceil(t_max / 64), MAX_SPLITS))
    chunk = math.ceil(t_max / splits)
    return math.ceil(t_max / chunk)


# --------------------------------------------------------------------------- custom ops
@torch.library.custom_op("gpt2fast::cuda_layer_norm", mutates_args=())
def _layer_norm_op(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float) -> torch.Tensor:
    x2, xs = _rows("x", x)
    y = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    dev = x.device.index
    _ext().layer_norm(
        _DTYPE_CODE[x.dtype], _ptr(x2), xs, 0, 0, _ptr(weight), _ptr(bias), _ptr(y), 0,
        x2.shape[0], x2.shape[1], float(eps), _stream(dev), dev,
    )  # fmt: skip
    return y


@_layer_norm_op.register_fake
def _(x, weight, bias, eps):
    return torch.empty(x.shape, dtype=x.dtype, device=x.device)


@torch.library.custom_op("gpt2fast::cuda_layer_norm_residual", mutates_args=())
def _layer_norm_residual_op(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float, residual: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    x2, xs = _rows("x", x)
    r2, rs = _rows("residual", residual)
    y = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    h = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    dev = x.device.index
    _ext().layer_norm(
        _DTYPE_CODE[x.dtype], _ptr(x2), xs, _ptr(r2), rs, _ptr(weight), _ptr(bias), _ptr(y), _ptr(h),
        x2.shape[0], x2.shape[1], float(eps), _stream(dev), dev,
    )  # fmt: skip
    return y, h


@_layer_norm_residual_op.register_fake
def _(x, weight, bias, eps, residual):
    return torch.empty(x.shape, dtype=x.dtype, device=x.device), torch.empty(x.shape, dtype=x.dtype, device=x.device)


@torch.library.custom_op("gpt2fast::cuda_bias_gelu", mutates_args=())
def _bias_gelu_op(x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    x2, xs = _rows("x", x)
    y = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    dev = x.device.index
    _ext().bias_gelu(
        _DTYPE_CODE[x.dtype], _ptr(x2), xs, _ptr(bias), _ptr(y), x2.shape[0], x2.shape[1], _stream(dev), dev
    )
    return y


@_bias_gelu_op.register_fake
def _(x, bias):
    return torch.empty(x.shape, dtype=x.dtype, device=x.device)


@torch.library.custom_op("gpt2fast::cuda_attention", mutates_args=())
def _attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, scale: float) -> torch.Tensor:
    _check_ptr(q=q, k=k, v=v)
    b, h, t, d = q.shape
    out = torch.empty((b, h, t, d), dtype=q.dtype, device=q.device)
    dev = q.device.index
    _ext().attention(
        _DTYPE_CODE[q.dtype], _ptr(q), _ptr(k), _ptr(v), _ptr(out), b, h, t, d,
        list(q.stride()[:3]), list(k.stride()[:3]), list(v.stride()[:3]), bool(causal), float(scale),
        _stream(dev), dev,
    )  # fmt: skip
    return out


@_attention_op.register_fake
def _(q, k, v, causal, scale):
    return torch.empty(q.shape, dtype=q.dtype, device=q.device)


@torch.library.custom_op("gpt2fast::cuda_decode_attention", mutates_args=("k_cache", "v_cache"))
def _decode_attention_op(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cache_seqlens: torch.Tensor,
    k_new: torch.Tensor | None,
    v_new: torch.Tensor | None,
    scale: float,
) -> torch.Tensor:
    _check_ptr(q=q, k_cache=k_cache, v_cache=v_cache, k_new=k_new, v_new=v_new)
    b, h, d = q.shape
    t_max = k_cache.shape[2]
    dev = q.device.index
    splits = choose_splits(b * h, t_max, _num_sms(dev))
    out = torch.empty((b, h, d), dtype=q.dtype, device=q.device)
    o_part = lse = None
    if splits > 1:  # sized by B, H, D and the split count only: graph-capture safe
        o_part = torch.empty((b, h, splits, d), dtype=torch.float32, device=q.device)
        lse = torch.empty((b, h, splits), dtype=torch.float32, device=q.device)
    kn_strides = list(k_new.stride()[:2]) if k_new is not None else [0, 0]
    vn_strides = list(v_new.stride()[:2]) if v_new is not None else [0, 0]
    _ext().decode_attention(
        _DTYPE_CODE[q.dtype], _ptr(q), list(q.stride()[:2]), _ptr(k_cache), _ptr(v_cache),
        list(k_cache.stride()[:3]), list(v_cache.stride()[:3]), _ptr(cache_seqlens), _ptr(k_new), _ptr(v_new),
        kn_strides, vn_strides, _ptr(out), _ptr(o_part), _ptr(lse), b, h, t_max, d, splits, float(scale),
        _stream(dev), dev,
    )  # fmt: skip
    return out


@_decode_attention_op.register_fake
def _(q, k_cache, v_cache, cache_seqlens, k_new, v_new, scale):
    return torch.empty(q.shape, dtype=q.dtype, device=q.device)


# --------------------------------------------------------------------------- backend ops
def _layer_norm_layout(x, weight, bias, eps, residual) -> None:
    _dtype_code("x", x)
    x2, _ = _rows("x", x)
    _check_ln_size(x2.shape[0], x2.shape[1])
    if residual is not None:
        _rows("residual", residual)
    _check_contiguous_1d("weight", weight)
    _check_contiguous_1d("bias", bias)
    _check_fp32_param("eps", float(eps))


def layer_norm(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float = 1e-5, residual: torch.Tensor | None = None
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """LayerNorm over the last dim; with ``residual`` returns ``(LN(x + residual), x + residual)``."""
    _check_device(x=x, weight=weight, bias=bias, residual=residual)
    if residual is None:
        return _layer_norm_op(x, weight, bias, float(eps))
    return _layer_norm_residual_op(x, weight, bias, float(eps), residual)


def _bias_gelu_layout(x, bias) -> None:
    _dtype_code("x", x)
    _rows("x", x)
    _check_contiguous_1d("bias", bias)


def bias_gelu(x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """gelu_tanh(x + bias), computed in fp32."""
    _check_device(x=x, bias=bias)
    return _bias_gelu_op(x, bias)


def _attention_layout(q, k, v, causal, scale) -> None:
    _dtype_code("q", q)
    _check_head_dim(q.shape[-1])
    for name, t in (("q", q), ("k", k), ("v", v)):
        _check_vec_aligned(name, t, 3)
    _check_grid(q.shape[0], q.shape[1])
    _check_seq("T", q.shape[2])
    _check_fp32_param("scale", q.shape[-1] ** -0.5 if scale is None else float(scale))


def attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = True, scale: float | None = None
) -> torch.Tensor:
    """Flash attention over ``[B, H, T, D]`` (D in 32/64/128); tensor cores for fp16/bf16."""
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    _check_device(q=q, k=k, v=v)
    return _attention_op(q, k, v, bool(causal), scale)


def _decode_attention_layout(q, k_cache, v_cache, cache_seqlens, k_new, v_new, scale) -> None:
    _dtype_code("q", q)
    _check_head_dim(q.shape[-1])
    _check_vec_aligned("q", q, 2)
    _check_vec_aligned("k_cache", k_cache, 3)
    _check_vec_aligned("v_cache", v_cache, 3)
    if k_new is not None:
        _check_vec_aligned("k_new", k_new, 2)
        _check_vec_aligned("v_new", v_new, 2)
    if cache_seqlens.dim() != 1 or (cache_seqlens.shape[0] > 1 and cache_seqlens.stride(0) != 1):
        raise ValueError(f"cuda backend: cache_seqlens must be contiguous, got strides {tuple(cache_seqlens.stride())}")
    _check_grid(q.shape[0], q.shape[1])
    if q.shape[0] * q.shape[1] > INT32_MAX:
        raise ValueError(f"cuda backend: B*H must be <= 2**31 - 1 (combine kernel grid), got {q.shape[0] * q.shape[1]}")
    _check_seq("T_max", k_cache.shape[2])
    _check_fp32_param("scale", q.shape[-1] ** -0.5 if scale is None else float(scale))


def decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cache_seqlens: torch.Tensor,
    k_new: torch.Tensor | None = None,
    v_new: torch.Tensor | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    """Split-KV decode attention; appends ``k_new``/``v_new`` in the same launch (caches mutated)."""
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    _check_device(q=q, k_cache=k_cache, v_cache=v_cache, cache_seqlens=cache_seqlens, k_new=k_new, v_new=v_new)
    return _decode_attention_op(q, k_cache, v_cache, cache_seqlens, k_new, v_new, scale)


# --------------------------------------------------------------------------- registration
def _declines(layout_check):
    """A ``supports`` predicate from a layout check that raises: its message is the reason."""

    def supports(*args) -> str | None:
        try:
            layout_check(*args)
        except (ValueError, TypeError) as exc:
            return str(exc)
        return None

    return supports


register_backend("cuda", priority=30, is_available=is_available, describe=lambda device: "gpt2fast._C CUDA kernels")
register_impl("layer_norm", "cuda", supports=_declines(_layer_norm_layout))(layer_norm)
register_impl("bias_gelu", "cuda", supports=_declines(_bias_gelu_layout))(bias_gelu)
register_impl("attention", "cuda", supports=_declines(_attention_layout))(attention)
register_impl("decode_attention", "cuda", supports=_declines(_decode_attention_layout))(decode_attention)
