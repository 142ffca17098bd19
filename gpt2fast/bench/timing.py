"""Timing: Triton's ``do_bench`` (L2 flushed) and ``do_bench_cudagraph`` on GPU, a plain timer on CPU.

Every measurement comes back as a :class:`Timing` with the median and the 20th/80th
percentiles in milliseconds, so a CPU run and a GPU run write the same JSON.

Short kernels are launch-bound when timed one eager call at a time (the Python
dispatch, argument validation and any host sync cost more than the kernel).  When
``do_bench`` reports a median under :data:`CUDAGRAPH_BELOW_MS`, the call is re-timed
with ``do_bench_cudagraph``, which captures many calls in one CUDA graph; the eager
median is kept as ``eager_median_ms``.  That path does not flush L2, so the
caller passes *rotating* argument sets (see :func:`rotating_copies`) whose total
size exceeds twice the L2 cache; every captured call then reads cold inputs.
"""

from __future__ import annotations

import inspect
import itertools
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import torch

#: Quantiles every timing reports: median, p20, p80.
QUANTILES = (0.5, 0.2, 0.8)

#: Below this eager median (ms) a GPU call is re-timed inside a CUDA graph (host overhead of tens of
#: microseconds per call would otherwise distort anything up to about this long).
CUDAGRAPH_BELOW_MS = 1.0


@dataclass(frozen=True)
class Timing:
    """Run time of one call in milliseconds: median and spread, and how it was measured."""

    median_ms: float
    p20_ms: float
    p80_ms: float
    timer: str  # "do_bench", "do_bench_cudagraph" or "perf_counter"
    eager_median_ms: float | None = None  # the do_bench median, when a CUDA graph gave the figure

    def as_dict(self) -> dict:
        """The JSON form (the ``time`` object of a record)."""
        return asdict(self)


def _quantile(values: Sequence[float], q: float) -> float:
    """Linear-interpolated quantile, as ``torch.quantile`` / Triton compute it."""
    xs = sorted(values)
    if len(xs) == 1:
        return xs[0]
    pos = q * (len(xs) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def summarize(times_ms: Sequence[float], timer: str) -> Timing:
    """Median/p20/p80 of raw per-call times (ms)."""
    if not times_ms:
        raise ValueError("times_ms must hold at least one measurement")
    return Timing(statistics.median(times_ms), _quantile(times_ms, 0.2), _quantile(times_ms, 0.8), timer)


def time_cpu(fn: Callable[[], object], reps: int = 5, warmup: int = 1, budget_s: float = 2.0) -> Timing:
    """Time ``fn`` with ``time.perf_counter``: ``warmup`` untimed calls, then up to ``reps`` timed ones.

    Stops early once ``budget_s`` seconds of timed calls have elapsed (at least one call is timed).
    """
    for _ in range(warmup):
        fn()
    times: list[float] = []
    start = time.perf_counter()
    for _ in range(max(1, reps)):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
        if time.perf_counter() - start > budget_s:
            break
    return summarize(times, "perf_counter")


def _triton_testing():
    import triton.testing

    return triton.testing


def _call_bench(bench: Callable, fn: Callable[[], object], **kwargs) -> tuple[float, float, float]:
    """Call a Triton bench function for (median, p20, p80) across Triton versions.

    Triton 3.6 and 3.9 both take ``quantiles=``; an older ``do_bench`` without it only
    has ``return_mode``, and then the median is reported for all three.
    """
    params = inspect.signature(bench).parameters
    kwargs = {k: v for k, v in kwargs.items() if k in params}
    if "quantiles" in params:
        out = bench(fn, quantiles=list(QUANTILES), **kwargs)
        med, p20, p80 = (float(v) for v in out)
        return med, p20, p80
    med = float(bench(fn, return_mode="median", **kwargs))
    return med, med, med


#: Makes the same call bound to rotating, cold argument sets (built only when a CUDA graph is used).
GraphFns = Callable[[], Sequence[Callable[[], object]]]


def time_gpu(
    fn: Callable[[], object],
    graph_fns: GraphFns | None = None,
    warmup_ms: int = 25,
    rep_ms: int = 100,
    graph_rep_ms: int = 20,
) -> Timing:
    """Time a CUDA call with ``triton.testing.do_bench`` (L2 flushed before every call).

    If the median is under :data:`CUDAGRAPH_BELOW_MS` and ``graph_fns`` is given, the call
    is re-timed with ``do_bench_cudagraph`` cycling through the calls ``graph_fns()`` makes
    (one per cold argument set); if capture fails the eager figure stays.
    """
    tt = _triton_testing()
    med, p20, p80 = _call_bench(tt.do_bench, fn, warmup=warmup_ms, rep=rep_ms)
    timing = Timing(med, p20, p80, "do_bench")
    if med >= CUDAGRAPH_BELOW_MS or graph_fns is None:
        return timing
    try:
        cycle = itertools.cycle(graph_fns())
        g_med, g_p20, g_p80 = _call_bench(tt.do_bench_cudagraph, lambda: next(cycle)(), rep=graph_rep_ms)
    except Exception:  # capture is not possible for every provider (host syncs, allocator); keep eager
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        return timing
    return Timing(g_med, g_p20, g_p80, "do_bench_cudagraph", med)


def l2_bytes(device: torch.device) -> int:
    """L2 cache size of a CUDA device in bytes (0 on CPU or when unknown)."""
    if device.type != "cuda":
        return 0
    return int(getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 0) or 0)


def rotating_copies(nbytes_per_call: int, device: torch.device, cap: int = 256, max_total: int = 1 << 30) -> int:
    """How many copies of a call's arguments keep a CUDA-graph replay out of L2.

    Enough copies for their total to exceed twice the L2 size, at most ``cap`` and
    ``max_total`` bytes in all; 1 on CPU.
    """
    l2 = l2_bytes(device)
    if l2 == 0 or nbytes_per_call <= 0:
        return 1
    want = -(-2 * l2 // nbytes_per_call) + 1
    return int(max(1, min(want, cap, max(1, max_total // nbytes_per_call))))


def sync(device: torch.device) -> None:
    """Wait for the device (no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_call(
    fn: Callable[[], object],
    device: torch.device,
    graph_fns: GraphFns | None = None,
    quick: bool = False,
) -> Timing:
    """Time ``fn`` on ``device``: :func:`time_gpu` on CUDA, :func:`time_cpu` elsewhere."""
    if device.type == "cuda":
        if quick:
            return time_gpu(fn, graph_fns, warmup_ms=10, rep_ms=40, graph_rep_ms=10)
        return time_gpu(fn, graph_fns, warmup_ms=25, rep_ms=100, graph_rep_ms=40)
    return time_cpu(fn, reps=3 if quick else 5)
