"""``gpt2fast train``: train GPT-2 from scratch or fine-tune a checkpoint on text files (one process, or data-parallel
under ``torchrun --nproc-per-node N -m gpt2fast train ...``).  The loop is the library :mod:`gpt2fast.train`."""

from __future__ import annotations

import argparse
import dataclasses
import os

from gpt2fast.cli._common import SIZES, Subparsers, UsageError, consoles


def run(args: argparse.Namespace) -> int:
    """Train on ``--data`` into ``--out`` (the final model, checkpoints, train_log.jsonl, loss_curve.png)."""
    from gpt2fast.cli._common import validate_backend
    from gpt2fast.data import DataError
    from gpt2fast.train import ResumeError, TrainConfig, train

    _, err = consoles()
    if args.backend is not None:
        validate_backend(args.backend)
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    cfg = TrainConfig(**{k: v for k, v in vars(args).items() if k in fields})
    try:
        result = train(cfg)
    except (DataError, ResumeError, PermissionError, NotADirectoryError) as exc:
        raise UsageError(str(exc)) from None
    if result.val_loss is not None and int(os.environ.get("RANK", "0")) == 0:
        err.print(
            f"step {result.step}: held-out loss {result.val_loss:.4f} (perplexity {result.val_ppl:.2f}), "
            f"{result.tokens:,} tokens in {result.seconds:.0f} s; model saved in {result.out}",
            highlight=False,
        )
    return 0


def add_parser(sub: Subparsers) -> None:
    """Add ``train`` to the ``gpt2fast`` subparsers."""
    p = sub.add_parser("train", help="train or fine-tune GPT-2 on text files", description=run.__doc__)
    d = p.add_argument_group("data")
    d.add_argument("--data", required=True, metavar="PATH", help="a text file, or a folder of *.txt files")
    d.add_argument("--val-data", metavar="PATH", help="held-out text (default: whole files of --data, or its tail)")
    d.add_argument("--val-fraction", type=float, default=0.1, help="held-out share without --val-data (0.1)")
    d.add_argument("--cache-dir", metavar="DIR", help="token cache (default OUT/tokens)")
    m = p.add_argument_group("model")
    src = m.add_mutually_exclusive_group()
    src.add_argument("--size", choices=tuple(SIZES), help="train from scratch: a GPT2Config size")
    src.add_argument("--init", metavar="DIR", help="fine-tune this HF-format checkpoint")
    for name in ("n-layer", "n-head", "n-embd", "n-positions"):
        m.add_argument(f"--{name}", type=int, help=f"override the size's {name.replace('-', '_')}")
    m.add_argument("--dropout", type=float, help="embd/resid/attn dropout (default: the model config's, 0.1)")
    m.add_argument("--backend", default=None, help="op backend: auto (default) or a registered one with backward")
    o = p.add_argument_group("optimisation")
    o.add_argument("--block-size", type=int, help="tokens per sequence (default: the model's n_positions)")
    o.add_argument("--batch-size", type=int, default=8, help="sequences per optimizer step, all processes (8)")
    o.add_argument("--micro-batch-size", type=int, help="sequences per forward per process (default: its share)")
    o.add_argument("--steps", type=int, default=1000, help="optimizer steps of the schedule (1000)")
    o.add_argument("--stop-at", type=int, help="stop after this step (with a checkpoint to --resume from)")
    o.add_argument("--lr", type=float, default=6e-4, help="peak learning rate (6e-4)")
    o.add_argument("--min-lr", type=float, help="learning rate at the end of the cosine (default lr/10)")
    o.add_argument("--warmup", type=int, default=100, help="linear warm-up steps (100)")
    o.add_argument("--weight-decay", type=float, default=0.1, help="AdamW weight decay on matrices (0.1)")
    o.add_argument("--beta1", type=float, default=0.9)
    o.add_argument("--beta2", type=float, default=0.95)
    o.add_argument("--grad-clip", type=float, default=1.0, help="clip the global gradient norm (0: off)")
    o.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), default="fp32",
                   help="autocast dtype (fp16 uses a gradient scaler); parameters stay fp32")  # fmt: skip
    o.add_argument("--seed", type=int, default=0)
    r = p.add_argument_group("evaluation, checkpoints, records")
    r.add_argument("--out", required=True, metavar="DIR", help="output folder")
    r.add_argument("--eval-interval", type=int, default=100, help="evaluate every N steps (100)")
    r.add_argument("--eval-tokens", type=int, default=32768, help="held-out tokens per evaluation (0: all)")
    r.add_argument("--checkpoint-interval", type=int, help="checkpoint every N steps (default: --eval-interval)")
    r.add_argument("--keep-checkpoints", type=int, default=2, help="checkpoints kept (2)")
    r.add_argument("--patience", type=int, default=0, help="stop after N evaluations without improvement (0: off)")
    r.add_argument("--resume", nargs="?", const="latest", metavar="CKPT",
                   help="continue OUT's latest checkpoint, or the named checkpoint folder")  # fmt: skip
    r.add_argument("--device", help="cpu, cuda, cuda:N (default: cuda when present; torchrun: one GPU per rank)")
    r.add_argument("--threads", type=int, help="torch CPU threads")
    r.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    p.set_defaults(func=run)
