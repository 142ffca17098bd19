"""The one place the cuda backend meets ``gpt2fast._C`` and the CUDA runtime, and the helpers its ops share.

* **Loading and probing**: :func:`load` imports the extension once (its error is kept for the reason);
  :func:`runtime_status` asks the extension's own, statically linked, CUDA runtime for its devices once;
  :func:`unavailable_reason` is the backend's ``is_available``.
* **Layout reasons**: metadata-only predicates (``*_reason``) that return ``None`` or a one-line reason
  starting with ``"cuda backend: "``; each op's ``supports`` chains them.  They read shapes, dtypes and strides
  only, so they run on CPU, meta and fake tensors alike.
* **Launching**: inside a custom op, on real tensors: :func:`check_device` (the extension is built, a device is
  usable, every tensor is a CUDA tensor of one device), :func:`check_ptr` (16-byte aligned data), then
  :func:`launch`, which fills the kernel's parameter struct field by field and calls the kernel under that
  device (:func:`device_guard`) on its current stream.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from types import ModuleType

import torch

#: Head dims the attention kernels are instantiated for.
HEAD_DIMS = (32, 64, 128)
INT32_MAX = 2**31 - 1
#: T / T_max bound: the kernels' int32 position math (position + tile) cannot overflow.
MAX_SEQ = 2**30
FP32_MIN_NORMAL = 1.1754943508222875e-38
FP32_MAX = 3.4028234663852886e38
#: The dtypes the kernels take, in the order of their codes (``_C.F32``, ``_C.F16``, ``_C.BF16``).
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
DTYPE_CODE: dict[torch.dtype, int] = {t: i for i, t in enumerate(FLOAT_DTYPES)}

_module: ModuleType | None = None
_error: str | None = None
_runtime: tuple[int, int, str] | None = None  # (device count, error code, message) of the extension's runtime
_sm_count: dict[int, int] = {}


class CudaBackendError(RuntimeError):
    """The CUDA backend cannot run here (no extension, no device, tensors not on one CUDA device)."""


# ---- loading and probing -------------------------------------------------------------------------------------
def load() -> ModuleType | None:
    """The compiled extension ``gpt2fast._C``, or None when it does not import (the error is kept)."""
    global _module, _error
    if _module is None and _error is None:
        try:
            from gpt2fast import _C  # type: ignore[attr-defined]

            _module = _C
        except ImportError as exc:
            _error = str(exc)
    return _module


def ext() -> ModuleType:
    """The compiled extension, or a :class:`CudaBackendError` saying it is not built."""
    module = load()
    if module is None:
        raise CudaBackendError(not_built_reason())
    return module


def not_built_reason() -> str:
    """Why there is no extension, with how to build it."""
    return (
        f"the CUDA extension gpt2fast._C is not built ({_error}); reinstall with nvcc on PATH "
        "(pip install -e .) or run `python setup.py build_ext --inplace`"
    )


def runtime_status() -> tuple[int, int, str]:
    """(device count, error code, message) as the extension's own (static) CUDA runtime sees it; cached."""
    global _runtime
    if _runtime is None:
        count, code, msg = ext().device_count()
        _runtime = (int(count), int(code), str(msg))
    return _runtime


def no_device_reason() -> str | None:
    """Why no CUDA device can be used (None when one can)."""
    if not torch.cuda.is_available():
        return "no CUDA device: torch.cuda.is_available() is False"
    count, code, msg = runtime_status()
    if code != 0:
        return f"no CUDA device usable by gpt2fast._C: cudaGetDeviceCount failed with error {code} ({msg})"
    if count == 0:
        return "no CUDA device: gpt2fast._C's CUDA runtime sees 0 devices"
    return None


def unavailable_reason(device: torch.device) -> str | None:
    """``None`` when the CUDA kernels can run tensors on ``device``, else why not (the backend's
    ``is_available``)."""
    device = torch.device(device)
    if load() is None:
        return not_built_reason()
    reason = no_device_reason()
    if reason is not None:
        return reason
    if device.type != "cuda":
        return f"the cuda backend runs CUDA tensors only, not {device.type} tensors"
    return None


def num_sms(device: int) -> int:
    """Streaming multiprocessors of CUDA device ``device`` (cached)."""
    if device not in _sm_count:
        _sm_count[device] = torch.cuda.get_device_properties(device).multi_processor_count
    return _sm_count[device]


def partial_programs(rows: int, device: int) -> int:
    """Blocks of a backward kernel that reduces over rows (one row of partial sums each): about four per SM,
    never more than the rows (nor than grid dim y's 65535)."""
    return max(1, min(rows, 4 * num_sms(device), 65535))


# ---- layout reasons (metadata only) --------------------------------------------------------------------------
def dtype_reason(name: str, t: torch.Tensor) -> str | None:
    """``t`` has a dtype the kernels are built for."""
    if t.dtype not in DTYPE_CODE:
        return f"cuda backend: {name} must be float32, float16 or bfloat16, got {t.dtype}"
    return None


def unit_last_reason(name: str, t: torch.Tensor) -> str | None:
    """``t``'s last dim has unit stride (or a single element)."""
    if t.shape[-1] > 1 and t.stride(-1) != 1:
        return f"cuda backend: {name} must have unit stride in its last dim, got strides {tuple(t.stride())}"
    return None


def vec_aligned_reason(name: str, t: torch.Tensor, dims: int) -> str | None:
    """Unit last stride and the first ``dims`` strides multiples of 16 bytes (size-1 dims: any stride).  The data
    pointer is checked by :func:`check_ptr`, on real tensors."""
    reason = unit_last_reason(name, t)
    if reason is not None:
        return reason
    w = 16 // t.element_size()
    if any(n > 1 and s % w != 0 for s, n in zip(t.stride()[:dims], t.shape[:dims])):
        return (
            f"cuda backend: {name} strides {tuple(t.stride())} must be multiples of {w} elements (16 bytes) "
            "except the last; pass a .contiguous() tensor"
        )
    return None


def _as_rows(t: torch.Tensor) -> torch.Tensor | None:
    try:
        return t.view(-1, t.shape[-1])
    except RuntimeError:
        return None


def rows_reason(name: str, t: torch.Tensor) -> str | None:
    """``t`` [..., N] is a [rows, N] view with one row stride (unit stride within rows)."""
    reason = unit_last_reason(name, t)
    if reason is None and _as_rows(t) is None:
        reason = (
            f"cuda backend: {name} (shape {tuple(t.shape)}, strides {tuple(t.stride())}) cannot be viewed as "
            f"[rows, {t.shape[-1]}] with one row stride; pass a .contiguous() tensor"
        )
    return reason


def rows_view(name: str, t: torch.Tensor) -> tuple[torch.Tensor, int]:
    """View ``t`` [..., N] as [rows, N] without copying; returns (view, row stride).  ``ValueError`` with
    :func:`rows_reason`'s message when it cannot."""
    reason = rows_reason(name, t)
    if reason is not None:
        raise ValueError(reason)
    t2 = _as_rows(t)
    return t2, (t2.stride(0) if t2.shape[0] > 1 else t2.shape[1])


def contiguous_1d_reason(name: str, t: torch.Tensor) -> str | None:
    """``t`` is a contiguous 1-D tensor."""
    if t.dim() != 1 or (t.shape[0] > 1 and t.stride(0) != 1):
        return f"cuda backend: {name} must be a contiguous 1-D tensor, got strides {tuple(t.stride())}"
    return None


def head_dim_reason(d: int) -> str | None:
    """The attention kernels are instantiated for head dim ``d``."""
    if d not in HEAD_DIMS:
        return f"cuda backend: head dim D = {d} is not supported; supported: {HEAD_DIMS}"
    return None


def grid_reason(batch: int, heads: int) -> str | None:
    """B and H fit in the attention grids' y/z dims."""
    if batch > 65535 or heads > 65535:
        return f"cuda backend: B and H must be <= 65535 (grid limits), got B={batch}, H={heads}"
    return None


def seq_reason(name: str, t: int) -> str | None:
    """A sequence length the kernels' int32 position math can handle."""
    if t > MAX_SEQ:
        return f"cuda backend: {name} must be <= 2**30 (int32 position math in the kernels), got {t}"
    return None


def fp32_param_reason(name: str, value: float) -> str | None:
    """The kernels use ``value`` in fp32 (scale times log2(e)): it must stay a normal, finite fp32 number."""
    if not FP32_MIN_NORMAL <= value <= FP32_MAX / 2:
        return (
            f"cuda backend: {name} = {value!r} is outside [{FP32_MIN_NORMAL:g}, {FP32_MAX / 2:g}]; the kernels use "
            "it in fp32, where it would round to 0 or overflow"
        )
    return None


def default_scale(head_dim: int, scale: float | None) -> float:
    """The softmax scale of an attention call: ``scale``, or 1/sqrt(D) when it is None."""
    return head_dim**-0.5 if scale is None else float(scale)


# ---- launching (real tensors, inside the custom ops) ---------------------------------------------------------
def check_device(**tensors: torch.Tensor | None) -> int:
    """The extension is built, a device is usable and every given tensor is a CUDA tensor on one device; returns
    that device's index (raises :class:`CudaBackendError` otherwise).  ``None`` entries are skipped."""
    if load() is None:
        raise CudaBackendError(not_built_reason())
    reason = no_device_reason()
    if reason is not None:
        raise CudaBackendError(f"cuda backend: {reason}")
    given = [(name, t) for name, t in tensors.items() if t is not None]
    for name, t in given:
        if t.device.type != "cuda":
            raise CudaBackendError(f"cuda backend: {name} is a {t.device.type} tensor; it needs CUDA tensors")
    first_name, first = given[0]
    for name, t in given[1:]:
        if t.device != first.device:
            raise CudaBackendError(f"cuda backend: {name} is on {t.device} but {first_name} is on {first.device}")
    return first.device.index


def check_ptr(**tensors: torch.Tensor | None) -> None:
    """Every given tensor's data is 16-byte aligned (the vector loads need it); ``ValueError`` otherwise."""
    for name, t in tensors.items():
        if t is not None and t.data_ptr() % 16 != 0:
            raise ValueError(f"cuda backend: {name} must be 16-byte aligned (got data_ptr % 16 = {t.data_ptr() % 16})")


def ptr(t: torch.Tensor | None) -> int:
    """The data pointer of ``t`` as an int (0 for None)."""
    return 0 if t is None else t.data_ptr()


def new_like(t: torch.Tensor) -> torch.Tensor:
    """A new contiguous tensor of ``t``'s shape, dtype and device (an output; also the fake impls' result)."""
    return torch.empty(t.shape, dtype=t.dtype, device=t.device)


def dtype_code(t: torch.Tensor) -> int:
    """The kernels' dtype code (``_C.F32`` / ``F16`` / ``BF16``) of ``t``."""
    return DTYPE_CODE[t.dtype]


def strides(t: torch.Tensor | None) -> object:
    """``_C.Strides`` of an operand: (batch, head, time) of a [B, H, T, D] tensor, (batch, head, 0) of a [B, H, D]
    one, zeros for None."""
    if t is None:
        return ext().Strides()
    s = t.stride()
    return ext().Strides(batch=s[0], head=s[1], time=s[2] if t.dim() == 4 else 0)


def struct_name(kernel: str) -> str:
    """The ``_C`` parameter struct of entry point ``kernel``: ``decode_attention`` -> ``DecodeAttentionParams``."""
    return "".join(word.capitalize() for word in kernel.split("_")) + "Params"


def make_params(kernel: str, **fields: object) -> object:
    """A ``_C.<Kernel>Params`` with every given field set by name (an unknown name raises ``AttributeError``)."""
    params = getattr(ext(), struct_name(kernel))()
    for name, value in fields.items():
        setattr(params, name, value)
    return params


@contextmanager
def device_guard(device: int) -> Iterator[None]:
    """Make CUDA device ``device`` current for the block (torch's current device is restored afterwards)."""
    with torch.cuda.device(device):
        yield


def current_stream(device: int) -> int:
    """The current torch CUDA stream of ``device`` as an int (a cudaStream_t)."""
    return torch.cuda.current_stream(device).cuda_stream


def launch(
    kernel: str,
    device: int,
    dtype_of: torch.Tensor,
    tensors: dict[str, torch.Tensor | None],
    strided: dict[str, torch.Tensor | None] | None = None,
    **fields: object,
) -> None:
    """Call entry point ``_C.<kernel>`` under CUDA device ``device`` on its current stream.

    Its parameter struct gets the dtype code of ``dtype_of``, the data pointer of every tensor in ``tensors``
    and ``strided`` under its name (0 for None), for ``strided`` ones also ``<name>_strides``, then ``fields``,
    the stream and the device."""
    for name, t in (strided or {}).items():
        tensors = {**tensors, name: t}
        fields[f"{name}_strides"] = strides(t)
    fields.update({name: ptr(t) for name, t in tensors.items()})
    with device_guard(device):
        params = make_params(kernel, dtype=dtype_code(dtype_of), **fields, stream=current_stream(device), device=device)
        getattr(ext(), kernel)(params)
