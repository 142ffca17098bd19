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


def _early_stopping(text: str) -> bool | str:
    choices = {"true": True, "false": False, "never": "never"}
    if text.lower() not in choices:
        raise argparse.ArgumentTypeError("--early-stopping must be true, false or never")
    return choices[text.lower()]


def add_generation_args(p: argparse.ArgumentParser, max_new_tokens: int = 50) -> None:
    """The generation knobs every generating command takes (see :data:`gpt2fast.generation.KNOBS`)."""
    p.add_argument("--max-new-tokens", type=int, default=max_new_tokens)
    p.add_argument("--min-new-tokens", type=int, default=0, help="EOS is banned before this many new tokens")
    p.add_argument("--do-sample", action="store_true", help="sample instead of greedy decoding")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0, help="0 disables")
    p.add_argument("--top-p", type=float, default=1.0, help="1.0 disables")
    p.add_argument("--min-p", type=float, default=None, help="unset disables")
    p.add_argument("--typical-p", type=float, default=1.0, help="1.0 disables")
    p.add_argument("--repetition-penalty", type=float, default=1.0, help="1.0 disables")
    p.add_argument("--no-repeat-ngram-size", type=int, default=0, help="0 disables")
    p.add_argument(
        "--bad-word",
        action="append",
        default=None,
        metavar="TEXT",
        help="never generate TEXT's tokens in a row (repeatable; include a leading space for a word)",
    )
    p.add_argument("--stop", action="append", default=None, metavar="TEXT", help="stop string (repeatable)")
    p.add_argument("--num-beams", type=int, default=1, help="beam search with this many beams (1: off)")
    p.add_argument("--length-penalty", type=float, default=1.0, help="beam search: score / new_tokens ** this")
    p.add_argument("--early-stopping", type=_early_stopping, default=False, help="beam search: true, false, never")
    p.add_argument("--seed", type=int, default=None, help="seed of the sampler")
    p.add_argument("--ignore-eos", action="store_true", help="keep going past <|endoftext|>")  # fmt: skip


def generation_kwargs(args: argparse.Namespace, tok) -> dict:
    """``generate``'s keyword arguments from :func:`add_generation_args`' options (checked by ``generate``)."""
    kw = dict(
        max_new_tokens=args.max_new_tokens,
        min_new_tokens=args.min_new_tokens,
        do_sample=args.do_sample,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        min_p=args.min_p,
        typical_p=args.typical_p,
        repetition_penalty=args.repetition_penalty,
        no_repeat_ngram_size=args.no_repeat_ngram_size,
        num_beams=args.num_beams,
        length_penalty=args.length_penalty,
        early_stopping=args.early_stopping,
        eos_token_id=None if args.ignore_eos else tok.eos_token_id,
    )
    if args.bad_word:
        kw["bad_words_ids"] = [tok.encode(w) for w in args.bad_word]
    if args.stop:
        kw.update(stop_strings=list(args.stop), tokenizer=tok)
    return kw


def _check(args: argparse.Namespace) -> None:
    from gpt2fast.sampling import SamplingConfig

    try:
        SamplingConfig(
            do_sample=args.do_sample, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
            repetition_penalty=args.repetition_penalty, no_repeat_ngram_size=args.no_repeat_ngram_size,
            min_p=args.min_p, typical_p=args.typical_p, min_new_tokens=args.min_new_tokens,
        )  # fmt: skip
    except (TypeError, ValueError) as exc:
        raise UsageError(f"invalid sampling settings: {exc}") from None
    if args.max_new_tokens < 1:
        raise UsageError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    if args.num_beams < 1:
        raise UsageError(f"--num-beams must be >= 1, got {args.num_beams}")
    if any(not w for w in args.bad_word or ()):
        raise UsageError("--bad-word is empty; give the text to ban")
    if any(not s for s in args.stop or ()):
        raise UsageError("--stop is empty; give the text to stop at")


def load_for_generation(args: argparse.Namespace, err) -> tuple:
    """``(device, dtype, tokenizer, model, generator)`` of a generating command's options."""
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    tok = load_tokenizer(args)
    model = load_model(args, device, dtype, err)
    if tok.vocab_size > model.config.vocab_size:
        raise UsageError(f"the tokenizer has {tok.vocab_size} ids but the model only {model.config.vocab_size}")
    gen = torch.Generator(device=device).manual_seed(args.seed) if args.seed is not None else None
    return device, dtype, tok, model, gen


def run(args: argparse.Namespace) -> int:
    """Stream a completion of ``--prompt`` to stdout (beam search: print the best beam at the end); report tokens/s
    on stderr."""
    out, err = consoles()
    _check(args)
    prompt = args.prompt
    if not prompt:
        raise UsageError("--prompt is empty; give some text to continue")
    device, dtype, tok, model, gen = load_for_generation(args, err)
    batch = tok.encode_batch([prompt], device=device)
    kw = generation_kwargs(args, tok)
    stop = kw["eos_token_id"]
    out.print(prompt, end="", style="bold", markup=False, highlight=False)
    sync(device)
    t0 = time.perf_counter()
    if args.num_beams > 1:  # the best beam is only known at the end: no streaming
        new = model.generate(batch.input_ids, batch.attention_mask, generator=gen, **kw)[0, batch.input_ids.shape[1] :]
        ids = new.tolist()
        ids = ids[: ids.index(stop)] if stop is not None and stop in ids else ids
        out.print(tok.decode(ids), style="cyan", markup=False, highlight=False, soft_wrap=True)
        n_new, t_first = new.numel(), None
    else:
        stream = model.generate_stream(batch.input_ids, batch.attention_mask, generator=gen, **kw)
        decoder = tok.stream_decoder()
        n_new, t_first = 0, None
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
    add_model_args(p, required=False)  # neither --model nor --random: the shipped default model
    p.add_argument("--prompt", default="The fastest GPT-2 kernels", help="text to continue")
    p.add_argument("--tokenizer", metavar="PATH", help="tokenizer directory or .tiktoken file")
    add_generation_args(p)
    p.add_argument("--backend", default=None, help="op backend: auto (default) or a registered one (gpt2fast info)")
    p.add_argument("--dtype", choices=tuple(DTYPES), default=None, help="default fp16 on CUDA, fp32 on CPU")
    p.set_defaults(func=run)
