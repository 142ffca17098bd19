"""Kernel benchmarks: every registered op on every gpt2fast backend against the strongest baselines.

Everything about an op comes from its spec (``gpt2fast.ops.specs()``, read when a run starts): the cases
(``spec.bench_cases(sweep)``; an op without any is benchmarked on its test shapes), the inputs
(``spec.make_inputs``), the minimal traffic (``spec.traffic``), the slice the parity check covers
(``spec.check_inputs`` / ``spec.check_outputs``) and the other libraries' versions (``spec.baselines``).  The
providers of an op are then every registered backend implementing it (``gpt2fast:<name>``; unavailable ones
recorded with the reason), its baselines, and ``torch.compile`` of its reference.

For each case (op, shape, dtype) the harness builds inputs once, computes the oracle (the reference one
precision up) and the reference in the input dtype on the check slice (for the FlashAttention parity rule),
then times each provider and checks its output.  A case whose shape says ``backward=True`` (inputs that
require grad) times the forward plus the backward of every provider (:func:`with_backward`).  On a GPU each
record also has the peak memory its call allocated (``peak_mem_bytes``).  A provider that cannot run is
recorded with its error; nothing here is fatal.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch

from gpt2fast import ops
from gpt2fast.bench.timing import rotating_copies, sync, time_call
from gpt2fast.ops._spec import BenchCase, Inputs, OpSpec, Provider, Traffic
from gpt2fast.testing import as_list, clone_inputs, fa_check, upcast

#: Prefix of the providers that are gpt2fast's own backends; everything else is a baseline.
OWN = "gpt2fast:"
#: The sweeps every spec's ``bench_cases`` knows.
SWEEPS = ("full", "quick", "cpu")
#: ``group`` of the cases made from an op's test shapes (an op whose spec declares no benchmark cases).
TEST_SHAPES_GROUP = "test shapes"

Fn = Callable[[], object]


class _Declined(Exception):
    """A gpt2fast backend's ``supports`` declines the case's inputs (recorded as skipped, not as an error)."""


# ---- cases ---------------------------------------------------------------------------------------------------
def _test_shape_cases(spec: OpSpec) -> list[BenchCase]:
    """The test shapes of an op that declares no benchmark cases; the x axis is the shape's first int."""
    out = []
    for shape in spec.test_shapes:
        ints = [k for k, v in shape.items() if isinstance(v, int) and not isinstance(v, bool)]
        sweep = ints[0] if ints else next(iter(shape), "")
        out.append(BenchCase(spec.name, dict(shape), sweep, TEST_SHAPES_GROUP))
    return out


def cases(sweep: str, op_names: Sequence[str] | None = None) -> list[BenchCase]:
    """The cases of a sweep over every registered op (or those in ``op_names``): ``"full"`` (GPT-2 small..xl
    on a GPU), ``"quick"`` (a subset, the performance targets first) or ``"cpu"`` (tiny)."""
    if sweep not in SWEEPS:
        raise ValueError(f"sweep must be 'full', 'quick' or 'cpu', got {sweep!r}")
    specs = ops.specs() if op_names is None else [ops.get_spec(name) for name in op_names]
    out = [case for spec in specs for case in (spec.bench_cases(sweep) or _test_shape_cases(spec))]
    if sweep == "quick":
        return sorted(out, key=lambda case: not case.target)  # a time-boxed run measures the targets first
    return out


# ---- inputs, traffic, parity ---------------------------------------------------------------------------------
def make_inputs(case: BenchCase, dtype: torch.dtype, device: torch.device, seed: int = 0) -> Inputs:
    """Seeded inputs of ``case`` from its op's spec."""
    spec = ops.get_spec(case.op)
    return spec.make_inputs(case.shape, dtype, device, torch.Generator().manual_seed(seed))


def input_bytes(inputs: Inputs) -> int:
    """Total bytes of the tensors of a set of inputs."""
    return sum(t.numel() * t.element_size() for t in inputs.values() if isinstance(t, torch.Tensor))


def traffic(case: BenchCase, dtype: torch.dtype) -> Traffic:
    """Minimal bytes, FLOPs and extra figures of one call of ``case`` (its spec's ``traffic``)."""
    return ops.get_spec(case.op).traffic(case.shape, dtype)


def reference_outputs(case: BenchCase, inputs: Inputs) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """(the oracle, the reference in the input dtype) on the spec's check slice of ``inputs`` (forward only)."""
    spec = ops.get_spec(case.op)
    sub = {
        k: (t.detach() if isinstance(t, torch.Tensor) else t) for k, t in spec.check_inputs(case.shape, inputs).items()
    }
    with torch.no_grad():
        return spec.run_reference(upcast(clone_inputs(sub))), spec.run_reference(clone_inputs(sub))


def with_backward(fn: Fn, inputs: Inputs) -> Fn:
    """For a case timed forward + backward (its shape has ``backward=True`` and its inputs require grad): ``fn``
    then the gradients of its floating outputs (upstream gradient ones) with respect to every input that requires
    grad; returns the detached outputs."""
    leaves = [t for t in inputs.values() if isinstance(t, torch.Tensor) and t.requires_grad]

    def run():
        outs = [o for o in as_list(fn()) if o.requires_grad]
        torch.autograd.grad(outs, leaves, [torch.ones_like(o) for o in outs], allow_unused=True)
        return [o.detach() for o in outs]

    return run


def peak_memory(fn: Fn, device: torch.device) -> tuple[object, int | None]:
    """``(fn(), the peak bytes it allocated above what was allocated before the call)`` on a CUDA device (the
    caching allocator's peak counter); ``None`` elsewhere."""
    if device.type != "cuda":
        return fn(), None
    torch.cuda.synchronize(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    out = fn()
    torch.cuda.synchronize(device)
    return out, torch.cuda.max_memory_allocated(device) - base


def check_output(case: BenchCase, out: object, ref32: list[torch.Tensor], base: list[torch.Tensor]) -> dict:
    """FlashAttention-rule check of a provider's output: ok, and the worst error/bound over its outputs."""
    outs = ops.get_spec(case.op).check_outputs(case.shape, as_list(out))
    if len(outs) != len(ref32):
        return {"ok": False, "err": None, "bound": None, "baseline_err": None, "note": "wrong number of outputs"}
    results = [fa_check(o, r, b) for o, r, b in zip(outs, ref32, base)]
    worst = max(results, key=lambda r: r.err - r.bound)
    ok = all(r.ok for r in results)
    return {"ok": ok, "err": worst.err, "bound": worst.bound, "baseline_err": worst.baseline_err}


# ---- providers -----------------------------------------------------------------------------------------------
def _own(spec: OpSpec, backend: str) -> Provider:
    """gpt2fast's op on a named backend (a shape the backend declines is skipped, not timed)."""

    def make(inp: Inputs) -> Fn:
        reason = ops.supported(spec.name, backend, *(inp[a] for a in spec.args))
        if reason is not None:
            raise _Declined(f"skipped: {backend} does not support this input: {reason}")
        return lambda: spec.call(inp, backend)

    return make


def _compiled(spec: OpSpec) -> Provider:
    """``torch.compile`` of the op's reference, default settings (automatic dynamic shapes after the
    second shape).  The recompile limit is raised so that a long sweep never falls back to eager."""
    import torch._dynamo.config as dynamo_config

    for name in ("recompile_limit", "cache_size_limit"):
        if isinstance(getattr(dynamo_config, name, None), int):
            setattr(dynamo_config, name, max(getattr(dynamo_config, name), 256))
    compiled = torch.compile(spec.reference)
    return lambda inp: lambda: compiled(*(inp[a] for a in spec.args))


def providers(op: str, device: torch.device, compile_baseline: bool = True) -> dict[str, Provider | str]:
    """Providers of ``op`` on ``device``: name -> factory, or name -> reason it cannot run here.

    Every registered backend implementing the op (``gpt2fast:<name>``, by priority), the spec's baselines, and
    ``torch.compile`` of the reference.
    """
    spec = ops.get_spec(op)
    out: dict[str, Provider | str] = {}
    for row in ops.implementations(device):
        if row.op == op:
            out[OWN + row.backend] = _own(spec, row.backend) if row.reason is None else f"unavailable: {row.reason}"
    out.update(spec.baselines(device))
    out["torch.compile"] = (
        _compiled(spec) if compile_baseline else "skipped: the torch.compile baseline is off (--compile times it)"
    )
    return out


# ---- running -------------------------------------------------------------------------------------------------
@dataclass
class Options:
    """What to run: ops (None: every registered op), dtypes, sweep, and whether to time torch.compile."""

    ops: tuple[str, ...] | None = None
    dtypes: tuple[torch.dtype, ...] = (torch.float16,)
    sweep: str = "quick"
    compile_baseline: bool = True
    quick_timing: bool = False
    providers: tuple[str, ...] | None = None  # a subset of provider names (None: all)
    seed: int = 0
    log: Callable[[str], None] = field(default=print)


def _record(case: BenchCase, provider: str, dtype: torch.dtype, cost: Traffic) -> dict:
    return {
        "op": case.op,
        "provider": provider,
        "dtype": str(dtype).replace("torch.", ""),
        "shape": dict(case.shape),
        "sweep": case.sweep,
        "group": case.group,
        "error": None,
        "time": None,
        "bytes": cost.bytes,
        "flops": cost.flops,
        "gbps": None,
        "tflops": None,
        "pct_copy_bw": None,
        "pct_matmul_peak": None,
        "speedup": {},
        "check": None,
        "peak_mem_bytes": None,
        **cost.extra,
    }


def _derive(rec: dict, peaks: dict | None, extra: dict) -> None:
    """Fill GB/s, TFLOP/s and the fractions of the measured peaks from the median time.  Every extra byte
    count of the spec's traffic, ``<part>_bytes``, gets its own ``<part>_gbps`` and ``pct_copy_bw_<part>``
    (decode attention's ``kv_bytes``: the KV-cache reads alone)."""
    sec = rec["time"]["median_ms"] * 1e-3
    rec["gbps"] = rec["bytes"] / sec / 1e9
    if rec["flops"]:
        rec["tflops"] = rec["flops"] / sec / 1e12
    parts = [key[: -len("_bytes")] for key in extra if key.endswith("_bytes")]
    for part in parts:
        rec[f"{part}_gbps"] = rec[f"{part}_bytes"] / sec / 1e9
    if peaks:
        rec["pct_copy_bw"] = 100.0 * rec["gbps"] / peaks["copy_gbps"]
        for part in parts:
            rec[f"pct_copy_bw_{part}"] = 100.0 * rec[f"{part}_gbps"] / peaks["copy_gbps"]
        if rec["tflops"] is not None:
            rec["pct_matmul_peak"] = 100.0 * rec["tflops"] / peaks["matmul_tflops"]


def _error_text(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}"
    return text if len(text) < 500 else text[:497] + "..."


def run_case(
    case: BenchCase, dtype: torch.dtype, device: torch.device, opts: Options, peaks: dict | None, provs: dict
) -> list[dict]:
    """Time and check every provider on one case; returns one record per provider."""
    inputs = make_inputs(case, dtype, device, opts.seed)
    cost = traffic(case, dtype)
    ref32, base = reference_outputs(case, inputs)
    records = []
    for name, prov in provs.items():
        if opts.providers is not None and name not in opts.providers:
            continue
        rec = _record(case, name, dtype, cost)
        records.append(rec)
        if isinstance(prov, str):
            rec["error"] = prov
            continue
        try:
            fn = prov(inputs)
            graph_fns = _graph_fns(prov, inputs, fn, device)
            if case.shape.get("backward"):
                fn, graph_fns = with_backward(fn, inputs), None  # no CUDA graphs around autograd
            out, rec["peak_mem_bytes"] = peak_memory(fn, device)
            sync(device)
            rec["check"] = check_output(case, out, ref32, base)
            del out
            rec["time"] = time_call(fn, device, graph_fns, opts.quick_timing).as_dict()
            _derive(rec, peaks, cost.extra)
        except _Declined as exc:
            rec["error"] = str(exc)
        except Exception as exc:  # a provider failing is data, not a crash
            rec["error"] = _error_text(exc)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
    _speedups(records)
    return records


def _graph_fns(prov: Provider, inputs: Inputs, fn: Fn, device: torch.device):
    """For CUDA-graph timing: the call on enough copies of the inputs that each replayed call reads cold data."""
    if device.type != "cuda":
        return None

    def make() -> list[Fn]:
        n = rotating_copies(input_bytes(inputs), device)
        return [fn] + [prov(clone_inputs(inputs)) for _ in range(n - 1)]

    return make


def _speedups(records: list[dict]) -> None:
    """Each gpt2fast provider's speedup over every baseline that ran (gpt2fast:reference counts as one)."""
    timed = {r["provider"]: r["time"]["median_ms"] for r in records if r["time"]}
    baselines = {p: t for p, t in timed.items() if not p.startswith(OWN) or p == OWN + ops.REFERENCE}
    for rec in records:
        if rec["time"] and rec["provider"].startswith(OWN):
            rec["speedup"] = {p: t / rec["time"]["median_ms"] for p, t in baselines.items() if p != rec["provider"]}


def iter_records(device: torch.device, opts: Options, peaks: dict | None) -> Iterator[dict]:
    """Run the selected sweep case by case, yielding records as they are produced."""
    op_names = tuple(s.name for s in ops.specs()) if opts.ops is None else opts.ops
    selected = cases(opts.sweep, op_names)
    provs = {op: providers(op, device, opts.compile_baseline) for op in op_names}
    for i, case in enumerate(selected):
        spec_dtypes = ops.get_spec(case.op).dtypes
        for dtype in opts.dtypes:
            if dtype not in spec_dtypes:
                continue
            opts.log(f"[{i + 1}/{len(selected)}] {case.op} {case.shape} {dtype}")
            try:
                yield from run_case(case, dtype, device, opts, peaks, provs[case.op])
            except Exception as exc:  # inputs or the reference itself failed (e.g. out of memory)
                rec = _record(case, "(case)", dtype, traffic(case, dtype))
                rec["error"] = _error_text(exc)
                yield rec
            if device.type == "cuda":
                torch.cuda.empty_cache()
