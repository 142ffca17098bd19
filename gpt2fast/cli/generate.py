"""``gpt2fast generate``: stream a completion of a prompt, report tokens/s."""

from __future__ import annotations

import argparse
import time

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
    sync,
)


def run(args: argparse.Namespace) -> int:
    """Stream a completion of ``--prompt`` to stdout; report tokens/s on stderr."""
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
    sync(device)
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
    ttft = (t_first or t_end) - t0
    rate = (n_new - 1) / (t_end - t_first) if n_new > 1 and t_first and t_end > t_first else float("nan")
    err.print(
        f"[dim]{n_new} tokens in {t_end - t0:.2f} s: first token {ttft * 1e3:.0f} ms, "
        f"then {rate:.1f} tokens/s ({dtype_name(dtype)}, {device}, backend {backend_summary(args.backend, device)})"
        "[/dim]",
        soft_wrap=True,
    )
    return 0


def add_parser(sub: Subparsers) -> None:
    """Add ``generate`` to the ``gpt2fast`` subparsers."""
    p = sub.add_parser("generate", help="continue a prompt, streaming the text", description=run.__doc__)
    add_model_args(p, required=True)
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
    p.add_argument("--backend", default=None, help="op backend: auto (default) or a registered one (gpt2fast info)")
    p.add_argument("--dtype", choices=tuple(DTYPES), default=None, help="default fp16 on CUDA, fp32 on CPU")
    p.set_defaults(func=run)
