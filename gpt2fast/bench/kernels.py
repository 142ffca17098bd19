"""Kernel benchmarks: every op on every available gpt2fast backend against the strongest baselines.

For each case (op, shape, dtype) the harness builds inputs once, computes the
fp32 reference and PyTorch's own low-precision result on a slice of them (for the
FlashAttention parity rule), then times each provider and checks its output.
A provider that cannot run is recorded with its error; nothing here is fatal.
"""

from __future__ import annotations

import importlib
import random
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from gpt2fast import ops
from gpt2fast.bench import roofline
from gpt2fast.bench.timing import rotating_copies, sync, time_call
from gpt2fast.ops import reference
from gpt2fast.testing import fa_check

OPS = ("layer_norm", "bias_gelu", "attention", "decode_attention")
HEAD_DIM = 64

#: Prefix of the providers that are gpt2fast's own backends; everything else is a baseline.
OWN = "gpt2fast:"


@dataclass(frozen=True)
class Case:
    """One benchmarked shape of one op; ``sweep`` names the x-axis key of ``shape``, ``group`` one plot."""

    op: str
    shape: dict
    sweep: str
    group: str


Inputs = dict[str, torch.Tensor]
Fn = Callable[[], object]
#: A provider turns inputs into a zero-argument call returning the output in gpt2fast's layout.
Provider = Callable[[Inputs], Fn]


# ---- shapes ------------------------------------------------------------------------------
def _rows_cases(op: str, rows: Iterable[int], widths: Iterable[int], residual: Iterable[bool]) -> list[Case]:
    out = []
    for n in widths:
        for res in residual:
            group = f"N={n}" + (" +residual" if res else "")
            for r in rows:
                shape = {"rows": r, "n": n} | ({"residual": res} if op == "layer_norm" else {})
                out.append(Case(op, shape, "rows", group))
    return out


def _attention_cases(heads: Iterable[tuple[int, int]], ts: Iterable[int]) -> list[Case]:
    return [
        Case("attention", {"batch": b, "heads": h, "seq": t, "head_dim": HEAD_DIM}, "seq", f"B={b} H={h}")
        for b, h in heads
        for t in ts
    ]


def _decode_case(batch: int, heads: int, cache_len: int, sweep: str, group: str, ragged: bool = False) -> Case:
    shape = {"batch": batch, "heads": heads, "cache_len": cache_len, "head_dim": HEAD_DIM, "ragged": ragged}
    return Case("decode_attention", shape, sweep, group)


def cases(sweep: str) -> list[Case]:
    """The cases of a sweep: ``"full"`` (GPT-2 small..xl on a GPU), ``"quick"`` or ``"cpu"`` (tiny)."""
    if sweep == "full":
        rows = [1, 64, 512, 2048, 8192, 16384, 32768, 65536]
        c = _rows_cases("layer_norm", rows, [768, 1024, 1280, 1600], [False, True])
        c += _rows_cases("bias_gelu", rows, [3072, 4096, 5120, 6400], [False])
        c += _attention_cases([(1, 12), (4, 12), (1, 25), (4, 25)], [128, 256, 512, 1024, 2048, 4096, 8192])
        lens = [128, 512, 1024, 2048, 4096, 8192]
        c += [_decode_case(8, 12, n, "cache_len", "B=8 H=12") for n in lens]
        c += [_decode_case(1, 25, n, "cache_len", "B=1 H=25") for n in lens]
        c += [_decode_case(b, 12, 1024, "batch", "L=1024 H=12") for b in (1, 4, 16, 64, 256)]
        c += [_decode_case(b, 12, 8192, "batch", "ragged Lmax=8192 H=12", True) for b in (4, 16, 64, 256)]
        return c
    if sweep == "quick":
        rows = [1, 1024, 16384, 65536]
        c = _rows_cases("layer_norm", rows, [768, 1600], [False, True])
        c += _rows_cases("bias_gelu", rows, [3072, 6400], [False])
        c += _attention_cases([(4, 12)], [256, 1024, 2048, 4096, 8192])
        c += _attention_cases([(1, 25)], [1024, 4096])
        c += [_decode_case(8, 12, n, "cache_len", "B=8 H=12") for n in (512, 2048, 8192)]
        c += [_decode_case(b, 12, 1024, "batch", "L=1024 H=12") for b in (1, 64, 256)]
        c += [_decode_case(64, 12, 8192, "batch", "ragged Lmax=8192 H=12", True)]
        return sorted(c, key=lambda case: not is_target(case))  # a time-boxed run measures the targets first
    if sweep == "cpu":
        rows = [1, 7, 64]
        c = _rows_cases("layer_norm", rows, [48, 100], [False, True])
        c += _rows_cases("bias_gelu", rows, [192, 400], [False])
        c += _attention_cases([(1, 2)], [1, 17, 64])
        c += [_decode_case(2, 2, n, "cache_len", "B=2 H=2") for n in (0, 16, 33)]
        c += [_decode_case(3, 2, 40, "batch", "ragged Lmax=40 H=2", True)]
        return c
    raise ValueError(f"sweep must be 'full', 'quick' or 'cpu', got {sweep!r}")


def is_target(case: Case) -> bool:
    """Whether a case is one the performance targets are stated for (see benchmarks/README.md)."""
    s = case.shape
    if case.op in ("layer_norm", "bias_gelu"):
        return s["rows"] >= 16384
    if case.op == "attention":
        return 1024 <= s["seq"] <= 4096
    return s["cache_len"] >= 4096


# ---- inputs ------------------------------------------------------------------------------
def decode_seqlens(case: Case) -> list[int]:
    """Cached lengths of a decode case: all ``cache_len``, or seeded-random in [0, cache_len) when ragged."""
    s = case.shape
    if not s["ragged"]:
        return [s["cache_len"]] * s["batch"]
    rng = random.Random(1234 + s["batch"])
    return [rng.randrange(0, s["cache_len"]) for _ in range(s["batch"])]


def make_inputs(case: Case, dtype: torch.dtype, device: torch.device, seed: int = 0) -> Inputs:
    """Random inputs of ``case`` (decode caches hold one spare slot for the appended token)."""
    g = torch.Generator(device="cpu").manual_seed(seed)

    def rnd(*shape: int, scale: float = 1.0) -> torch.Tensor:
        return (torch.randn(*shape, generator=g) * scale).to(device=device, dtype=dtype)

    s = case.shape
    if case.op == "layer_norm":
        inp = {"x": rnd(s["rows"], s["n"]), "weight": 1 + rnd(s["n"], scale=0.1), "bias": rnd(s["n"], scale=0.1)}
        if s["residual"]:
            inp["residual"] = rnd(s["rows"], s["n"])
        return inp
    if case.op == "bias_gelu":
        return {"x": rnd(s["rows"], s["n"]), "bias": rnd(s["n"], scale=0.1)}
    if case.op == "attention":
        shape = (s["batch"], s["heads"], s["seq"], s["head_dim"])
        return {"q": rnd(*shape), "k": rnd(*shape), "v": rnd(*shape)}
    if case.op == "decode_attention":
        b, h, d = s["batch"], s["heads"], s["head_dim"]
        t_max = s["cache_len"] + 1
        seqlens = torch.tensor(decode_seqlens(case), dtype=torch.int32, device=device)
        return {
            "q": rnd(b, h, d),
            "k_cache": rnd(b, h, t_max, d),
            "v_cache": rnd(b, h, t_max, d),
            "cache_seqlens": seqlens,
            "k_new": rnd(b, h, d),
            "v_new": rnd(b, h, d),
        }
    raise ValueError(f"unknown op {case.op!r}")


def input_bytes(inputs: Inputs) -> int:
    """Total bytes of a set of inputs."""
    return sum(t.numel() * t.element_size() for t in inputs.values())


def clone_inputs(inputs: Inputs) -> Inputs:
    """Independent copies of every input tensor."""
    return {k: v.clone() for k, v in inputs.items()}


# ---- traffic -----------------------------------------------------------------------------
def traffic(case: Case, dtype: torch.dtype) -> tuple[int, float | None, dict]:
    """(bytes, FLOPs or None, extra figures) of one call of ``case``."""
    s = case.shape
    if case.op == "layer_norm":
        return roofline.layer_norm_bytes(s["rows"], s["n"], dtype, s["residual"]), None, {}
    if case.op == "bias_gelu":
        return roofline.bias_gelu_bytes(s["rows"], s["n"], dtype), None, {}
    if case.op == "attention":
        b, h, t, d = s["batch"], s["heads"], s["seq"], s["head_dim"]
        return roofline.attention_bytes(b, h, t, d, dtype), roofline.attention_flops(b, h, t, d, True), {}
    seqlens = decode_seqlens(case)
    h, d = s["heads"], s["head_dim"]
    nbytes = roofline.decode_attention_bytes(h, d, seqlens, dtype, append=True)
    flops = roofline.decode_attention_flops(h, d, seqlens, append=True)
    return nbytes, flops, {"kv_bytes": roofline.decode_kv_bytes(h, d, seqlens, dtype)}


# ---- correctness -------------------------------------------------------------------------
def _check_view(case: Case, out: object) -> list[torch.Tensor]:
    """The slice of a provider's output that the parity check covers (see :func:`_check_inputs`)."""
    outs = list(out) if isinstance(out, (tuple, list)) else [out]
    s = case.shape
    if case.op in ("layer_norm", "bias_gelu"):
        return [o[: min(s["rows"], 4096)] for o in outs]
    if case.op == "attention":
        return [o[:1, : _check_heads(case)] for o in outs]
    return [o[: min(s["batch"], 8)] for o in outs]


def _check_heads(case: Case) -> int:
    t = case.shape["seq"]
    return max(1, min(case.shape["heads"], (1 << 28) // (t * t)))  # keeps the fp32 score matrix under 1 GiB


def _check_inputs(case: Case, inputs: Inputs) -> Inputs:
    """A slice of the inputs small enough for the fp32 reference (rows, heads, batch are independent)."""
    s = case.shape
    if case.op in ("layer_norm", "bias_gelu"):
        r = min(s["rows"], 4096)
        return {k: (v[:r] if k in ("x", "residual") else v) for k, v in inputs.items()}
    if case.op == "attention":
        return {k: v[:1, : _check_heads(case)] for k, v in inputs.items()}
    b = min(s["batch"], 8)
    return {k: v[:b] for k, v in inputs.items()}


def _run_reference(op: str, inp: Inputs) -> list[torch.Tensor]:
    inp = clone_inputs(inp)  # decode appends into the caches
    out = getattr(reference, op)(**inp)
    return list(out) if isinstance(out, tuple) else [out]


def reference_outputs(case: Case, inputs: Inputs) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """(fp32 reference, PyTorch's result in the input dtype) on the check slice."""
    sub = _check_inputs(case, inputs)
    ref32 = _run_reference(case.op, {k: (v.float() if v.is_floating_point() else v) for k, v in sub.items()})
    base = _run_reference(case.op, sub)
    return ref32, base


def check_output(case: Case, out: object, ref32: list[torch.Tensor], base: list[torch.Tensor]) -> dict:
    """FlashAttention-rule check of a provider's output: ok, and the worst error/bound over its outputs."""
    outs = _check_view(case, out)
    if len(outs) != len(ref32):
        return {"ok": False, "err": None, "bound": None, "baseline_err": None, "note": "wrong number of outputs"}
    results = [fa_check(o, r, b) for o, r, b in zip(outs, ref32, base)]
    worst = max(results, key=lambda r: r.err - r.bound)
    ok = all(r.ok for r in results)
    return {"ok": ok, "err": worst.err, "bound": worst.bound, "baseline_err": worst.baseline_err}


# ---- providers ---------------------------------------------------------------------------
def _own(op: str, backend: str) -> Provider:
    fn = getattr(ops, op)
    return lambda inp: lambda: fn(**inp, backend=backend)


def _eager_layer_norm(inp: Inputs) -> Fn:
    x, w, b, res = inp["x"], inp["weight"], inp["bias"], inp.get("residual")
    n = (x.shape[-1],)
    if res is None:
        return lambda: F.layer_norm(x, n, w, b, 1e-5)

    def run():
        h = x + res
        return F.layer_norm(h, n, w, b, 1e-5), h

    return run


def _eager_bias_gelu(inp: Inputs) -> Fn:
    x, b = inp["x"], inp["bias"]
    return lambda: F.gelu(x + b, approximate="tanh")


def _compiled(op: str) -> Provider:
    """``torch.compile`` of the reference op, default settings (automatic dynamic shapes after the
    second shape).  The recompile limit is raised so that a long sweep never falls back to eager."""
    import torch._dynamo.config as dynamo_config

    for name in ("recompile_limit", "cache_size_limit"):
        if isinstance(getattr(dynamo_config, name, None), int):
            setattr(dynamo_config, name, max(getattr(dynamo_config, name), 256))
    compiled = torch.compile(getattr(reference, op))
    return lambda inp: lambda: compiled(**inp)


def _sdpa(backend_name: str | None) -> Provider:
    def make(inp: Inputs) -> Fn:
        q, k, v = inp["q"], inp["k"], inp["v"]
        if backend_name is None:
            return lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True)
        from torch.nn.attention import SDPBackend, sdpa_kernel

        be = getattr(SDPBackend, backend_name)

        def run():
            with sdpa_kernel(be):
                return F.scaled_dot_product_attention(q, k, v, is_causal=True)

        return run

    return make


def _sdpa_decode(inp: Inputs) -> Fn:
    """What transformers' static cache does: write the new K/V in, then masked SDPA over the whole cache."""
    q, kc, vc, lens, kn, vn = (inp[k] for k in ("q", "k_cache", "v_cache", "cache_seqlens", "k_new", "v_new"))
    pos = torch.arange(kc.shape[2], device=q.device)

    def run():
        reference.append_kv(kc, vc, lens, kn, vn)
        mask = (pos[None, :] <= lens[:, None])[:, None, None, :]  # [B, 1, 1, T_max]
        return F.scaled_dot_product_attention(q[:, :, None], kc, vc, attn_mask=mask)[:, :, 0]

    return run


def _flash_attn(inp: Inputs) -> Fn:
    from flash_attn import flash_attn_func

    q, k, v = (inp[n].transpose(1, 2).contiguous() for n in ("q", "k", "v"))  # [B, T, H, D]
    return lambda: flash_attn_func(q, k, v, causal=True).transpose(1, 2)


def _flash_attn_kvcache(inp: Inputs) -> Fn:
    from flash_attn import flash_attn_with_kvcache

    q = inp["q"][:, None]  # [B, 1, H, D]
    kc, vc = (inp[n].transpose(1, 2).contiguous() for n in ("k_cache", "v_cache"))  # [B, T, H, D]
    kn, vn = inp["k_new"][:, None], inp["v_new"][:, None]
    lens = inp["cache_seqlens"]
    return lambda: flash_attn_with_kvcache(q, kc, vc, k=kn, v=vn, cache_seqlens=lens, causal=True)[:, 0]


def _has_module(name: str) -> bool:
    try:
        importlib.import_module(name)
    except Exception:
        return False
    return True


def providers(op: str, device: torch.device, compile_baseline: bool = True) -> dict[str, Provider | str]:
    """Providers of ``op`` on ``device``: name -> factory, or name -> reason it cannot run here."""
    out: dict[str, Provider | str] = {}
    for status in ops.available_backends(device):
        out[OWN + status.name] = _own(op, status.name) if status.available else f"unavailable: {status.reason}"
    if op == "layer_norm":
        out["torch"] = _eager_layer_norm
    elif op == "bias_gelu":
        out["torch"] = _eager_bias_gelu
    elif op == "attention":
        out["torch.sdpa"] = _sdpa(None)
        if device.type == "cuda":
            for name in ("FLASH_ATTENTION", "CUDNN_ATTENTION", "EFFICIENT_ATTENTION"):
                out["torch.sdpa:" + name.split("_")[0].lower()] = _sdpa(name)
        if device.type == "cuda" and _has_module("flash_attn"):
            out["flash_attn"] = _flash_attn
    else:
        out["torch.sdpa"] = _sdpa_decode
        if device.type == "cuda" and _has_module("flash_attn"):
            out["flash_attn"] = _flash_attn_kvcache
    out["torch.compile"] = (
        _compiled(op) if compile_baseline else "skipped: the torch.compile baseline is off (--compile times it)"
    )
    return out


# ---- running -----------------------------------------------------------------------------
@dataclass
class Options:
    """What to run: ops, dtypes, sweep, and whether to time the torch.compile baseline."""

    ops: tuple[str, ...] = OPS
    dtypes: tuple[torch.dtype, ...] = (torch.float16,)
    sweep: str = "quick"
    compile_baseline: bool = True
    quick_timing: bool = False
    providers: tuple[str, ...] | None = None  # a subset of provider names (None: all)
    seed: int = 0
    log: Callable[[str], None] = field(default=print)


def _record(case: Case, provider: str, dtype: torch.dtype, nbytes: int, flops: float | None, extra: dict) -> dict:
    return {
        "op": case.op,
        "provider": provider,
        "dtype": str(dtype).replace("torch.", ""),
        "shape": dict(case.shape),
        "sweep": case.sweep,
        "group": case.group,
        "error": None,
        "time": None,
        "bytes": nbytes,
        "flops": flops,
        "gbps": None,
        "tflops": None,
        "pct_copy_bw": None,
        "pct_matmul_peak": None,
        "speedup": {},
        "check": None,
        **extra,
    }


def _derive(rec: dict, peaks: dict | None) -> None:
    """Fill GB/s, TFLOP/s and the fractions of the measured peaks from the median time."""
    sec = rec["time"]["median_ms"] * 1e-3
    rec["gbps"] = rec["bytes"] / sec / 1e9
    if rec["flops"]:
        rec["tflops"] = rec["flops"] / sec / 1e12
    if "kv_bytes" in rec:
        rec["kv_gbps"] = rec["kv_bytes"] / sec / 1e9
    if peaks:
        rec["pct_copy_bw"] = 100.0 * rec["gbps"] / peaks["copy_gbps"]
        if "kv_gbps" in rec:
            rec["pct_copy_bw_kv"] = 100.0 * rec["kv_gbps"] / peaks["copy_gbps"]
        if rec["tflops"] is not None:
            rec["pct_matmul_peak"] = 100.0 * rec["tflops"] / peaks["matmul_tflops"]


def _error_text(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}"
    return text if len(text) < 500 else text[:497] + "..."


def run_case(
    case: Case, dtype: torch.dtype, device: torch.device, opts: Options, peaks: dict | None, provs: dict
) -> list[dict]:
    """Time and check every provider on one case; returns one record per provider."""
    inputs = make_inputs(case, dtype, device, opts.seed)
    nbytes, flops, extra = traffic(case, dtype)
    ref32, base = reference_outputs(case, inputs)
    records = []
    for name, prov in provs.items():
        if opts.providers is not None and name not in opts.providers:
            continue
        rec = _record(case, name, dtype, nbytes, flops, extra)
        records.append(rec)
        if isinstance(prov, str):
            rec["error"] = prov
            continue
        try:
            fn = prov(inputs)
            out = fn()
            sync(device)
            rec["check"] = check_output(case, out, ref32, base)
            del out
            rec["time"] = time_call(fn, device, _graph_fns(prov, inputs, fn, device), opts.quick_timing).as_dict()
            _derive(rec, peaks)
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
    baselines = {p: t for p, t in timed.items() if not p.startswith(OWN) or p == OWN + "reference"}
    for rec in records:
        if rec["time"] and rec["provider"].startswith(OWN):
            rec["speedup"] = {p: t / rec["time"]["median_ms"] for p, t in baselines.items() if p != rec["provider"]}


def iter_records(device: torch.device, opts: Options, peaks: dict | None) -> Iterator[dict]:
    """Run the selected sweep case by case, yielding records as they are produced."""
    selected = [c for c in cases(opts.sweep) if c.op in opts.ops]
    provs = {op: providers(op, device, opts.compile_baseline) for op in opts.ops}
    for i, case in enumerate(selected):
        for dtype in opts.dtypes:
            opts.log(f"[{i + 1}/{len(selected)}] {case.op} {case.shape} {dtype}")
            try:
                yield from run_case(case, dtype, device, opts, peaks, provs[case.op])
            except Exception as exc:  # inputs or the reference itself failed (e.g. out of memory)
                rec = _record(case, "(case)", dtype, *traffic(case, dtype))
                rec["error"] = _error_text(exc)
                yield rec
            if device.type == "cuda":
                torch.cuda.empty_cache()
