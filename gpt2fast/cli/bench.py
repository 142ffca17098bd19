"""``gpt2fast bench kernels``, ``e2e``, ``train`` and ``serve`` (its parser: gpt2fast.bench.serve): handlers.

The benchmarks themselves are the library :mod:`gpt2fast.bench`.  Every handler returns an exit code (0 ok,
1 a provider produced a wrong result or nothing ran); bad arguments raise :class:`UsageError` (exit 2).
"""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path
from types import ModuleType

import torch

from gpt2fast.cli._common import DTYPES as _SHORT_DTYPES
from gpt2fast.cli._common import Subparsers, UsageError, resolve_device

#: ``--dtype`` names: the short ones of every command, and torch's own.
DTYPES = {**_SHORT_DTYPES, "float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def _csv(kind: type, name: str):
    def parse(text: str) -> tuple:
        try:
            values = tuple(kind(v.strip()) for v in text.split(",") if v.strip())
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be a comma-separated list of {kind.__name__}") from None
        if not values:
            raise argparse.ArgumentTypeError(f"{name} must not be empty")
        return values

    return parse


def _dtype_list(text: str) -> tuple[torch.dtype, ...]:
    names = _csv(str, "--dtype")(text)
    bad = [n for n in names if n not in DTYPES]
    if bad:
        raise argparse.ArgumentTypeError(f"--dtype: unknown {bad}; choose from fp32, fp16, bf16")
    return tuple(DTYPES[n] for n in names)


def _bench(module: str) -> ModuleType:
    """``gpt2fast.bench.<module>``, or a clear error when the benchmark library cannot be imported here."""
    name = f"gpt2fast.bench.{module}"
    try:
        return importlib.import_module(name)
    except Exception as exc:  # a missing module or a missing optional dependency
        raise UsageError(f"bench is unavailable: cannot import {name} ({type(exc).__name__}: {exc})") from None


def _shapes(text: str) -> tuple[tuple[int, int], ...]:
    """``--shape 8x1024,32x512`` -> ((8, 1024), (32, 512))."""
    out = []
    for item in _csv(str, "--shape")(text):
        b, _, t = item.lower().partition("x")
        if not (b.isdigit() and t.isdigit()):
            raise argparse.ArgumentTypeError(f"--shape values must be BxT (e.g. 8x1024), got {item!r}")
        out.append((int(b), int(t)))
    return tuple(out)


#: ``--autocast`` names: none, or a lower-precision dtype.
AUTOCAST = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def add_parser(subparsers: Subparsers) -> None:
    """Add ``bench`` with its ``kernels``, ``e2e``, ``train`` and ``serve`` subcommands to the subparsers."""
    bench = subparsers.add_parser("bench", help="kernel, end-to-end and training benchmarks (JSON, plots, tables)")
    sub = bench.add_subparsers(dest="bench_command", metavar="{kernels,e2e,train,serve}", required=True)

    k = sub.add_parser("kernels", help="time every op on every backend against torch / torch.compile / SDPA")
    k.add_argument("--op", type=_csv(str, "--op"), default=None, help="registered ops, comma-separated (default all)")
    k.add_argument("--dtype", type=_dtype_list, default=None, help="fp16,bf16,fp32 (default: fp16; fp32 on CPU)")
    k.add_argument("--quick", action="store_true", help="the short sweep (and shorter timing)")
    k.add_argument("--sweep", choices=["full", "quick", "cpu"], help="override the sweep (default by device)")
    k.add_argument("--provider", type=_csv(str, "--provider"), default=None, help="only these providers")
    k.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="time the torch.compile baseline (default: on for CUDA, off on CPU)")  # fmt: skip
    k.add_argument("--device", default=None, help="cuda or cpu (default: cuda when present)")
    k.add_argument("--json", type=Path, help="write the results document here")
    k.add_argument("--plots", type=Path, help="write PNG plots into this directory")
    k.add_argument("--markdown", type=Path, help="write the markdown summary here")
    k.set_defaults(func=run_kernels)

    e = sub.add_parser("e2e", help="generation: gpt2fast vs transformers (prefill, ms/token, tokens/s)")
    e.add_argument("--size", type=_csv(str, "--size"), default=None, help="gpt2,gpt2-medium,... or tiny")
    e.add_argument("--batch", type=_csv(int, "--batch"), default=None, help="batch sizes, e.g. 1,8,64")
    e.add_argument("--prompt", type=int, default=None, help="prompt length (default 128; 16 on CPU)")
    e.add_argument("--new", type=int, default=None, help="new tokens (default 128; 8 on CPU)")
    e.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default fp16 (fp32 on CPU)")
    e.add_argument("--reps", type=int, default=3, help="timed repetitions per measurement")
    e.add_argument("--provider", type=_csv(str, "--provider"), default=None, help="only these providers")
    e.add_argument("--hf-compile", action=argparse.BooleanOptionalAction, default=True,
                   help="include transformers static cache + torch.compile (CUDA only)")  # fmt: skip
    e.add_argument("--hf-compile-batches", type=_csv(int, "--hf-compile-batches"), default=None,
                   help="batch sizes for the compiled transformers provider (default all)")  # fmt: skip
    e.add_argument("--device", default=None, help="cuda or cpu (default: cuda when present)")
    e.add_argument("--json", type=Path, help="write the results document here")
    e.add_argument("--markdown", type=Path, help="write the markdown summary here")
    e.set_defaults(func=run_e2e)

    t = sub.add_parser("train", help="training step (forward+backward+AdamW): gpt2fast vs transformers")
    t.add_argument("--size", type=_csv(str, "--size"), default=None, help="default gpt2,gpt2-medium (tiny on CPU)")
    t.add_argument("--shape", type=_shapes, default=None, help="BxT list (default 8x1024,32x512; 2x8 on CPU)")
    t.add_argument("--autocast", choices=list(AUTOCAST), default=None, help="default bf16 on CUDA, none on CPU")
    t.add_argument("--dropout", type=float, default=0.0, help="every dropout probability, all providers (0)")
    t.add_argument("--steps", type=int, default=None, help="timed steps (default 10; 2 on CPU)")
    t.add_argument("--warmup", type=int, default=None, help="untimed steps after the first (default 3; 1 on CPU)")
    t.add_argument("--provider", type=_csv(str, "--provider"), default=None, help="only these step providers")
    t.add_argument("--compile-backend", default=None, help="torch.compile backend (default inductor; aot_eager on CPU)")
    t.add_argument("--components", action=argparse.BooleanOptionalAction, default=True,
                   help="also time the loss head (fused vs full logits) and attention backward")  # fmt: skip
    t.add_argument("--device", default=None, help="cuda or cpu (default: cuda when present)")
    t.add_argument("--json", type=Path, help="write the results document here")
    t.add_argument("--markdown", type=Path, help="write the markdown summary here")
    t.set_defaults(func=run_train)

    from gpt2fast.bench import serve  # its parser and handler live with the benchmark (stdlib imports only)

    serve.add_parser(sub)


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _finish(doc: dict, args) -> None:
    results = _bench("results")
    results.validate(doc)
    if args.json:
        results.write_json(doc, args.json)
    if getattr(args, "markdown", None):
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        args.markdown.write_text(_bench("report").markdown(doc))


def _peaks(device: torch.device, quick: bool) -> dict | None:
    try:
        return _bench("roofline").measure_peaks(device, quick).as_dict()
    except Exception as exc:
        _log(f"warning: measuring the device peaks failed ({type(exc).__name__}: {exc}); no % of peak figures")
        return None


def selected_ops(requested: tuple[str, ...] | None) -> tuple[str, ...]:
    """``--op`` (each a registered op, checked against the registry now), or every registered op."""
    from gpt2fast.ops import specs

    names = [s.name for s in specs()]
    bad = [o for o in requested or () if o not in names]
    if bad:
        raise UsageError(f"--op: unknown {bad}; choose from {tuple(names)}")
    return tuple(dict.fromkeys(requested)) if requested else tuple(names)


def run_kernels(args: argparse.Namespace) -> int:
    """Handler of ``bench kernels``: run the sweep, write JSON/plots/markdown, print a table."""
    kernels, results = _bench("kernels"), _bench("results")
    device = resolve_device(args.device)
    op_names = selected_ops(args.op)
    cpu = device.type != "cuda"
    sweep = args.sweep or ("cpu" if cpu else "quick" if args.quick else "full")
    dtypes = args.dtype or ((torch.float32,) if cpu else (torch.float16,))
    compile_baseline = (not cpu) if args.compile is None else args.compile
    opts = kernels.Options(op_names, dtypes, sweep, compile_baseline, args.quick or cpu, args.provider, log=_log)
    peaks = _peaks(device, opts.quick_timing)
    doc = results.new_document("kernels", results.run_metadata(device), peaks)
    doc["meta"]["sweep"] = sweep
    for rec in kernels.iter_records(device, opts, peaks):
        doc["records"].append(rec)
        if args.json:  # keep a valid file on disk as the run goes (a time-boxed run keeps what it measured)
            results.write_json(doc, args.json)
    _finish(doc, args)
    if args.plots:
        try:
            _bench("plots").plot_kernels(doc, args.plots)
        except Exception as exc:
            _log(f"warning: plotting failed: {type(exc).__name__}: {exc}")
    _print_table(doc)
    return _exit_code(doc)


def _exit_code(doc: dict) -> int:
    recs = doc["records"]
    wrong = [r for r in recs if (r.get("check") or {}).get("ok") is False]
    ran = [r for r in recs if r["error"] is None]
    for r in wrong:
        _log(f"WRONG RESULT: {r['op']} {r['provider']} {r['dtype']} {r['shape']}: {r['check']}")
    return 1 if wrong or not ran else 0


def run_e2e(args: argparse.Namespace) -> int:
    """Handler of ``bench e2e``: run generation benchmarks, write JSON/markdown, print a table."""
    from gpt2fast.config import GPT2Config

    e2e, results = _bench("e2e"), _bench("results")
    device = resolve_device(args.device)
    cpu = device.type != "cuda"
    sizes = args.size or (("tiny",) if cpu else ("gpt2",))
    for s in sizes:
        GPT2Config.from_name(s)  # ValueError naming the unknown size
    dtype = DTYPES[args.dtype] if args.dtype else (torch.float32 if cpu else torch.float16)
    opts = e2e.Options(
        sizes=tuple(sizes),
        batches=args.batch or ((1, 2) if cpu else (1, 8, 64)),
        prompt=args.prompt or (16 if cpu else 128),
        new=args.new or (8 if cpu else 128),
        dtype=dtype,
        reps=max(1, args.reps),
        hf_compile=args.hf_compile,
        hf_compile_batches=args.hf_compile_batches,
        providers=args.provider,
        log=_log,
    )
    opts.validate()
    peaks = _peaks(device, quick=True)
    doc = results.new_document("e2e", results.run_metadata(device), peaks)
    for rec in e2e.iter_records(device, opts, peaks):
        doc["records"].append(rec)
        if args.json:
            results.write_json(doc, args.json)
    _finish(doc, args)
    _print_table(doc)
    return 0 if any(r["error"] is None for r in doc["records"]) else 1


def run_train(args: argparse.Namespace) -> int:
    """Handler of ``bench train``: time training steps and their components, write JSON/markdown, print a table."""
    from gpt2fast.config import GPT2Config

    train, results = _bench("train"), _bench("results")
    device = resolve_device(args.device)
    cpu = device.type != "cuda"
    sizes = args.size or (("tiny",) if cpu else ("gpt2", "gpt2-medium"))
    for s in sizes:
        GPT2Config.from_name(s)  # ValueError naming the unknown size
    autocast = AUTOCAST[args.autocast or ("none" if cpu else "bf16")]
    opts = train.Options(
        sizes=tuple(sizes),
        shapes=args.shape or (((2, 8),) if cpu else ((8, 1024), (32, 512))),
        autocast=autocast,
        dropout=args.dropout,
        steps=args.steps or (2 if cpu else 10),
        warmup=(1 if cpu else 3) if args.warmup is None else args.warmup,
        compile_backend=args.compile_backend,
        providers=args.provider,
        components=args.components,
        log=_log,
    )
    if cpu:  # seconds, not minutes: tiny loss-head and attention cases in fp32
        opts.loss_cases, opts.attention_cases, opts.component_dtype = ((64, 1000),), ((2, 32, 32),), torch.float32
    opts.validate()
    doc = results.new_document("train", results.run_metadata(device), None)
    for rec in train.iter_records(device, opts):
        doc["records"].append(rec)
        if args.json:  # a time-boxed run keeps what it measured
            results.write_json(doc, args.json)
    _finish(doc, args)
    _print_table(doc)
    return 0 if any(r["error"] is None for r in doc["records"]) else 1


def _print_table(doc: dict) -> None:
    """A rich table of the main figures (plain text when stdout is not a terminal)."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"gpt2fast bench {doc['kind']} on {doc['meta']['device_name']}")
    if doc["kind"] == "train":
        cols, rows = _bench("train").table_rows(doc)
        for c in cols:
            table.add_column(c)
        for row in rows:
            table.add_row(*row)
    elif doc["kind"] == "kernels":
        cols = ["op", "shape", "dtype", "provider", "median ms", "GB/s", "TFLOP/s", "% copy bw", "check"]
        for c in cols:
            table.add_column(c)
        for r in doc["records"]:
            shape = " ".join(f"{k}={v}" for k, v in r["shape"].items())
            if r["error"] is not None:
                table.add_row(r["op"], shape, r["dtype"], r["provider"], r["error"][:60], "", "", "", "")
                continue
            check = "ok" if (r["check"] or {}).get("ok") else "WRONG"
            vals = [r["time"]["median_ms"], r["gbps"], r["tflops"], r["pct_copy_bw"]]
            table.add_row(r["op"], shape, r["dtype"], r["provider"], *(_num(v) for v in vals), check)
    else:
        eager = _bench("e2e").EAGER
        cols = ["size", "batch", "provider", "prefill ms", "decode ms/tok", "tok/s", "roofline", "launches", "vs HF"]
        for c in cols:
            table.add_column(c)
        for r in doc["records"]:
            if r["error"] is not None:
                table.add_row(r["size"], str(r["batch"]), r["provider"], r["error"][:60], "", "", "", "", "")
                continue
            roof = r["roofline_fraction"]
            sp = r["speedup"].get(eager + " decode")
            table.add_row(
                r["size"],
                str(r["batch"]),
                r["provider"],
                _num(r["prefill_ms"]),
                _num(r["decode_ms_per_token"]),
                _num(r["decode_tokens_per_s"]),
                "–" if roof is None else f"{100 * roof:.1f}%",
                _num(r["launches_per_step"]),
                "–" if sp is None else f"{sp:.2f}x",
            )
    Console(width=200).print(table)


def _num(v: float | None) -> str:
    if v is None:
        return "–"
    return f"{v:.4g}"
