"""``gpt2fast parity``: every registered op against its reference and, given a model, the logits against
transformers; exit 1 when anything is past the FlashAttention tolerance.  The checks are :mod:`gpt2fast.parity`."""

from __future__ import annotations

import argparse
import contextlib
import json
import tempfile
from collections import defaultdict
from dataclasses import asdict
from pathlib import Path

import torch

from gpt2fast.cli._common import (
    DTYPES,
    Subparsers,
    UsageError,
    add_model_args,
    check_backend,
    consoles,
    resolve_device,
    spinner,
    validate_backend,
)
from gpt2fast.cli.info import backend_rows
from gpt2fast.parity import OpParityRow, ParityRow, op_parity, run_parity

#: Failures named in the one-line summary before "and N more".
MAX_NAMED_FAILURES = 8


def parity_backends(requested: list[str] | None, device: torch.device) -> list[str]:
    """``--backend`` (each registered and available on ``device``), or every backend available there."""
    if requested:
        for name in requested:
            check_backend(validate_backend(name, allow_auto=False), device)
        return list(dict.fromkeys(requested))
    names = [name for name, ok, _ in backend_rows(device) if ok]
    if not names:
        raise UsageError(f"no backend is available on {device}; see `gpt2fast info`")
    return names


def selected_ops(requested: list[str] | None) -> list[str]:
    """``--op`` names (each a registered op), or every registered op; read from the registry when run."""
    from gpt2fast.ops import specs

    names = [s.name for s in specs()]
    for name in requested or ():
        if name not in names:
            raise UsageError(f"--op {name}: unknown op; choose one of {', '.join(names)}")
    return list(dict.fromkeys(requested)) if requested else names


def _model_config(args: argparse.Namespace):
    """The config of ``--model DIR`` or ``--random SIZE`` (checked before anything runs)."""
    from gpt2fast.config import GPT2Config
    from gpt2fast.loading import resolve_checkpoint

    if args.model is None:
        return GPT2Config.from_name(args.random)
    ckpt = resolve_checkpoint(args.model)  # a folder, or "default": the shipped model
    if not ckpt.is_dir():
        raise UsageError(f"--model {ckpt}: no such directory")
    return GPT2Config.from_json(ckpt)


def _op_table(rows: list[OpParityRow], device: torch.device):
    """One line per (op, backend, dtype): how many test shapes, and the figures of the one closest to (or past)
    its bound (the failing shapes are named after the tables)."""
    from rich.table import Table

    groups: dict[tuple[str, str, str], list[OpParityRow]] = defaultdict(list)
    for r in rows:
        groups[(r.op, r.backend, r.dtype)].append(r)
    table = Table(title=f"ops vs their reference in fp32 (worst of each op's test shapes), {device}")
    for col in ("op", "backend", "dtype", "shapes", "max |Δ|", "bound", "verdict"):
        table.add_column(col, justify="right" if col in ("shapes", "max |Δ|", "bound") else "left")
    for (op, backend, dtype), group in groups.items():
        worst = max(group, key=lambda r: (not r.ok, (r.err or 0.0) / (r.bound or 1.0)))
        failed = sum(not r.ok for r in group)
        verdict = "[green]ok" if not failed else f"[bold red]FAIL ({failed})"
        err, bound = ("error", "") if worst.error is not None else (f"{worst.err:.2e}", f"{worst.bound:.2e}")
        table.add_row(op, backend, dtype, str(len(group)), err, bound, verdict)
    return table


def _model_table(rows: list[ParityRow], title: str):
    from rich.table import Table

    table = Table(title=title)
    for col in ("dtype", "backend", "path", "max |Δ logits|", "bound", "argmax = HF fp32", "verdict"):
        table.add_column(col, justify="right" if col.startswith(("max", "bound", "argmax")) else "left")
    for r in rows:
        verdict = "[green]ok" if r.ok else "[bold red]FAIL"
        table.add_row(r.dtype, r.backend, r.path, f"{r.err:.3e}", f"{r.bound:.3e}", f"{r.greedy_agree:.1%}", verdict)
    return table


def run(args: argparse.Namespace) -> int:
    """Every registered op against its reference (each test shape, dtype and available backend) and, with
    ``--model`` or ``--random``, the logits of gpt2fast vs transformers; exit 1 past the FlashAttention
    tolerance."""
    from rich.markup import escape
    from rich.progress import Progress

    out, err = consoles()
    with_model = args.model is not None or args.random is not None
    if args.no_ops and not with_model:
        raise UsageError("nothing to check: --no-ops without --model DIR or --random SIZE")
    if with_model:
        try:
            import transformers  # noqa: F401
        except ImportError:
            raise UsageError("parity of a model needs transformers: pip install 'gpt2fast[hf]'") from None
    device = resolve_device(args.device)
    dnames = list(dict.fromkeys(args.dtype or (["fp32", "fp16", "bf16"])))
    backends = parity_backends(args.backend, device)
    op_names = [] if args.no_ops else selected_ops(args.op)
    if args.seq_len < 2 or args.batch < 1:
        raise UsageError(f"--seq-len must be >= 2 and --batch >= 1, got {args.seq_len} and {args.batch}")
    n_decode = min(args.decode_steps, args.seq_len - 1)
    if n_decode < 0:
        raise UsageError(f"--decode-steps must be >= 0, got {args.decode_steps}")
    config = _model_config(args) if with_model else None
    if config is not None and args.seq_len > config.n_positions:
        raise UsageError(f"--seq-len {args.seq_len} exceeds the model's n_positions={config.n_positions}")

    op_rows: list[OpParityRow] = []
    if op_names:
        with Progress(console=err, transient=True) as bar:
            task = bar.add_task("ops", total=None)
            op_rows = op_parity(
                op_names,
                backends,
                [DTYPES[d] for d in dnames],
                device,
                lambda done, total: bar.update(task, completed=done, total=total),
            )
        out.print(_op_table(op_rows, device))
        covered = {r.op for r in op_rows}
        for name in op_names:
            if name not in covered:
                err.print(f"[yellow]note:[/yellow] no selected backend implements {escape(name)} on {device}")

    model_rows: list[ParityRow] = []
    if config is not None:
        model_rows = _run_model(args, config, dnames, backends, device, n_decode, err)
        out.print(
            _model_table(model_rows, f"gpt2fast vs transformers: {args.model or 'random ' + args.random}, {device}")
        )

    ok = all(r.ok for r in op_rows) and all(r.ok for r in model_rows)
    if args.json:
        doc: dict = {"device": str(device), "ok": ok, "ops": [asdict(r) for r in op_rows]}
        doc["model"] = None if config is None else (args.model or f"random:{args.random}")
        if config is not None:
            doc.update(batch=args.batch, seq_len=args.seq_len, decode_steps=n_decode)
        doc["results"] = [asdict(r) for r in model_rows]
        Path(args.json).write_text(json.dumps(doc, indent=2) + "\n")
    for r in [r for r in op_rows if r.error is not None][:MAX_NAMED_FAILURES]:
        what = escape(f"{r.op} on {r.backend} ({r.dtype}, {r.shape}) raised")
        err.print(f"[red]{what}[/red] {escape(r.error)}", highlight=False)
    failed = [f"{r.op}/{r.backend}/{r.dtype}/{r.shape}" for r in op_rows if not r.ok]
    failed += [f"{r.dtype}/{r.backend}/{r.path}" for r in model_rows if not r.ok]
    if failed:
        named = escape(", ".join(failed[:MAX_NAMED_FAILURES]))
        more = f" and {len(failed) - MAX_NAMED_FAILURES} more" if len(failed) > MAX_NAMED_FAILURES else ""
        err.print(f"[bold red]parity FAILED[/bold red] for {named}{more} (FlashAttention tolerance)", highlight=False)
        return 1
    n = len(op_rows) + len(model_rows)
    out.print(f"[green]parity ok[/green]: {n} checks within the FlashAttention tolerance")
    return 0


def _run_model(args, config, dnames, backends, device, n_decode, err) -> list[ParityRow]:
    """:func:`~gpt2fast.parity.run_parity` on ``--model DIR``, or on a random checkpoint of ``--random SIZE``."""
    from rich.progress import Progress

    from gpt2fast.model import GPT2

    with contextlib.ExitStack() as stack:
        if args.model is not None:
            from gpt2fast.loading import resolve_checkpoint

            ckpt = resolve_checkpoint(args.model)
        else:
            ckpt = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="gpt2fast-parity-")))
            with spinner(err, f"writing a random {args.random} checkpoint"):
                GPT2.random(config, seed=args.init_seed).save_pretrained(ckpt)
        gen = torch.Generator().manual_seed(args.seed)
        ids = torch.randint(0, config.vocab_size, (args.batch, args.seq_len), generator=gen)
        with Progress(console=err, transient=True) as bar:
            task = bar.add_task("model", total=len(dnames) * len(backends))
            return run_parity(ckpt, ids, dnames, backends, device, n_decode, lambda: bar.advance(task))


def add_parser(sub: Subparsers) -> None:
    """Add ``parity`` to the ``gpt2fast`` subparsers."""
    p = sub.add_parser("parity", help="check every op against its reference, and a model against transformers",
                       description=run.__doc__)  # fmt: skip
    add_model_args(p, required=False)
    p.add_argument("--dtype", action="append", choices=tuple(DTYPES), help="repeatable (default: all three)")
    p.add_argument("--backend", action="append", metavar="NAME", help="repeatable (default: every available one)")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--op", action="append", metavar="NAME", help="only this op; repeatable (default: all)")
    which.add_argument("--no-ops", action="store_true", help="skip the op checks (the model's only)")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seq-len", type=int, default=32)
    p.add_argument("--decode-steps", type=int, default=4, help="last positions also run through the KV cache")
    p.add_argument("--seed", type=int, default=0, help="seed of the random input ids")
    p.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    p.set_defaults(func=run)
