"""``gpt2fast serve``: an OpenAI-compatible completions server on the continuous-batching engine."""

from __future__ import annotations

import argparse

from gpt2fast.cli._common import (
    DTYPES,
    Subparsers,
    UsageError,
    add_model_args,
    consoles,
    dtype_name,
    load_model,
    load_tokenizer,
    resolve_device,
    resolve_dtype,
)

ENGINES = ("gpt2fast", "naive")


def build_engine(args: argparse.Namespace, model):
    """The engine ``--engine`` names, over ``model`` (``naive``: a transformers copy of it, one request at a time)."""
    if args.engine == "naive":
        from gpt2fast.serve.naive import NaiveEngine, hf_copy

        return NaiveEngine(hf_copy(model), max_queue=args.max_queue, max_len=args.max_len)
    from gpt2fast.serve import Engine

    return Engine(model, max_batch=args.max_batch, max_queue=args.max_queue, max_len=args.max_len,
                  prefill_chunk=args.prefill_chunk, use_cuda_graph=False if args.no_cuda_graph else None)  # fmt: skip


def check_args(args: argparse.Namespace) -> None:
    """Refuse bad numbers before anything loads (exit 2)."""
    for name in ("max_batch", "prefill_chunk"):
        if getattr(args, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.max_queue < 0:
        raise UsageError(f"--max-queue must be >= 0, got {args.max_queue}")
    if not 0 <= args.port < 65536:
        raise UsageError(f"--port must lie in [0, 65535], got {args.port}")
    if args.max_len is not None and args.max_len < 2:
        raise UsageError(f"--max-len must be >= 2, got {args.max_len}")
    if args.threads is not None and args.threads < 1:
        raise UsageError(f"--threads must be >= 1, got {args.threads}")


def run(args: argparse.Namespace) -> int:
    """Load the model, start the engine thread and serve HTTP until interrupted (SIGINT/SIGTERM drain)."""
    check_args(args)
    try:
        import uvicorn

        from gpt2fast.serve.server import create_app
    except ImportError as exc:
        raise UsageError(f"gpt2fast serve needs the serve extra (pip install 'gpt2fast[serve]'): {exc}") from None
    _, err = consoles()
    if args.threads is not None:
        import torch

        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    tok = load_tokenizer(args)
    model = load_model(args, device, dtype, err)
    if tok.vocab_size > model.config.vocab_size:
        raise UsageError(f"the tokenizer has {tok.vocab_size} ids but the model only {model.config.vocab_size}")
    if args.max_len is not None and args.max_len > model.config.n_positions:
        raise UsageError(f"--max-len {args.max_len} exceeds the model's context of {model.config.n_positions}")
    name = args.model_name or args.model or args.random
    engine = build_engine(args, model)
    app = create_app(engine, tok, name, drain_timeout=args.drain_timeout)
    err.print(f"[dim]serving {name} ({args.engine}, {dtype_name(dtype)}, {device}, {args.max_batch} slots) on "
              f"http://{args.host}:{args.port}[/dim]", soft_wrap=True)  # fmt: skip
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level, timeout_graceful_shutdown=None)
    return 0


def add_parser(sub: Subparsers) -> None:
    """Add ``serve`` to the ``gpt2fast`` subparsers."""
    p = sub.add_parser("serve", help="OpenAI-compatible completions server (continuous batching)",
                       description=run.__doc__)  # fmt: skip
    add_model_args(p, required=True)
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1, loopback only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--max-batch", type=int, default=16, help="cache slots: requests decoding at once (default 16)")
    p.add_argument("--max-queue", type=int, default=256, help="requests waiting for a slot before 429 (default 256)")
    p.add_argument("--max-len", type=int, default=None, help="positions per slot (default: the model's context)")
    p.add_argument("--prefill-chunk", type=int, default=256, help="prompt tokens prefilled per step (default 256)")
    p.add_argument("--model-name", default=None, help="the model id clients send (default: --model or --random)")
    p.add_argument("--tokenizer", metavar="PATH", help="tokenizer directory or .tiktoken file")
    p.add_argument("--backend", default=None, help="op backend: auto (default) or a registered one (gpt2fast info)")
    p.add_argument("--dtype", choices=tuple(DTYPES), default=None, help="default fp16 on CUDA, fp32 on CPU")
    p.add_argument(
        "--engine",
        choices=ENGINES,
        default="gpt2fast",
        help="gpt2fast (continuous batching) or naive (transformers generate per request: the baseline)",
    )
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (CPU; default torch's)")
    p.add_argument("--no-cuda-graph", action="store_true", help="decode eagerly on CUDA")
    p.add_argument("--drain-timeout", type=float, default=30.0, help="seconds shutdown waits for running requests")
    p.add_argument("--log-level", default="warning", choices=("critical", "error", "warning", "info", "debug"))
    p.set_defaults(func=run)
