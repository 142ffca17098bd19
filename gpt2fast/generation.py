"""Autoregressive generation on top of ``GPT2.prefill`` / ``GPT2.decode_step``, with transformers' semantics.

Input may be a Hugging Face style left-padded batch with an ``attention_mask``.  It is
turned into right-padded prompts plus per-sequence lengths for ``prefill`` (no mask
tensor reaches a kernel); each decode step then appends one token per sequence at
that sequence's own cache length.  The output has transformers' layout: the input
ids as given, followed by the new tokens, finished sequences padded with
``pad_token_id``.

One decode step is a single callable ``step(tokens[B]) -> next_tokens[B]`` made by
:func:`make_step`: the model's ``decode_step`` followed by :meth:`DecodeState.select`
(logits processors, sampling, history, EOS flags), all on the device with no host
sync.  On CUDA, :func:`make_step` uses ``gpt2fast.cuda_graph.make_graph_step`` when
that module exists, which may capture the step in a CUDA graph.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from gpt2fast.sampling import SamplingConfig, TokenHistory, process_logits, sample

#: How many decode steps run between two host checks of "has every sequence finished?".
CHECK_EVERY = 8
#: The KV cache length is rounded up to a multiple of this (capped at n_positions): generate calls with
#: nearby prompt lengths then share one cache allocation and one captured decode graph.
CACHE_ROUND = 128

Step = Callable[[torch.Tensor], torch.Tensor]


class DecodeState:
    """Everything one generate call keeps on the device between steps.

    ``history`` holds each sequence's prompt and new tokens (for the repetition
    penalty and no-repeat-ngram); ``done`` flags finished sequences; ``steps`` counts
    the steps taken while at least one sequence was unfinished (the output width).
    """

    def __init__(
        self,
        cfg: SamplingConfig,
        history: TokenHistory,
        eos_ids: torch.Tensor | None,
        pad_id: int,
        generator: torch.Generator | None,
    ) -> None:
        device = history.tokens.device
        B = history.tokens.shape[0]
        self.cfg, self.history, self.eos_ids, self.generator = cfg, history, eos_ids, generator
        self.pad = torch.tensor(pad_id, dtype=torch.long, device=device)
        self.done = torch.zeros(B, dtype=torch.bool, device=device)
        self.steps = torch.zeros((), dtype=torch.long, device=device)

    def select(self, logits: torch.Tensor) -> torch.Tensor:
        """Pick each sequence's next token from ``logits [B, V]`` and record it (pure tensor ops, no sync)."""
        tokens = sample(process_logits(logits, self.history, self.cfg), self.cfg, self.generator)
        self.steps += (~self.done).any().long()
        tokens = torch.where(self.done, self.pad, tokens)
        self.history.append(tokens)
        if self.eos_ids is not None:
            self.done |= (tokens[:, None] == self.eos_ids[None, :]).any(-1)
        return tokens


def make_step(model, state: DecodeState, use_cuda_graph: bool | None = None) -> Step:
    """Build ``step(tokens[B]) -> next_tokens[B]``: one decode step plus token selection.

    The seam for CUDA graphs: on a CUDA model with ``use_cuda_graph`` in (None, True) this
    returns ``gpt2fast.cuda_graph.make_graph_step(model, state, eager_step)`` if that module
    can be imported, else the eager step.  A replacement must have the same contract: read
    ``tokens``, update ``model.cache`` and ``state`` in place, return the next tokens.
    """

    def eager_step(tokens: torch.Tensor) -> torch.Tensor:
        return state.select(model.decode_step(tokens, check_ids=False))

    if model.wte.weight.device.type == "cuda" and use_cuda_graph is not False:
        try:
            from gpt2fast.cuda_graph import make_graph_step
        except ImportError:
            if use_cuda_graph:
                warnings.warn(
                    "use_cuda_graph=True but gpt2fast.cuda_graph is unavailable; running eagerly", stacklevel=3
                )
        else:
            return make_graph_step(model, state, eager_step)
    return eager_step


@dataclass
class _Request:
    """A validated generate call."""

    prompts: torch.Tensor  # [B, L] right-padded
    lengths: torch.Tensor  # [B] int32
    eos_ids: torch.Tensor | None
    pad_id: int


def _check_int(name: str, value, low: int, high: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {value!r}")
    if value < low or (high is not None and value >= high):
        bounds = f"[{low}, {high})" if high is not None else f">= {low}"
        raise ValueError(f"{name} must be {bounds}, got {value}")
    return value


def _prompt_lengths(input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """Per-sequence prompt lengths from a left-padding ``attention_mask`` (validated)."""
    B, T = input_ids.shape
    if attention_mask is None:
        return torch.full((B,), T, dtype=torch.int32, device=input_ids.device)
    if not isinstance(attention_mask, torch.Tensor):
        raise TypeError(f"attention_mask must be a torch.Tensor, got {type(attention_mask).__name__}")
    if tuple(attention_mask.shape) != (B, T):
        raise ValueError(f"attention_mask must have input_ids' shape {[B, T]}, got {list(attention_mask.shape)}")
    if attention_mask.dtype.is_floating_point or attention_mask.is_complex():
        raise TypeError(f"attention_mask must be an integer or bool tensor of 0/1, got {attention_mask.dtype}")
    if attention_mask.device != input_ids.device:
        raise RuntimeError(f"attention_mask is on {attention_mask.device} but input_ids is on {input_ids.device}")
    mask = attention_mask.long()
    if bool(((mask != 0) & (mask != 1)).any()):
        raise ValueError("attention_mask must hold only 0 and 1")
    lengths = mask.sum(1)
    left_padded = torch.arange(T, device=mask.device)[None, :] >= (T - lengths)[:, None]
    if not bool((left_padded == mask.bool()).all()):
        raise ValueError("attention_mask must be left-padded: each row is zeros followed by ones")
    if int(lengths.min()) < 1:
        raise ValueError("attention_mask has a row with no tokens; every prompt needs at least one")
    return lengths.to(torch.int32)


def _right_pad(input_ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Move each left-padded prompt to the start of its row; the tail is filled with token 0."""
    T = input_ids.shape[1]
    pads = (T - lengths.long())[:, None]
    cols = torch.arange(T, device=input_ids.device)[None, :]
    moved = input_ids.gather(1, (cols + pads).clamp(max=T - 1))
    return torch.where(cols < lengths.long()[:, None], moved, torch.zeros_like(moved))


def validate(
    model,
    input_ids,
    attention_mask,
    max_new_tokens,
    cfg: SamplingConfig,
    eos_token_id,
    pad_token_id,
    generator,
    use_cuda_graph,
) -> _Request:
    """Check every argument of a generate call (raising before any model state changes)."""
    model.check_ids(input_ids)
    V, n_pos = model.config.vocab_size, model.config.n_positions
    device = model.wte.weight.device
    _check_int("max_new_tokens", max_new_tokens, 1)
    lengths = _prompt_lengths(input_ids, attention_mask)
    longest = int(lengths.max())
    if longest + max_new_tokens > n_pos:
        raise ValueError(
            f"prompt length {longest} + max_new_tokens {max_new_tokens} exceeds the model's n_positions={n_pos}"
        )
    if eos_token_id is None:
        eos = []
    elif isinstance(eos_token_id, (list, tuple)):
        eos = [_check_int("eos_token_id", e, 0, V) for e in eos_token_id]
    else:
        eos = [_check_int("eos_token_id", eos_token_id, 0, V)]
    if pad_token_id is None:
        pad_token_id = eos[0] if eos else 0
    _check_int("pad_token_id", pad_token_id, 0)
    if generator is not None:
        if not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
        gen_device = generator.device
        if gen_device.type != device.type or gen_device.index not in (None, device.index):
            # another GPU's generator: its graph-safe seed/offset tensors live there, out of the graph's reach
            raise ValueError(f"generator is on {gen_device} but the model is on {device}")
    if use_cuda_graph not in (None, True, False):
        raise TypeError(f"use_cuda_graph must be None or a bool, got {use_cuda_graph!r}")
    if use_cuda_graph and device.type != "cuda":
        raise ValueError(f"use_cuda_graph=True needs a CUDA model; this one is on {device}")
    prompts = _right_pad(input_ids, lengths)[:, :longest]
    eos_ids = torch.tensor(eos, dtype=torch.long, device=device) if eos else None
    return _Request(prompts, lengths, eos_ids, pad_token_id)


def _start(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    max_new_tokens: int = 20,
    eos_token_id: int | list[int] | None = None,
    pad_token_id: int | None = None,
    generator: torch.Generator | None = None,
    use_cuda_graph: bool | None = None,
    *,
    check_every: int,
    **sampling_knobs,
) -> tuple[DecodeState, Iterator[torch.Tensor]]:
    """Validate a generate call, set up the cache and state, and return them with the token iterator.

    ``sampling_knobs`` are :class:`SamplingConfig`'s fields.  The iterator yields each step's tokens
    ``[B]`` (on the device) and stops once every sequence has finished (checked on the host every
    ``check_every`` steps) or after ``max_new_tokens``.
    """
    cfg = SamplingConfig(**sampling_knobs)
    req = validate(model, input_ids, attention_mask, max_new_tokens, cfg, eos_token_id, pad_token_id, generator,
                   use_cuda_graph)  # fmt: skip
    B, L = req.prompts.shape
    # Rounded up, so calls with nearby lengths reuse one cache and one captured graph.
    cache_len = min(model.config.n_positions, -(-(L + max_new_tokens - 1) // CACHE_ROUND) * CACHE_ROUND)
    model.setup_cache(B, cache_len)
    history = TokenHistory.from_prompts(req.prompts, req.lengths, cache_len + 1)
    state = DecodeState(cfg, history, req.eos_ids, req.pad_id, generator)
    step = make_step(model, state, use_cuda_graph)

    @torch.no_grad()  # as a decorator, so grad mode is restored around every yield
    def tokens() -> Iterator[torch.Tensor]:
        new = state.select(model.prefill(req.prompts, req.lengths))
        yield new
        for i in range(1, max_new_tokens):
            if req.eos_ids is not None and i % check_every == 0 and bool(state.done.all()):
                return
            new = step(new)
            yield new

    return state, tokens()


def generate(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    max_new_tokens: int = 20,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    repetition_penalty: float = 1.0,
    no_repeat_ngram_size: int = 0,
    eos_token_id: int | list[int] | None = None,
    pad_token_id: int | None = None,
    generator: torch.Generator | None = None,
    use_cuda_graph: bool | None = None,
) -> torch.Tensor:
    """Generate like transformers' ``generate``; returns ``[B, T + n]``: ``input_ids`` followed by
    ``n <= max_new_tokens`` new tokens (``n < max_new_tokens`` only when every sequence hit EOS).

    ``input_ids [B, T]`` may be left-padded, with ``attention_mask`` (1 = token, 0 = padding).
    Knobs follow transformers: ``top_k=0``, ``top_p=1.0``, ``repetition_penalty=1.0`` and
    ``no_repeat_ngram_size=0`` disable themselves; greedy decoding ignores temperature/top-k/top-p;
    the repetition penalty covers the prompt.  ``eos_token_id`` (an id or a list) stops each sequence
    on its own; ``None`` never stops early.  Finished sequences are padded with ``pad_token_id``
    (default: the first EOS id).  ``generator`` seeds sampling.  ``use_cuda_graph``: see :func:`make_step`.
    """
    knobs = dict(do_sample=do_sample, temperature=temperature, top_k=top_k, top_p=top_p)
    knobs.update(repetition_penalty=repetition_penalty, no_repeat_ngram_size=no_repeat_ngram_size)
    state, stream = _start(model, input_ids, attention_mask, max_new_tokens, eos_token_id, pad_token_id, generator,
                           use_cuda_graph, check_every=CHECK_EVERY, **knobs)  # fmt: skip
    new = torch.stack(list(stream), dim=1)
    width = int(state.steps)  # the host sync that trims steps taken after every sequence finished
    return torch.cat([input_ids, new[:, :width].to(input_ids.dtype)], dim=1)


def generate_stream(
    model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs
) -> Iterator[torch.Tensor]:
    """Validate now and return an iterator over each step's new tokens ``[B]`` (finished sequences get
    ``pad_token_id``); it stops once every sequence has finished.  Takes :func:`generate`'s arguments.

    The model's KV cache belongs to the stream until it is exhausted: do not interleave two streams
    (or a stream and another generate call) on one model.
    """
    return _start(model, input_ids, attention_mask, **kwargs, check_every=1)[1]
