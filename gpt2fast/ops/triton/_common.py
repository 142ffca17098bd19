"""Helpers shared by the Triton kernels: interpreter detection, the autotune switch and :func:`launch`, the
upcasting switch, ``tanh`` and GPT-2's GELU built from ``tl.exp``, programmatic dependent launch
(:func:`use_pdl`), the zeroed arrival counters of the last-arriving-program reductions (:func:`counters`,
:func:`arrive`), and the compile-case record used by ``benchmarks/compile_check.py``.  The configs themselves
(tiles, spill sets, heuristics) are in ``_tuning``.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from gpt2fast.ops._workspace import counters  # noqa: F401  (re-exported for the kernel modules)

#: Triton type strings of the torch dtypes the kernels accept.
TL_DTYPE: dict[torch.dtype, str] = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``).

    Triton decides this when a kernel is decorated, so it must be set before this
    package is imported; we read the same knob Triton reads.
    """
    knobs = getattr(triton, "knobs", None)
    if knobs is not None and hasattr(knobs, "runtime"):
        return bool(knobs.runtime.interpret)
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def autotune_enabled() -> bool:
    """Autotuning is on unless ``GPT2FAST_AUTOTUNE=0`` or under the interpreter (fixed configs there)."""
    return not interpreting() and os.environ.get("GPT2FAST_AUTOTUNE", "1") != "0"


def upcast_for_interpreter(dtype: torch.dtype) -> bool:
    """Whether a kernel must convert loaded values to fp32 before any arithmetic or ``tl.dot``.

    Triton's interpreter computes garbage for bf16 arithmetic and bf16 ``tl.dot``; on a GPU
    the kernels keep bf16/fp16 ``tl.dot`` operands (fp32 accumulation either way).
    """
    return interpreting() and dtype == torch.bfloat16


def dot_precision(dtype: torch.dtype, upcast: bool) -> str:
    """``tl.dot`` input precision: full fp32 ("ieee") for fp32 operands, so fp32 is not silently tf32."""
    return "ieee" if dtype == torch.float32 or upcast else "tf32"


@functools.cache
def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors on ``device`` (132, an H100/H200, when it is not a GPU)."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 132


def next_pow2(n: int) -> int:
    """Smallest power of two >= ``n``."""
    return triton.next_power_of_2(n)


def int32_span_reason(name: str, t: torch.Tensor, dims: tuple[int, ...]) -> str | None:
    """Why ``t`` cannot be indexed by the kernels, or None: every offset inside one (batch, head) slice of ``t``
    must fit in int32.

    The kernels index a slice (the ``dims`` axes, e.g. T and D) with 32-bit arithmetic and only
    the batch/head offsets with 64-bit; a view with enormous strides would silently wrap.
    """
    span = sum((t.shape[d] - 1) * t.stride(d) for d in dims)
    if span >= 2**31:
        return (
            f"{name} has strides {tuple(t.stride())} for shape {tuple(t.shape)}: offsets within one (batch, head) "
            f"slice reach {span} elements, but the triton kernels index a slice with int32 (< 2**31); "
            "pass a contiguous tensor"
        )
    return None


@triton.jit
def tanh(x):
    """tanh as 2·σ(2x) − 1 with σ written out with ``tl.exp`` (libdevice tanh and ``tl.sigmoid``
    fail under the interpreter); saturates cleanly to ±1 since exp overflows to inf, never NaN."""
    return 2.0 / (1.0 + tl.exp(-2.0 * x)) - 1.0


@triton.jit
def gelu_tanh(u):
    """GPT-2's "gelu_new" of fp32 ``u``: 0.5·u·(1 + tanh(√(2/π)·(u + 0.044715·u³)))."""
    return 0.5 * u * (1.0 + tanh(0.7978845608028654 * (u + 0.044715 * u * u * u)))


# ---- last-arriving-program reductions ---------------------------------------------------------------------------
@triton.jit
def arrive(Counter, count):
    """Signal that this program's earlier stores are done; True in the program that arrives last of ``count``.

    A CTA barrier orders every thread's stores before one acq_rel atomic at GPU scope (release: the stores are
    visible to whoever acquires the count; acquire: the last one then sees everybody's).  The last program must
    read the others' data with ``cache_modifier=".cg"`` (L2, never a stale L1 line) and reset the counter to 0
    (``tl.atomic_xchg``), so the next launch, or a CUDA-graph replay, finds it zeroed.  Which program is last
    varies from run to run; a reduction it performs in a fixed order does not, so results stay bit-identical.
    """
    tl.debug_barrier()
    ticket = tl.atomic_add(Counter, 1, sem="acq_rel", scope="gpu")
    return ticket == count - 1


# ---- programmatic dependent launch ------------------------------------------------------------------------------
@functools.cache
def _pdl_capable(device: torch.device) -> bool:
    return torch.cuda.get_device_capability(device)[0] >= 9


def use_pdl(device: torch.device) -> bool:
    """Whether kernels that support it launch with programmatic dependent launch on ``device``: sm_90 or newer
    (``griddepcontrol``), not interpreted, and ``GPT2FAST_PDL`` not ``0``.

    Such a kernel calls ``gdc_launch_dependents`` and then ``gdc_wait`` before it touches any memory another
    kernel writes, so the next kernel's launch and set-up overlap this one's tail (unverified on a GPU).
    """
    if device.type != "cuda" or interpreting() or os.environ.get("GPT2FAST_PDL", "1") == "0":
        return False
    return _pdl_capable(device)


@dataclass(frozen=True)
class CompileCase:
    """One kernel specialisation that the backend can launch, for the offline compile check.

    ``signature`` maps every argument name to a Triton type string (``"*fp16"``, ``"i32"``,
    ``"fp32"``, or ``"constexpr"``); ``constexprs`` holds the constexpr values.
    """

    kernel: str  # readable name, e.g. "attention"
    fn: object  # the @triton.jit function (not the autotuner)
    signature: dict[str, str]
    constexprs: dict[str, object]
    num_warps: int
    num_stages: int
    label: str  # config description for the table
    heuristic: bool = False  # the config used when autotuning is off (must fit on the device)


def signature(fn: triton.JITFunction, types: dict[str, str], constexprs: dict[str, object]) -> dict[str, str]:
    """Full signature of ``fn``: ``types`` for runtime args, ``"constexpr"`` for the constexprs, in order."""
    sig = {}
    for name in fn.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name in types:
            sig[name] = types[name]
        else:
            raise KeyError(f"{fn.__name__}: no type given for argument {name!r}")
    return sig


def launch(
    kernel: triton.JITFunction,
    tuned: triton.runtime.Autotuner | None,
    grid: tuple[int, ...] | Callable[[dict], tuple[int, ...]],
    args: tuple,
    consts: dict,
    config: triton.Config,
    **options: object,
) -> None:
    """Launch ``kernel`` on ``grid``: through its autotuner ``tuned`` when autotuning is on,
    else with the deterministic heuristic ``config`` (also the interpreter's fixed config).  ``options`` are
    launch options (``launch_pdl=True``).

    Triton launches on the current CUDA device, so the launch runs under the first tensor argument's device.
    """
    device = next((a.device for a in args if isinstance(a, torch.Tensor)), None)
    on_device = torch.cuda.device(device) if device is not None and device.type == "cuda" else nullcontext()
    with on_device:
        if tuned is not None and autotune_enabled():
            tuned[grid](*args, **consts, **options)
        else:
            kernel[grid](
                *args, **consts, **config.kwargs, num_warps=config.num_warps, num_stages=config.num_stages, **options
            )


# ---- the column sums of the backward kernels' per-program partial sums ---------------------------------------
@triton.jit
def _column_sum_kernel(P, Out, G, M, stride_g, BLOCK_G: tl.constexpr, BLOCK_C: tl.constexpr):
    """``Out[c] = sum_g P[g, c]`` over the rows (``stride_g`` apart) of an fp32 [G, M] buffer, in a fixed order
    (deterministic)."""
    cols = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    rows = tl.arange(0, BLOCK_G)
    acc = tl.zeros([BLOCK_C], dtype=tl.float32)
    for g0 in range(0, G, BLOCK_G):
        r = g0 + rows
        mask = (r[:, None] < G) & (cols[None, :] < M)
        acc += tl.sum(tl.load(P + r[:, None].to(tl.int64) * stride_g + cols[None, :], mask=mask, other=0.0), axis=0)
    tl.store(Out + cols, acc.to(Out.dtype.element_ty), mask=cols < M)


#: Columns per program and rows per step of :func:`column_sums` (every target; it never spills).
COLUMN_SUM_BLOCKS = dict(BLOCK_G=32, BLOCK_C=128)
COLUMN_SUM_WARPS = 4


def column_sums(partials: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The column sums of the fp32 [G, M] ``partials`` (one row per program of a backward kernel; unit column
    stride) in ``dtype``: a second launch instead of atomics, so the sums are the same run to run."""
    g, m = partials.shape
    out = torch.empty(m, dtype=dtype, device=partials.device)
    config = triton.Config(COLUMN_SUM_BLOCKS, num_warps=1 if interpreting() else COLUMN_SUM_WARPS, num_stages=1)
    grid = (triton.cdiv(m, COLUMN_SUM_BLOCKS["BLOCK_C"]),)
    launch(_column_sum_kernel, None, grid, (partials, out, g, m, partials.stride(0)), {}, config)
    return out


def column_sum_cases() -> list[CompileCase]:
    """The column-sum kernel's one config for every output dtype (compiled with the backward kernels' modules)."""
    cases = []
    for tname in TL_DTYPE.values():
        sig = signature(
            _column_sum_kernel, dict(P="*fp32", Out="*" + tname, G="i32", M="i32", stride_g="i32"), COLUMN_SUM_BLOCKS
        )
        label = f"{tname} {COLUMN_SUM_BLOCKS['BLOCK_G']}x{COLUMN_SUM_BLOCKS['BLOCK_C']} w={COLUMN_SUM_WARPS}"
        cases.append(
            CompileCase("column_sum", _column_sum_kernel, sig, COLUMN_SUM_BLOCKS, COLUMN_SUM_WARPS, 1, label, True)
        )
    return cases


def partial_programs(rows: int, device: torch.device) -> int:
    """Programs of a backward kernel that reduces over rows: each keeps its own partial column sums, so about
    four per SM (8 under the interpreter), never more than the rows."""
    return max(1, min(rows, 8 if interpreting() else 4 * num_sms(device)))
