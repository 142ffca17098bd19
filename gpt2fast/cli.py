"""The ``gpt2fast`` command: ``generate``, ``info``, ``parity`` and ``bench``.

Every command returns an exit status: 0 success, 1 a check failed (``parity``) or the machine ran
out of memory, 2 bad input (unknown size, missing model directory, invalid sampling settings, an
unavailable backend, ...).  Bad input prints a one-line message and no traceback (``--traceback``
shows it).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.util
import json
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

PROG = "gpt2fast"

#: Model sizes for ``--random``: the published GPT-2 sizes, plus ``tiny`` (2 layers, width 64) for tests.
SIZES: tuple[str, ...] = ("tiny", "gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl")
DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
BACKEND_CHOICES: tuple[str, ...] = ("auto", "cuda", "triton", "reference")


class UsageError(Exception):
    """Bad command-line input; reported as one line, exit status 2."""


class _Parser(argparse.ArgumentParser):
    """ArgumentParser whose errors raise :class:`UsageError` instead of printing usage and exiting."""

    def error(self, message: str):  # type: ignore[override]
        raise UsageError(f"{self.prog}: {message} (see --help)")


# ---- shared helpers ---------------------------------------------------------------------------
def consoles():
    """Rich consoles for stdout (results) and stderr (progress, messages)."""
    from rich.console import Console

    return Console(), Console(stderr=True)


def size_config(name: str):
    """The :class:`~gpt2fast.config.GPT2Config` of a ``--random`` size name."""
    from gpt2fast.config import GPT2Config

    if name == "tiny":
        # GPT-2's full vocab so the real tokenizer's ids fit; everything else minimal.
        return GPT2Config(n_layer=2, n_head=2, n_embd=64, n_positions=128)
    if name not in SIZES:
        raise UsageError(f"unknown model size {name!r}; choose one of {', '.join(SIZES)}")
    return GPT2Config.from_name(name)


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


def check_backend(name: str | None, device: torch.device) -> str | None:
    """Fail early, with the backend's own reason, when ``--backend`` cannot run on ``device``."""
    if name is None or name == "auto":
        return None
    from gpt2fast.ops import backend_status

    status = backend_status(name, device)
    if not status.available:
        raise UsageError(f"--backend {name} is unavailable on {device}: {status.reason}")
    return name


@contextlib.contextmanager
def _status(console, message: str) -> Iterator[None]:
    """A spinner while something takes seconds (drawn only on a terminal)."""
    with console.status(message, spinner="dots"):
        yield


def load_model(args: argparse.Namespace, device: torch.device, dtype: torch.dtype, console):
    """The model of ``--model DIR`` or ``--random SIZE``, with a spinner while it loads."""
    from gpt2fast.model import GPT2

    backend = check_backend(args.backend, device)
    if args.model is not None:
        path = Path(args.model)
        if not path.exists():
            raise UsageError(f"--model {path}: no such directory")
        with _status(console, f"loading {path} ({_dtype_name(dtype)}, {device})"):
            return GPT2.from_pretrained(path, dtype=dtype, device=device, backend=backend, quiet=True)
    config = size_config(args.random)
    with _status(console, f"initialising a random {args.random} ({_dtype_name(dtype)}, {device})"):
        return GPT2.random(config, seed=args.init_seed, dtype=dtype, device=device, backend=backend)


def load_tokenizer(args: argparse.Namespace):
    """``--tokenizer`` (a directory or a ``.tiktoken`` file), else the checkpoint's own, else GPT-2's."""
    from gpt2fast.tokenizer import Tokenizer

    if args.tokenizer is not None:
        path = Path(args.tokenizer)
        return Tokenizer.from_tiktoken(path) if path.is_file() else Tokenizer.from_pretrained(path)
    if args.model is not None:
        d = Path(args.model)
        if (d / "tokenizer.json").is_file() or (d / "vocab.json").is_file():
            return Tokenizer.from_pretrained(d)
    return Tokenizer.default()


def _dtype_name(dtype: torch.dtype) -> str:
    return next((k for k, v in DTYPES.items() if v == dtype), str(dtype))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _add_model_args(p: argparse.ArgumentParser, required: bool) -> None:
    src = p.add_mutually_exclusive_group(required=required)
    src.add_argument("--model", metavar="DIR", help="Hugging Face GPT-2 checkpoint directory")
    src.add_argument("--random", metavar="SIZE", choices=SIZES, help=f"random weights: {', '.join(SIZES)}")
    p.add_argument("--init-seed", type=int, default=0, help="seed of the --random weights (default 0)")
    p.add_argument("--device", help="cpu, cuda, cuda:N (default: cuda when present)")


# ---- generate --------------------------------------------------------------------------------
def cmd_generate(args: argparse.Namespace) -> int:
    """Stream a completion of ``--prompt`` to stdout; report tokens/s on stderr."""
    from gpt2fast.ops import resolve
    from gpt2fast.sampling import SamplingConfig

    out, err = consoles()
    sampling = dict(
        do_sample=args.do_sample,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        repetition_penalty=args.repetition_penalty,
        no_repeat_ngram_size=args.no_repeat_ngram_size,
    )
    try:
        SamplingConfig(**sampling)
    except (TypeError, ValueError) as exc:
        raise UsageError(f"invalid sampling settings: {exc}") from None
    if args.max_new_tokens < 1:
        raise UsageError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    prompt = args.prompt
    if not prompt:
        raise UsageError("--prompt is empty; give some text to continue")
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    tok = load_tokenizer(args)
    model = load_model(args, device, dtype, err)
    if tok.vocab_size > model.config.vocab_size:
        raise UsageError(f"the tokenizer has {tok.vocab_size} ids but the model only {model.config.vocab_size}")
    batch = tok.encode_batch([prompt], device=device)
    gen = torch.Generator(device=device).manual_seed(args.seed) if args.seed is not None else None
    stop = None if args.ignore_eos else tok.eos_token_id
    stream = model.generate_stream(
        batch.input_ids,
        batch.attention_mask,
        max_new_tokens=args.max_new_tokens,
        eos_token_id=stop,
        generator=gen,
        **sampling,
    )
    out.print(prompt, end="", style="bold", markup=False, highlight=False)
    decoder = tok.stream_decoder()
    n_new, t_first = 0, None
    _sync(device)
    t0 = time.perf_counter()
    for step in stream:
        token = int(step[0])
        if t_first is None:
            t_first = time.perf_counter()
        n_new += 1
        if stop is not None and token == stop:
            break
        piece = decoder.push([token])
        if piece:
            out.print(piece, end="", style="cyan", markup=False, highlight=False, soft_wrap=True)
    out.print(decoder.flush(), style="cyan", markup=False, highlight=False, soft_wrap=True)
    t_end = time.perf_counter()
    backend = resolve(model.backend, device).__name__.rsplit(".", 1)[-1]
    ttft = (t_first or t_end) - t0
    rate = (n_new - 1) / (t_end - t_first) if n_new > 1 and t_first and t_end > t_first else float("nan")
    err.print(
        f"[dim]{n_new} tokens in {t_end - t0:.2f} s: first token {ttft * 1e3:.0f} ms, "
        f"then {rate:.1f} tokens/s ({_dtype_name(dtype)}, {device}, backend {backend})[/dim]",
        soft_wrap=True,
    )
    return 0


def _add_generate(sub) -> None:
    p = sub.add_parser("generate", help="continue a prompt, streaming the text", description=cmd_generate.__doc__)
    _add_model_args(p, required=True)
    p.add_argument("--prompt", default="The fastest GPT-2 kernels", help="text to continue")
    p.add_argument("--tokenizer", metavar="PATH", help="tokenizer directory or .tiktoken file")
    p.add_argument("--max-new-tokens", type=int, default=50)
    p.add_argument("--do-sample", action="store_true", help="sample instead of greedy decoding")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0, help="0 disables")
    p.add_argument("--top-p", type=float, default=1.0, help="1.0 disables")
    p.add_argument("--repetition-penalty", type=float, default=1.0, help="1.0 disables")
    p.add_argument("--no-repeat-ngram-size", type=int, default=0, help="0 disables")
    p.add_argument("--seed", type=int, default=None, help="seed of the sampler")
    p.add_argument("--ignore-eos", action="store_true", help="keep going past <|endoftext|>")
    p.add_argument("--backend", choices=BACKEND_CHOICES, default=None, help="op backend (default auto)")
    p.add_argument("--dtype", choices=tuple(DTYPES), default=None, help="default fp16 on CUDA, fp32 on CPU")
    p.set_defaults(func=cmd_generate)


# ---- info ------------------------------------------------------------------------------------
def _version(module: str) -> str:
    try:
        mod = importlib.import_module(module)
    except Exception as exc:
        return f"not available ({type(exc).__name__}: {exc})"
    return getattr(mod, "__version__", "installed")


def _nvcc_version() -> str:
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return "not on PATH"
    try:
        text = subprocess.run([nvcc, "--version"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"{nvcc} (cannot run: {exc})"
    release = next((line.split("release")[-1].strip() for line in text.splitlines() if "release" in line), "?")
    return f"{release} ({nvcc})"


def cuda_extension_status() -> tuple[bool, str]:
    """Whether the compiled CUDA extension ``gpt2fast._C`` is built and importable, and why (not)."""
    if importlib.util.find_spec("gpt2fast._C") is None:
        return False, "not built (pip install -e . with nvcc on PATH builds it)"
    try:
        mod = importlib.import_module("gpt2fast._C")
    except Exception as exc:
        return False, f"built but fails to import: {exc}"
    return True, f"built ({getattr(mod, '__file__', '?')})"


def backend_rows(device: str) -> list[tuple[str, bool, str]]:
    """``(name, available, reason)`` for every backend on ``device``; a crashing check is reported, not raised."""
    from gpt2fast.ops import BACKENDS, backend_status

    rows = []
    for name in BACKENDS:
        try:
            s = backend_status(name, device)
            rows.append((name, s.available, s.reason))
        except Exception as exc:
            rows.append((name, False, f"availability check failed: {type(exc).__name__}: {exc}"))
    return rows


def cmd_info(args: argparse.Namespace) -> int:
    """Versions, devices, and which backends can run where (and why not)."""
    out, _ = consoles()
    from rich.table import Table

    import gpt2fast

    env = Table(title="environment", show_header=False)
    env.add_column(style="bold")
    env.add_column()
    ext_ok, ext_reason = cuda_extension_status()
    for key, value in [
        ("gpt2fast", gpt2fast.__version__),
        ("python", platform.python_version()),
        ("torch", torch.__version__),
        ("torch CUDA", torch.version.cuda or "none (CPU build)"),
        ("triton", _version("triton")),
        ("transformers", _version("transformers")),
        ("tokenizers", _version("tokenizers")),
        ("tiktoken", _version("tiktoken")),
        ("nvcc", _nvcc_version()),
        ("CUDA extension gpt2fast._C", ("[green]" if ext_ok else "[yellow]") + ext_reason),
    ]:
        env.add_row(key, value)
    out.print(env)

    devices = Table(title="devices")
    for col in ("device", "name", "capability", "memory"):
        devices.add_column(col)
    devices.add_row("cpu", platform.processor() or platform.machine(), "-", "-")
    n_cuda = torch.cuda.device_count() if torch.cuda.is_available() else 0
    for i in range(n_cuda):
        prop = torch.cuda.get_device_properties(i)
        devices.add_row(f"cuda:{i}", prop.name, f"sm_{prop.major}{prop.minor}", f"{prop.total_memory / 2**30:.1f} GiB")
    if not n_cuda:
        devices.add_row("cuda", "[yellow]no CUDA device visible", "-", "-")
    out.print(devices)

    table = Table(title="backends")
    for col in ("device", "backend", "available", "why"):
        table.add_column(col)
    for device in ("cpu", "cuda"):
        for name, ok, reason in backend_rows(device):
            table.add_row(device, name, "[green]yes" if ok else "[red]no", reason)
    out.print(table)
    return 0


# ---- parity ----------------------------------------------------------------------------------
@dataclass
class ParityRow:
    """One parity comparison: our logits (``path``: full forward or cached decode) against HF fp32."""

    dtype: str
    backend: str
    path: str
    err: float
    bound: float
    baseline_err: float
    greedy_agree: float
    ok: bool


def _hf_logits(ckpt: Path, dtype: torch.dtype, device: torch.device, ids: torch.Tensor) -> torch.Tensor:
    from transformers import GPT2LMHeadModel
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    model = GPT2LMHeadModel.from_pretrained(str(ckpt), dtype=dtype).to(device).eval()
    with torch.no_grad():
        logits = model(ids).logits.float()
    del model
    return logits


def _our_logits(model, ids: torch.Tensor, n_decode: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Full-forward logits ``[B, T, V]``, and the last ``n_decode + 1`` positions' logits computed
    through the KV cache (prefill of ``T - n_decode`` tokens, then one decode step per token)."""
    B, T = ids.shape
    with torch.no_grad():
        full = model(ids)
        model.setup_cache(B, T)
        steps = [model.prefill(ids[:, : T - n_decode])]
        steps += [model.decode_step(ids[:, j]) for j in range(T - n_decode, T)]
    return full, torch.stack(steps, dim=1)


def run_parity(
    ckpt: Path,
    ids: torch.Tensor,
    dtypes: Sequence[str],
    backends: Sequence[str],
    device: torch.device,
    n_decode: int,
    progress=None,
) -> list[ParityRow]:
    """Compare gpt2fast with transformers' ``GPT2LMHeadModel`` on checkpoint ``ckpt``.

    For every dtype and backend, our logits (full forward, and the cached prefill + decode path) are
    checked with :func:`gpt2fast.testing.fa_check` against transformers in fp32; in fp16/bf16 the
    baseline is transformers' own logits in that dtype.
    """
    from gpt2fast.model import GPT2
    from gpt2fast.testing import fa_check

    ids = ids.to(device)
    T = ids.shape[1]
    last = slice(T - n_decode - 1, T)
    ref32 = _hf_logits(ckpt, torch.float32, device, ids)
    rows = []
    for dname in dtypes:
        dtype = DTYPES[dname]
        base = None if dtype == torch.float32 else _hf_logits(ckpt, dtype, device, ids)
        model = GPT2.from_pretrained(ckpt, dtype=dtype, device=device, quiet=True)
        for backend in backends:
            model.backend = backend
            full, cached = _our_logits(model, ids, n_decode)
            for path, out, ref, bl in (
                ("forward", full, ref32, base),
                ("decode", cached, ref32[:, last], None if base is None else base[:, last]),
            ):
                res = fa_check(out, ref, bl)
                agree = (out.argmax(-1) == ref.argmax(-1)).float().mean().item()
                rows.append(ParityRow(dname, backend, path, res.err, res.bound, res.baseline_err, agree, res.ok))
            if progress is not None:
                progress()
        del model
    return rows


def _parity_backends(requested: list[str] | None, device: torch.device) -> list[str]:
    if requested:
        for name in requested:
            check_backend(name, device)
        return list(dict.fromkeys(requested))
    names = [name for name, ok, _ in backend_rows(str(device)) if ok]
    if not names:
        raise UsageError(f"no backend is available on {device}; see `gpt2fast info`")
    return names


def cmd_parity(args: argparse.Namespace) -> int:
    """Logits of gpt2fast vs transformers per dtype and backend; exit 1 past the FlashAttention tolerance."""
    from rich.progress import Progress
    from rich.table import Table

    from gpt2fast.config import GPT2Config
    from gpt2fast.model import GPT2

    out, err = consoles()
    try:
        import transformers  # noqa: F401
    except ImportError:
        raise UsageError("parity needs transformers: pip install 'gpt2fast[hf]'") from None
    device = resolve_device(args.device)
    dtypes = list(dict.fromkeys(args.dtype or (["fp32", "fp16", "bf16"])))
    backends = _parity_backends(args.backend, device)
    if args.seq_len < 2 or args.batch < 1:
        raise UsageError(f"--seq-len must be >= 2 and --batch >= 1, got {args.seq_len} and {args.batch}")
    n_decode = min(args.decode_steps, args.seq_len - 1)
    if n_decode < 0:
        raise UsageError(f"--decode-steps must be >= 0, got {args.decode_steps}")

    with contextlib.ExitStack() as stack:
        if args.model is not None:
            ckpt = Path(args.model)
            if not ckpt.is_dir():
                raise UsageError(f"--model {ckpt}: no such directory")
        else:
            ckpt = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="gpt2fast-parity-")))
            with _status(err, f"writing a random {args.random} checkpoint"):
                GPT2.random(size_config(args.random), seed=args.init_seed).save_pretrained(ckpt)
        config = GPT2Config.from_json(ckpt)
        if args.seq_len > config.n_positions:
            raise UsageError(f"--seq-len {args.seq_len} exceeds the model's n_positions={config.n_positions}")
        gen = torch.Generator().manual_seed(args.seed)
        ids = torch.randint(0, config.vocab_size, (args.batch, args.seq_len), generator=gen)
        with Progress(console=err, transient=True) as bar:
            task = bar.add_task("parity", total=len(dtypes) * len(backends))
            rows = run_parity(ckpt, ids, dtypes, backends, device, n_decode, lambda: bar.advance(task))

    table = Table(title=f"gpt2fast vs transformers: {args.model or 'random ' + args.random}, {device}")
    for col in ("dtype", "backend", "path", "max |Δ logits|", "bound", "argmax = HF fp32", "verdict"):
        table.add_column(col, justify="right" if col.startswith(("max", "bound", "argmax")) else "left")
    for r in rows:
        verdict = "[green]ok" if r.ok else "[bold red]FAIL"
        table.add_row(r.dtype, r.backend, r.path, f"{r.err:.3e}", f"{r.bound:.3e}", f"{r.greedy_agree:.1%}", verdict)
    out.print(table)
    ok = all(r.ok for r in rows)
    if args.json:
        doc = {
            "model": args.model or f"random:{args.random}",
            "device": str(device),
            "batch": args.batch,
            "seq_len": args.seq_len,
            "decode_steps": n_decode,
            "ok": ok,
            "results": [asdict(r) for r in rows],
        }
        Path(args.json).write_text(json.dumps(doc, indent=2) + "\n")
    failed = [f"{r.dtype}/{r.backend}/{r.path}" for r in rows if not r.ok]
    if failed:
        err.print(f"[bold red]parity FAILED[/bold red] for {', '.join(failed)} (FlashAttention tolerance)")
        return 1
    out.print(f"[green]parity ok[/green]: {len(rows)} checks within the FlashAttention tolerance")
    return 0


def _add_parity(sub) -> None:
    p = sub.add_parser("parity", help="compare logits with transformers", description=cmd_parity.__doc__)
    _add_model_args(p, required=True)
    p.add_argument("--dtype", action="append", choices=tuple(DTYPES), help="repeatable (default: all three)")
    p.add_argument("--backend", action="append", choices=BACKEND_CHOICES[1:], help="repeatable (default: available)")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seq-len", type=int, default=32)
    p.add_argument("--decode-steps", type=int, default=4, help="last positions also run through the KV cache")
    p.add_argument("--seed", type=int, default=0, help="seed of the random input ids")
    p.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    p.set_defaults(func=cmd_parity)


# ---- bench -----------------------------------------------------------------------------------
def _add_bench(sub) -> None:
    """``bench kernels`` / ``bench e2e`` from :mod:`gpt2fast.bench.cli`, or a stub that says why not."""
    try:
        from gpt2fast.bench.cli import add_bench_parser
    except Exception as exc:  # missing module or a missing optional dependency
        reason = f"{type(exc).__name__}: {exc}"

        def unavailable(args: argparse.Namespace) -> int:
            raise UsageError(f"bench is unavailable: cannot import gpt2fast.bench.cli ({reason})")

        p = sub.add_parser("bench", help="benchmarks (unavailable here)")
        p.add_argument("rest", nargs=argparse.REMAINDER)
        p.set_defaults(func=unavailable)
        return
    add_bench_parser(sub)


# ---- entry point -----------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    """The full ``gpt2fast`` argument parser."""
    parser = _Parser(prog=PROG, description="Custom Triton/CUDA kernels for GPT-2, checked against transformers.")
    parser.add_argument("--traceback", action="store_true", help="show the full traceback of an error")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    _add_generate(sub)
    info = sub.add_parser("info", help="versions, devices and backend availability", description=cmd_info.__doc__)
    info.set_defaults(func=cmd_info)
    _add_parity(sub)
    _add_bench(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``gpt2fast`` command line; returns the exit status."""
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

    text = " ".join(str(exc).split())
    return escape(text)


if __name__ == "__main__":
    sys.exit(main())
