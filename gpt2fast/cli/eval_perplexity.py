"""``gpt2fast eval perplexity``: the perplexity of a model on a text by transformers' sliding-window recipe, on one
backend and dtype or (``--compare-backends``) on every available backend and dtype, tabulated against transformers.
The computation is the library :mod:`gpt2fast.perplexity`.

:func:`add_perplexity_parser` adds the ``perplexity`` subcommand to the ``eval`` command's subparsers (built by
``gpt2fast/cli/eval.py``, which lists it in its ``SUBCOMMANDS``).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from gpt2fast.cli._common import (
    DTYPES,
    Subparsers,
    UsageError,
    add_model_args,
    backend_summary,
    consoles,
    dtype_name,
    load_model,
    load_tokenizer,
    resolve_device,
    resolve_dtype,
)


def _read_data(path: str) -> str:
    """``--data``: a text file, or a folder's ``*.txt`` files joined by blank lines (as the recipe joins a data set's
    rows)."""
    from gpt2fast.data import DataError, find_text_files, read_text

    try:
        files = find_text_files(path, "--data")
    except DataError as exc:
        raise UsageError(str(exc)) from None
    return "\n\n".join(read_text(f) for f in files)


def _model_positions(args: argparse.Namespace) -> int:
    from gpt2fast.config import SIZES, GPT2Config
    from gpt2fast.loading import DEFAULT_MODEL, resolve_checkpoint

    if args.random is not None:
        return GPT2Config(**SIZES[args.random]).n_positions
    path = resolve_checkpoint(args.model or DEFAULT_MODEL)
    if not path.is_dir():
        raise UsageError(f"--model {path}: no such directory")
    return GPT2Config.from_json(path).n_positions


def _check_lengths(args: argparse.Namespace, n_positions: int) -> tuple[int, int]:
    max_length = n_positions if args.max_length is None else args.max_length
    if not 2 <= max_length <= n_positions:
        raise UsageError(f"--max-length must lie in [2, n_positions={n_positions}], got {max_length}")
    stride = max(1, max_length // 2) if args.stride is None else args.stride
    if not 1 <= stride <= max_length:
        raise UsageError(f"--stride must lie in [1, --max-length={max_length}], got {stride}")
    return max_length, stride


def _progress_bar(err, label: str):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    return Progress(
        TextColumn(label), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(), console=err, transient=True
    )


def _evaluate(model, ids: torch.Tensor, max_length: int, stride: int, err, label: str):
    from gpt2fast.perplexity import sliding_window_perplexity

    with _progress_bar(err, label) as bar:
        task = bar.add_task(label, total=None)
        return sliding_window_perplexity(
            model, ids, max_length, stride, lambda done, total: bar.update(task, completed=done, total=total)
        )


def _compare(args, ids, max_length, stride, device, err) -> list[dict]:
    """Every available backend x dtype, plus transformers' recipe in fp32 (the baseline) when it is installed."""
    from gpt2fast.cli.parity import parity_backends
    from gpt2fast.loading import DEFAULT_MODEL, resolve_checkpoint
    from gpt2fast.model import GPT2
    from gpt2fast.perplexity import transformers_perplexity

    if args.random is not None:
        raise UsageError("--compare-backends needs a checkpoint (--model), not --random weights")
    ckpt = resolve_checkpoint(args.model or DEFAULT_MODEL)
    backends = parity_backends(args.backend and [args.backend], device)
    rows = []
    try:
        from transformers import GPT2LMHeadModel
        from transformers.utils import logging as hf_logging
    except ImportError:
        err.print("[yellow]note:[/yellow] transformers is not installed; the baseline is reference fp32")
    else:
        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
        hf = GPT2LMHeadModel.from_pretrained(str(ckpt), dtype=torch.float32).to(device).eval()
        with _progress_bar(err, "transformers fp32"):
            res = transformers_perplexity(hf, ids, max_length, stride)
        rows.append({"backend": "transformers", "dtype": "fp32", "perplexity": res.perplexity, "nll": res.nll})
        del hf
    for dname in ("fp32", "fp16", "bf16"):
        for backend in backends:
            model = GPT2.from_pretrained(ckpt, dtype=DTYPES[dname], device=device, backend=backend, quiet=True)
            res = _evaluate(model, ids, max_length, stride, err, f"{backend} {dname}")
            rows.append({"backend": backend, "dtype": dname, "perplexity": res.perplexity, "nll": res.nll})
            del model
    base = rows[0]
    for r in rows:
        r["delta"] = r["perplexity"] - base["perplexity"]
        r["relative"] = r["delta"] / base["perplexity"]
    return rows


def _table(rows: list[dict], title: str):
    from rich.table import Table

    table = Table(title=title)
    for col in ("backend", "dtype", "perplexity", "nll (nats/token)", "Δ ppl vs first row", "relative"):
        table.add_column(col, justify="left" if col in ("backend", "dtype") else "right")
    for r in rows:
        table.add_row(
            r["backend"], r["dtype"], f"{r['perplexity']:.4f}", f"{r['nll']:.6f}", f"{r['delta']:+.2e}",
            f"{r['relative']:+.2e}",
        )  # fmt: skip
    return table


def run(args: argparse.Namespace) -> int:
    """Perplexity of ``--model`` on ``--data`` by transformers' sliding-window recipe (windows of ``--max-length``
    every ``--stride`` tokens); ``--compare-backends`` tabulates every available backend and dtype."""
    from gpt2fast.data import encode_files, find_text_files
    from gpt2fast.perplexity import unigram_perplexity

    out, err = consoles()
    device = resolve_device(args.device)
    max_length, stride = _check_lengths(args, _model_positions(args))
    text = _read_data(args.data)
    unigram_files = find_text_files(args.unigram, "--unigram") if args.unigram else None
    tok = load_tokenizer(args)
    ids = torch.tensor(tok.encode(text), dtype=torch.long)
    if len(ids) < 2:
        raise UsageError(f"--data {args.data}: {len(ids)} token(s); perplexity needs at least 2")
    doc: dict = {
        "model": args.model or (f"random:{args.random}" if args.random else "default"),
        "data": args.data,
        "tokens": len(ids),
        "max_length": max_length,
        "stride": stride,
        "method": "transformers' sliding-window perplexity (https://huggingface.co/docs/transformers/perplexity)",
    }
    if args.compare_backends:
        rows = _compare(args, ids, max_length, stride, device, err)
        out.print(_table(rows, f"perplexity of {doc['model']} on {args.data} ({len(ids):,} tokens), {device}"))
        doc["results"] = rows
    else:
        dtype = resolve_dtype(args.dtype, device)
        model = load_model(args, device, dtype, err)
        res = _evaluate(model, ids, max_length, stride, err, "perplexity")
        doc.update(
            perplexity=res.perplexity, nll=res.nll, scored_tokens=res.tokens, windows=res.windows,
            dtype=dtype_name(dtype), device=str(device), backend=backend_summary(args.backend, device),
        )  # fmt: skip
        out.print(
            f"perplexity {res.perplexity:.4f} (nll {res.nll:.4f} nats/token) over {res.tokens:,} tokens in "
            f"{res.windows} windows of {max_length}, stride {stride} ({doc['dtype']}, {device}, "
            f"backend {doc['backend']})",
            highlight=False,
        )
    if unigram_files is not None:
        train_ids = [t for d in encode_files(tok, unigram_files) for t in d]
        doc["unigram"] = {
            "perplexity": unigram_perplexity(train_ids, ids.numpy(), tok.vocab_size, alpha=1.0),
            "train": args.unigram,
            "train_tokens": len(train_ids),
            "smoothing": "add-one (Laplace) over the whole vocabulary, counts from the --unigram text (one document "
            "per file, each ending in <|endoftext|>), scored on every --data token but the first",
        }
        out.print(f"unigram baseline (add-one, counts from {args.unigram}): {doc['unigram']['perplexity']:.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps(doc, indent=2) + "\n")
    return 0


def add_perplexity_parser(eval_sub: Subparsers) -> None:
    """Add ``perplexity`` to the subparsers of the ``eval`` command."""
    p = eval_sub.add_parser(
        "perplexity", help="sliding-window perplexity of a model on a text", description=run.__doc__
    )
    add_model_args(p, required=False)  # neither --model nor --random: the shipped default model
    p.add_argument("--data", required=True, metavar="PATH", help="a text file (or a folder of *.txt, joined)")
    p.add_argument("--max-length", type=int, help="window length (default: the model's n_positions)")
    p.add_argument("--stride", type=int, help="tokens between window starts (default: max-length / 2)")
    p.add_argument("--compare-backends", action="store_true", help="every available backend x fp32/fp16/bf16")
    p.add_argument("--backend", default=None, help="op backend (default auto); with --compare-backends: only it")
    p.add_argument("--dtype", choices=tuple(DTYPES), default=None, help="default fp16 on CUDA, fp32 on CPU")
    p.add_argument("--tokenizer", metavar="PATH", help="tokenizer directory or .tiktoken file")
    p.add_argument("--unigram", metavar="PATH", help="also report the add-one unigram perplexity of this text")
    p.add_argument("--json", metavar="PATH", help="write the figures as JSON")
    p.set_defaults(func=run)
