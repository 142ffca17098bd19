"""What every command shares: the usage error, devices and dtypes, backend names, model and tokenizer loading,
consoles and the spinner."""

from __future__ import annotations

import argparse
import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

import torch

from gpt2fast.config import SIZES
from gpt2fast.parity import DTYPES, dtype_name

if TYPE_CHECKING:
    from rich.console import Console

    from gpt2fast.model import GPT2
    from gpt2fast.tokenizer import Tokenizer

#: What ``ArgumentParser.add_subparsers()`` returns: each command module adds its parser to it.
Subparsers = argparse._SubParsersAction

__all__ = [
    "DTYPES",
    "SIZES",
    "Parser",
    "Subparsers",
    "UsageError",
    "add_model_args",
    "backend_summary",
    "check_backend",
    "consoles",
    "dtype_name",
    "load_model",
    "load_tokenizer",
    "resolve_device",
    "resolve_dtype",
    "spinner",
    "sync",
    "validate_backend",
]


class UsageError(Exception):
    """Bad command-line input; reported as one line, exit status 2."""


class Parser(argparse.ArgumentParser):
    """ArgumentParser whose errors raise :class:`UsageError` instead of printing usage and exiting."""

    def error(self, message: str) -> NoReturn:  # type: ignore[override]
        """Raise :class:`UsageError` with argparse's message (its subparsers are of this class too)."""
        raise UsageError(f"{self.prog}: {message} (see --help)")


def consoles() -> tuple[Console, Console]:
    """Rich consoles for stdout (results) and stderr (progress, messages)."""
    from rich.console import Console

    return Console(), Console(stderr=True)


@contextlib.contextmanager
def spinner(console: Console, message: str) -> Iterator[None]:
    """A spinner while something takes seconds (drawn only on a terminal)."""
    with console.status(message, spinner="dots"):
        yield


def resolve_device(name: str | None) -> torch.device:
    """``--device``: default CUDA when present, else CPU; a CUDA device must exist."""
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise UsageError(f"invalid --device {name!r}; use e.g. cpu, cuda, cuda:1") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"--device {name}: CUDA is not available on this machine")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UsageError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) present")
    elif device.type != "cpu":
        raise UsageError(f"--device {name}: gpt2fast runs on cpu or cuda")
    return device


def resolve_dtype(name: str | None, device: torch.device) -> torch.dtype:
    """``--dtype``: default fp16 on CUDA, fp32 on CPU."""
    if name is None:
        return torch.float16 if device.type == "cuda" else torch.float32
    return DTYPES[name]


def sync(device: torch.device) -> None:
    """Wait for ``device`` (no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---- backends: names come from the registry, read when a command runs ------------------------------------------
def validate_backend(name: str, allow_auto: bool = True) -> str:
    """``name`` when it is a registered backend (or "auto" where allowed), else :class:`UsageError`."""
    from gpt2fast.ops import AUTO, backend_names

    names = backend_names()
    if name in names or (allow_auto and name == AUTO):
        return name
    choices = ", ".join([AUTO, *names] if allow_auto else names)
    raise UsageError(f"--backend {name}: unknown backend; choose one of {choices}")


def check_backend(name: str | None, device: torch.device) -> str | None:
    """Fail early, with the backend's own reason, when ``--backend`` is unknown or cannot run on ``device``."""
    if name is None or name == "auto":
        return None
    from gpt2fast.ops import backend_status

    status = backend_status(validate_backend(name), device)
    if not status.available:
        raise UsageError(f"--backend {name} is unavailable on {device}: {status.reason}")
    return name


def backend_summary(name: str | None, device: torch.device) -> str:
    """What ``--backend`` runs on ``device``: the name, or for "auto" the backend each op resolves to first
    (an input a backend declines still falls through to the next one)."""
    from gpt2fast.ops import AUTO, get_backend, implementations, specs
    from gpt2fast.ops._registry import candidates

    name = name or get_backend()
    if name != AUTO:
        return name
    by_backend: dict[str, list[str]] = {}
    for spec in specs():
        by_backend.setdefault(candidates(spec.name, AUTO, device)[0].backend, []).append(spec.name)
    if len(by_backend) == 1:
        return f"auto: {next(iter(by_backend))}"
    priority = {r.backend: r.priority for r in implementations(device)}
    # highest priority first, the fallback (reference) last, as "the other N ops"
    *named, (last, rest) = sorted(by_backend.items(), key=lambda kv: -priority[kv[0]])
    groups = [f"{be} ({', '.join(sorted(op_names))})" for be, op_names in named]
    return "auto: " + ", ".join(groups) + f", {last} (the other {len(rest)} ops)"


# ---- models and tokenizers ---------------------------------------------------------------------------------------
def add_model_args(p: argparse.ArgumentParser, required: bool) -> None:
    """``--model DIR`` | ``--random SIZE`` (one of them, required or not), ``--init-seed`` and ``--device``."""
    src = p.add_mutually_exclusive_group(required=required)
    src.add_argument("--model", metavar="DIR", help="Hugging Face GPT-2 checkpoint directory, or 'default'")
    src.add_argument("--random", metavar="SIZE", choices=tuple(SIZES), help=f"random weights: {', '.join(SIZES)}")
    p.add_argument("--init-seed", type=int, default=0, help="seed of the --random weights (default 0)")
    p.add_argument("--device", help="cpu, cuda, cuda:N (default: cuda when present)")


def load_model(args: argparse.Namespace, device: torch.device, dtype: torch.dtype, console: Console) -> GPT2:
    """The model of ``--model DIR`` (``default``: the shipped model, also used when neither option is given) or
    ``--random SIZE``, with a spinner while it loads."""
    from gpt2fast.config import GPT2Config
    from gpt2fast.loading import DEFAULT_MODEL, resolve_checkpoint
    from gpt2fast.model import GPT2

    backend = check_backend(args.backend, device)
    if args.model is not None or args.random is None:  # neither given: the shipped default model
        path = resolve_checkpoint(args.model or DEFAULT_MODEL)
        if not path.exists():
            raise UsageError(f"--model {path}: no such directory")
        with spinner(console, f"loading {path} ({dtype_name(dtype)}, {device})"):
            return GPT2.from_pretrained(path, dtype=dtype, device=device, backend=backend, quiet=True)
    config = GPT2Config.from_name(args.random)
    with spinner(console, f"initialising a random {args.random} ({dtype_name(dtype)}, {device})"):
        return GPT2.random(config, seed=args.init_seed, dtype=dtype, device=device, backend=backend)


def load_tokenizer(args: argparse.Namespace) -> Tokenizer:
    """``--tokenizer`` (a directory or a ``.tiktoken`` file), else the checkpoint's own, else GPT-2's."""
    from gpt2fast.tokenizer import Tokenizer

    if args.tokenizer is not None:
        path = Path(args.tokenizer)
        return Tokenizer.from_tiktoken(path) if path.is_file() else Tokenizer.from_pretrained(path)
    if args.model is not None:
        from gpt2fast.loading import resolve_checkpoint

        d = resolve_checkpoint(args.model)
        if (d / "tokenizer.json").is_file() or (d / "vocab.json").is_file():
            return Tokenizer.from_pretrained(d)
    return Tokenizer.default()
