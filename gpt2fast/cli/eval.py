"""``gpt2fast eval``: evaluation commands, one subcommand each (``bleu`` here; ``perplexity`` in
:mod:`gpt2fast.cli.eval_perplexity`): a parser function listed in :data:`SUBCOMMANDS`, with its handler.

``gpt2fast eval bleu --model DIR --prompts FILE --references FILE [generation knobs]`` continues every prompt
(one per line), scores the continuations against the references (one per line) with sacrebleu's corpus BLEU and
chrF (never a hand-written BLEU), prints a table and writes the scores, signatures and texts as JSON.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path

from gpt2fast.cli._common import (
    DTYPES,
    Subparsers,
    UsageError,
    add_model_args,
    consoles,
    spinner,
)
from gpt2fast.cli.eval_perplexity import add_perplexity_parser
from gpt2fast.cli.generate import _check, add_generation_args, generation_kwargs, load_for_generation


def read_lines(option: str, path: Path) -> list[str]:
    """The lines of ``path`` (without line ends) for ``option``; a missing or empty file is a :class:`UsageError`."""
    if not path.is_file():
        raise UsageError(f"{option} {path}: no such file")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as exc:
        raise UsageError(f"{option} {path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    if not lines:
        raise UsageError(f"{option} {path}: the file is empty; give one line per example")
    return lines


def score(hypotheses: list[str], references: list[str]) -> dict:
    """Corpus BLEU and chrF of ``hypotheses`` against one reference each, by sacrebleu, with their signatures."""
    try:
        import sacrebleu
    except ImportError:
        raise UsageError("eval bleu needs sacrebleu: pip install 'gpt2fast[eval]'") from None
    bleu, chrf = sacrebleu.metrics.BLEU(), sacrebleu.metrics.CHRF()
    b, c = bleu.corpus_score(hypotheses, [references]), chrf.corpus_score(hypotheses, [references])
    return dict(bleu=b.score, chrf=c.score, bleu_signature=str(bleu.get_signature()),
                chrf_signature=str(chrf.get_signature()), bleu_detail=str(b))  # fmt: skip


def continuations(model, tok, prompts: list[str], kw: dict, batch_size: int, generator) -> list[str]:
    """The text each prompt is continued with (its new tokens up to the first EOS), ``batch_size`` at a time."""
    eos = kw.get("eos_token_id")
    texts = []
    for i in range(0, len(prompts), batch_size):
        batch = tok.encode_batch(prompts[i : i + batch_size], device=model.wte.weight.device)
        out = model.generate(batch.input_ids, batch.attention_mask, generator=generator, **kw)
        for row in out[:, batch.input_ids.shape[1] :].tolist():
            texts.append(tok.decode(row[: row.index(eos)] if eos is not None and eos in row else row))
    return texts


def run_bleu(args: argparse.Namespace) -> int:
    """Continue every prompt, score the continuations with sacrebleu (corpus BLEU, chrF), print and write JSON."""
    out, err = consoles()
    _check(args)
    if args.batch_size < 1:
        raise UsageError(f"--batch-size must be >= 1, got {args.batch_size}")
    prompts = read_lines("--prompts", Path(args.prompts))
    references = read_lines("--references", Path(args.references))
    if len(prompts) != len(references):
        raise UsageError(f"--prompts has {len(prompts)} lines but --references has {len(references)}; they must match")
    empty = [i + 1 for i, p in enumerate(prompts) if not p.strip()]
    if empty:
        raise UsageError(f"--prompts line {empty[0]} is empty; every prompt needs some text")
    _, _, tok, model, gen = load_for_generation(args, err)
    kw = generation_kwargs(args, tok)
    with spinner(err, f"generating {len(prompts)} continuations"):
        hypotheses = continuations(model, tok, prompts, kw, args.batch_size, gen)
    result = score(hypotheses, references)
    _print(out, result, len(prompts))
    if args.json:
        settings = {k: v for k, v in kw.items() if k != "tokenizer"}
        doc = dict(result, n=len(prompts), settings=settings, prompts=prompts, references=references,
                   hypotheses=hypotheses)  # fmt: skip
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(doc, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return 0


def _print(console, result: dict, n: int) -> None:
    from rich.table import Table

    table = Table(title=f"eval bleu: {n} prompts")
    table.add_column("metric")
    table.add_column("score", justify="right")
    table.add_column("sacrebleu signature")
    table.add_row("BLEU", f"{result['bleu']:.2f}", result["bleu_signature"])
    table.add_row("chrF", f"{result['chrf']:.2f}", result["chrf_signature"])
    console.print(table)


def _add_bleu(sub: Subparsers) -> None:
    p = sub.add_parser("bleu", help="continue prompts, score them against references (sacrebleu BLEU, chrF)",
                       description=run_bleu.__doc__)  # fmt: skip
    add_model_args(p, required=True)
    p.add_argument("--prompts", required=True, metavar="FILE", help="one prompt per line")
    p.add_argument("--references", required=True, metavar="FILE", help="one reference continuation per line")
    p.add_argument("--tokenizer", metavar="PATH", help="tokenizer directory or .tiktoken file")
    add_generation_args(p, max_new_tokens=32)
    p.add_argument("--batch-size", type=int, default=8, help="prompts per generate call")
    p.add_argument("--backend", default=None, help="op backend: auto (default) or a registered one (gpt2fast info)")
    p.add_argument("--dtype", choices=tuple(DTYPES), default=None, help="default fp16 on CUDA, fp32 on CPU")
    p.add_argument("--json", metavar="PATH", help="write scores, signatures and texts here")
    p.set_defaults(func=run_bleu)


#: The ``eval`` subcommands: each adds its parser (and handler) to the ``eval`` subparsers.
SUBCOMMANDS: tuple[Callable[[Subparsers], None], ...] = (_add_bleu, add_perplexity_parser)


def add_parser(subparsers: Subparsers) -> None:
    """Add ``eval`` with its subcommands to the ``gpt2fast`` subparsers."""
    ev = subparsers.add_parser("eval", help="evaluate a model: generation (bleu), perplexity")
    sub = ev.add_subparsers(dest="eval_command", metavar="{bleu,perplexity}", required=True)
    for add in SUBCOMMANDS:
        add(sub)
