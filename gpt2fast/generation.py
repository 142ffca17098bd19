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
from typing import TYPE_CHECKING

import torch

from gpt2fast import checks
from gpt2fast.sampling import SamplingConfig, TokenHistory, process_logits, sample

#: How many decode steps run between two host checks of "has every sequence finished?".
CHECK_EVERY = 8
#: The KV cache length is rounded up to a multiple of this (capped at n_positions): generate calls with
#: nearby prompt lengths then share one cache allocation and one captured decode graph.
CACHE_ROUND = 128

if TYPE_CHECKING:
    from gpt2fast.model import GPT2

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


def make_step(model: GPT2, state: DecodeState, use_cuda_graph: bool | None = None) -> Step:
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


def _right_pad(input_ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Move each left-padded prompt to the start of its row; the tail is filled with token 0."""
    T = input_ids.shape[1]
    pads = (T - lengths.long())[:, None]
    cols = torch.arange(T, device=input_ids.device)[None, :]
    moved = input_ids.gather(1, (cols + pads).clamp(max=T - 1))
    return torch.where(cols < lengths.long()[:, None], moved, torch.zeros_like(moved))


def validate(
    model: GPT2,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    max_new_tokens: int,
    cfg: SamplingConfig,
    eos_token_id: int | list[int] | None,
    pad_token_id: int | None,
    generator: torch.Generator | None,
    use_cuda_graph: bool | None,
) -> _Request:
    """Check every argument of a generate call (raising before any model state changes); ``cfg`` checked
    itself when it was built.  Returns the right-padded prompts and their lengths."""
    model.check_ids(input_ids)
    device = model.wte.weight.device
    checks.check_int("max_new_tokens", max_new_tokens, 1)
    lengths = checks.check_attention_mask(input_ids, attention_mask)
    longest = int(lengths.max())
    checks.check_context(longest, max_new_tokens, model.config.n_positions)
    eos, pad_id = checks.check_special_tokens(eos_token_id, pad_token_id, model.config.vocab_size)
    checks.check_generator(generator, device)
    checks.check_use_cuda_graph(use_cuda_graph, device)
    prompts = _right_pad(input_ids, lengths)[:, :longest]
    eos_ids = torch.tensor(eos, dtype=torch.long, device=device) if eos else None
    return _Request(prompts, lengths, eos_ids, pad_id)


def _start(
    model: GPT2,
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
    model: GPT2,
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
    model: GPT2, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs
) -> Iterator[torch.Tensor]:
    """Validate now and return an iterator over each step's new tokens ``[B]`` (finished sequences get
    ``pad_token_id``); it stops once every sequence has finished.  Takes :func:`generate`'s arguments.

    The model's KV cache belongs to the stream until it is exhausted: do not interleave two streams
    (or a stream and another generate call) on one model.
    """
    return _start(model, input_ids, attention_mask, **kwargs, check_every=1)[1]
