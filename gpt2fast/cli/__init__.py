"""The ``gpt2fast`` command: ``generate``, ``eval``, ``info``, ``parity``, ``bench``, ``serve`` and ``train``, one
module per command.

Every command returns an exit status: 0 success, 1 a check failed (``parity``, ``bench kernels``) or the
machine ran out of memory, 2 bad input (unknown size, missing model directory, invalid sampling settings, an
unknown or unavailable backend or op, ...).  Bad input prints a one-line message and no traceback
(``--traceback`` shows it).  Backend and op names are read from the registry when a command runs, so a backend
or op registered at run time is accepted like a built-in one.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

import torch

from gpt2fast.cli import bench, eval, generate, info, parity, serve, train
from gpt2fast.cli._common import Parser, UsageError, consoles

__all__ = ["PROG", "UsageError", "build_parser", "main"]

PROG = "gpt2fast"


def build_parser() -> Parser:
    """The full ``gpt2fast`` argument parser (its subparsers raise :class:`UsageError` on bad arguments)."""
    parser = Parser(prog=PROG, description="Custom Triton/CUDA kernels for GPT-2, checked against transformers.")
    parser.add_argument("--traceback", action="store_true", help="show the full traceback of an error")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for command in (generate, eval, info, parity, bench, serve, train):
        command.add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``gpt2fast`` command line on ``argv`` (default ``sys.argv[1:]``); returns the exit status."""
    from gpt2fast.loading import CheckpointError
    from gpt2fast.ops import BackendUnavailableError

    _, err = consoles()
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = build_parser().parse_args(argv)
    except UsageError as exc:
        err.print(f"[bold red]error:[/bold red] {_one_line(exc)}", highlight=False, soft_wrap=True)
        return 2
    except SystemExit as exc:  # --help
        return exc.code if isinstance(exc.code, int) else 0
    try:
        return args.func(args) or 0
    except (UsageError, FileNotFoundError, CheckpointError, BackendUnavailableError, ValueError, TypeError) as exc:
        if args.traceback:
            raise
        err.print(f"[bold red]error:[/bold red] {_one_line(exc)}", highlight=False, soft_wrap=True)
        return 2
    except torch.cuda.OutOfMemoryError as exc:
        if args.traceback:
            raise
        err.print(f"[bold red]out of memory:[/bold red] {_one_line(exc)}", highlight=False, soft_wrap=True)
        return 1
    except KeyboardInterrupt:
        err.print("interrupted")
        return 130


def _one_line(exc: BaseException) -> str:
    from rich.markup import escape

    return escape(" ".join(str(exc).split()))
