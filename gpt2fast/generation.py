"""Autoregressive generation on top of ``GPT2.prefill`` / ``GPT2.decode_step``, with transformers' semantics.

Input may be a Hugging Face style left-padded batch with an ``attention_mask``.  It is
turned into right-padded prompts plus per-sequence lengths for ``prefill`` (no mask
tensor reaches a kernel); each decode step then appends one token per sequence at
that sequence's own cache length.  The output has transformers' layout: the input
ids as given, followed by the new tokens, finished sequences padded with
``pad_token_id``.

Knobs arrive as keyword arguments and/or a transformers ``GenerationConfig``
(:func:`resolve_knobs`: keyword arguments win, as in transformers).  Every knob
gpt2fast implements is in :data:`KNOBS`; a transformers knob it does not implement
(:data:`REFUSED`) raises a ``ValueError`` naming it unless it holds its inert default,
and an unknown name raises ``TypeError``.  Nothing is silently ignored.

One decode step is a single callable ``step(tokens[B]) -> next_tokens[B]`` made by
:func:`make_step`: the model's ``decode_step`` followed by the decode state's ``select``
(logits processors, sampling, history, EOS and stop-string flags; for beam search the
beam bookkeeping and the KV-cache reorder, see :mod:`gpt2fast.beam`), all on the device
with no host sync.  On CUDA, :func:`make_step` uses ``gpt2fast.cuda_graph.make_graph_step``
when that module exists, which may capture the step in a CUDA graph.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from gpt2fast import checks
from gpt2fast.sampling import LogitRules, SamplingConfig, TokenHistory, process_logits, sample
from gpt2fast.stopping import StopStrings, check_stop_strings

#: How many decode steps run between two host checks of "has every sequence finished?".
CHECK_EVERY = 8
#: The KV cache length is rounded up to a multiple of this (capped at n_positions): generate calls with
#: nearby prompt lengths then share one cache allocation and one captured decode graph.
CACHE_ROUND = 128

if TYPE_CHECKING:
    from gpt2fast.model import GPT2

Step = Callable[[torch.Tensor], torch.Tensor]

# ---- the knobs ------------------------------------------------------------------------------------------------
#: Every generation knob gpt2fast implements, with its default (transformers' semantics; ``top_k`` defaults to 0,
#: off, where transformers' global default is 50).
KNOBS: dict[str, object] = {
    "max_new_tokens": None,  # None: from max_length, else 20
    "max_length": None,  # prompt width + new tokens, as in transformers (max_new_tokens wins when both are given)
    "min_new_tokens": 0,
    "min_length": 0,
    "do_sample": False,
    "temperature": 1.0,
    "top_k": 0,
    "top_p": 1.0,
    "min_p": None,
    "typical_p": 1.0,
    "repetition_penalty": 1.0,
    "no_repeat_ngram_size": 0,
    "bad_words_ids": None,
    "eos_token_id": None,
    "pad_token_id": None,
    "num_beams": 1,
    "length_penalty": 1.0,
    "early_stopping": False,
    "num_return_sequences": 1,
    "stop_strings": None,
    "return_dict_in_generate": False,
}
#: Knobs whose value may legitimately be None (for the others, None means "the default").
_NONE_MEANS_NONE = frozenset({"max_new_tokens", "max_length", "min_p", "bad_words_ids", "eos_token_id",
                              "pad_token_id", "stop_strings"})  # fmt: skip
#: Accepted and without effect on the output: bookkeeping fields, the BOS id (unused when input ids are given), and
#: how transformers caches (gpt2fast always decodes on its static KV cache).
NO_EFFECT = frozenset({"transformers_version", "_from_model_config", "bos_token_id", "use_cache",
                       "cache_implementation", "cache_config", "compile_config", "disable_compile"})  # fmt: skip
#: transformers knobs gpt2fast refuses, each with its inert value(s) (accepted: they change nothing).
REFUSED: dict[str, tuple] = {
    "output_scores": (False,),
    "output_logits": (False,),
    "output_attentions": (False,),
    "output_hidden_states": (False,),
    "num_beam_groups": (1,),
    "diversity_penalty": (0.0,),
    "penalty_alpha": (),
    "top_h": (),
    "epsilon_cutoff": (0.0,),
    "eta_cutoff": (0.0,),
    "encoder_repetition_penalty": (1.0,),
    "encoder_no_repeat_ngram_size": (0,),
    "force_words_ids": (),
    "constraints": (),
    "sequence_bias": (),
    "guidance_scale": (1.0,),
    "forced_bos_token_id": (),
    "forced_eos_token_id": (),
    "remove_invalid_values": (False,),
    "exponential_decay_length_penalty": (),
    "suppress_tokens": (),
    "begin_suppress_tokens": (),
    "renormalize_logits": (False,),
    "watermarking_config": (),
    "max_time": (),
    "decoder_start_token_id": (),
    "low_memory": (False,),
    "token_healing": (False,),
    "dola_layers": (),
    "prompt_lookup_num_tokens": (),
    "max_matching_ngram_size": (),
    "is_assistant": (False,),
    "num_assistant_tokens": (20,),
    "num_assistant_tokens_schedule": ("constant",),
    "assistant_confidence_threshold": (0.4,),
    "assistant_lookbehind": (10,),
    "target_lookbehind": (10,),
    "assistant_early_exit": (),
    "assistant_ensemble_weight": (),
    "speculation_type": (),
    "use_mtp": (False,),
    "prefill_chunk_size": (),
    "max_cache_len": (),
    "continuous_batching_config": (),
    # transformers generate() arguments that are not GenerationConfig fields
    "logits_processor": (),
    "stopping_criteria": (),
    "prefix_allowed_tokens_fn": (),
    "synced_gpus": (False,),
    "assistant_model": (),
    "streamer": (),
    "negative_prompt_ids": (),
    "negative_prompt_attention_mask": (),
    "custom_generate": (),
    "assistant_tokenizer": (),
}
_WHY = {
    "output_scores": "per-step scores are not returned; return_dict_in_generate=True returns sequences and, with "
    "beam search, sequences_scores",
}


def _refuse(label: str, name: str, value: object) -> ValueError:
    why = _WHY.get(name, "gpt2fast's generate does not implement it")
    return ValueError(f"{label}={value!r} is not supported ({why}); see gpt2fast.generation.KNOBS for what is")


def _take(values: dict, name: str, value: object, label: str, from_config: bool) -> None:
    if name in KNOBS:
        if not (from_config and value is None):  # a config's None is "unset"
            values[name] = value
    elif name in NO_EFFECT:
        pass
    elif name in REFUSED:
        inert = REFUSED[name]
        if value is not None and not any(value == v and isinstance(value, bool) == isinstance(v, bool) for v in inert):
            raise _refuse(label, name, value)
    elif from_config:
        if value is not None:
            raise ValueError(f"{label}={value!r} is not a generation knob gpt2fast knows; remove it")
    else:
        raise TypeError(f"generate() got an unexpected keyword argument {name!r}")


def resolve_knobs(generation_config: object, knobs: dict) -> dict:
    """The knobs of one call: :data:`KNOBS`' defaults, then ``generation_config``'s set fields (a transformers
    ``GenerationConfig``, or None), then the keyword arguments ``knobs``.  Raises for a refused or unknown knob,
    naming it.  Values are checked later, by :func:`check_knobs`."""
    values = dict(KNOBS)
    if generation_config is not None:
        to_dict = getattr(generation_config, "to_dict", None)
        if not callable(to_dict):
            raise TypeError(
                f"generation_config must be a transformers GenerationConfig, got {type(generation_config).__name__}"
            )
        for name, value in to_dict().items():
            _take(values, name, value, f"generation_config.{name}", from_config=True)
    for name, value in knobs.items():
        _take(values, name, value, name, from_config=False)
    for name, default in KNOBS.items():
        if values[name] is None and name not in _NONE_MEANS_NONE:
            values[name] = default
    return values


@dataclass(frozen=True)
class Knobs:
    """A call's checked knobs (see :data:`KNOBS`); ``sampling`` holds the logits processors' part."""

    sampling: SamplingConfig
    max_new_tokens: int
    eos: tuple[int, ...]
    pad_token_id: int | None
    num_beams: int
    length_penalty: float
    early_stopping: bool | str
    num_return_sequences: int
    stop_strings: tuple[str, ...] | None
    return_dict_in_generate: bool


def check_knobs(values: dict, prompt_width: int, vocab_size: int, tokenizer: object) -> Knobs:
    """Check the resolved knobs (raising ``TypeError``/``ValueError`` that names the first bad one) for prompts of
    padded width ``prompt_width``."""
    max_new, max_length = values["max_new_tokens"], values["max_length"]
    if max_new is None and max_length is not None:
        checks.check_int("max_length", max_length, 1)
        if max_length <= prompt_width:
            raise ValueError(f"max_length={max_length} leaves no room after the prompt's {prompt_width} tokens")
        max_new = max_length - prompt_width
    max_new = 20 if max_new is None else max_new
    checks.check_int("max_new_tokens", max_new, 1)
    bad_words = values["bad_words_ids"]
    if bad_words is not None and not isinstance(bad_words, (list, tuple)):
        raise ValueError(f"bad_words_ids must be a list of lists of token ids, got {bad_words!r}")
    names = ("do_sample", "temperature", "top_k", "top_p", "repetition_penalty", "no_repeat_ngram_size", "min_p",
             "typical_p", "bad_words_ids", "min_new_tokens", "min_length")  # fmt: skip
    sampling = SamplingConfig(**{n: values[n] for n in names})
    eos, _ = checks.check_special_tokens(values["eos_token_id"], values["pad_token_id"], vocab_size)
    pad = values["pad_token_id"]
    if pad is not None:
        checks.check_int("pad_token_id", pad, 0)
    num_beams = checks.check_int("num_beams", values["num_beams"], 1)
    nret = checks.check_int("num_return_sequences", values["num_return_sequences"], 1)
    lp = values["length_penalty"]
    if isinstance(lp, bool) or not isinstance(lp, (int, float)) or not math.isfinite(lp):
        raise TypeError(f"length_penalty must be a finite number, got {lp!r}")
    early = values["early_stopping"]
    if early not in (True, False, "never") or not isinstance(early, (bool, str)):
        raise ValueError(f"early_stopping must be True, False or 'never', got {early!r}")
    if num_beams > 1:
        if sampling.do_sample:
            raise ValueError("do_sample=True with num_beams > 1 (beam sampling) is not supported; use one of them")
        if nret > num_beams:
            raise ValueError(f"num_return_sequences={nret} must be <= num_beams={num_beams}")
    elif nret > 1 and not sampling.do_sample:
        raise ValueError(
            f"num_return_sequences={nret} needs do_sample=True or num_beams >= {nret} (greedy search returns one)"
        )
    stop = values["stop_strings"]
    if stop is not None:
        stop = check_stop_strings(stop)
        if tokenizer is None:
            raise ValueError("stop_strings needs tokenizer= (a gpt2fast.Tokenizer or a transformers tokenizer)")
    ret = values["return_dict_in_generate"]
    if not isinstance(ret, bool):
        raise TypeError(f"return_dict_in_generate must be a bool, got {ret!r}")
    return Knobs(sampling, max_new, tuple(eos), pad, num_beams, float(lp), early, nret, stop, ret)


# ---- outputs ----------------------------------------------------------------------------------------------------
@dataclass
class GenerateOutput:
    """What ``generate(..., return_dict_in_generate=True)`` returns: ``sequences`` (as ``generate`` returns them)
    and, for beam search, ``sequences_scores`` ``[B * num_return_sequences]`` (each returned beam's
    length-penalised log-probability, as transformers' ``sequences_scores``; None otherwise)."""

    sequences: torch.Tensor
    sequences_scores: torch.Tensor | None = None


# ---- greedy and sampling --------------------------------------------------------------------------------------
class DecodeState:
    """Everything one generate call keeps on the device between steps.

    ``history`` holds each sequence's prompt and new tokens (for the repetition
    penalty, no-repeat-ngram, bad words and min-new-tokens); ``done`` flags finished sequences; ``steps`` counts
    the steps taken while at least one sequence was unfinished (the output width).  ``rules`` holds the
    processors' tensors (:class:`~gpt2fast.sampling.LogitRules`), ``stop`` the stop-string windows
    (:class:`~gpt2fast.stopping.StopStrings`).  As in transformers, finished sequences get ``pad_id`` only when
    there are EOS ids; a sequence stopped by a stop string alone keeps generating (its tokens are still output
    while another sequence runs).
    """

    def __init__(
        self,
        cfg: SamplingConfig,
        history: TokenHistory,
        eos_ids: torch.Tensor | None,
        pad_id: int,
        generator: torch.Generator | None,
        rules: LogitRules | None = None,
        stop: StopStrings | None = None,
    ) -> None:
        device = history.tokens.device
        B = history.tokens.shape[0]
        self.cfg, self.history, self.eos_ids, self.generator = cfg, history, eos_ids, generator
        self.rules = rules if rules is not None and rules.active else None
        self.stop = stop
        self.pad = torch.tensor(pad_id, dtype=torch.long, device=device)
        self.done = torch.zeros(B, dtype=torch.bool, device=device)
        self.steps = torch.zeros((), dtype=torch.long, device=device)

    def select(self, logits: torch.Tensor) -> torch.Tensor:
        """Pick each sequence's next token from ``logits [B, V]`` and record it (pure tensor ops, no sync)."""
        tokens = sample(process_logits(logits, self.history, self.cfg, self.rules), self.cfg, self.generator)
        self.steps += (~self.done).any().long()
        if self.eos_ids is not None:
            tokens = torch.where(self.done, self.pad, tokens)
        self.history.append(tokens)
        if self.eos_ids is not None:
            self.done |= (tokens[:, None] == self.eos_ids[None, :]).any(-1)
        if self.stop is not None:
            self.done |= self.stop.push(tokens)
        return tokens

    @property
    def finished(self) -> torch.Tensor:
        """A 0-d bool tensor: every sequence has finished."""
        return self.done.all()


def make_step(model: GPT2, state: object, use_cuda_graph: bool | None = None) -> Step:
    """Build ``step(tokens[B]) -> next_tokens[B]``: one decode step plus ``state.select`` (a :class:`DecodeState`
    or a :class:`gpt2fast.beam.BeamState`).

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
class Request:
    """A validated generate call: right-padded prompts (one row per returned sequence or beam), their lengths, the
    EOS ids (a device tensor, or None), the pad id, the cache length and the knobs."""

    prompts: torch.Tensor  # [R, L] right-padded
    lengths: torch.Tensor  # [R] int32
    eos_ids: torch.Tensor | None
    pad_id: int
    cache_len: int
    knobs: Knobs


def _right_pad(input_ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Move each left-padded prompt to the start of its row; the tail is filled with token 0."""
    T = input_ids.shape[1]
    pads = (T - lengths.long())[:, None]
    cols = torch.arange(T, device=input_ids.device)[None, :]
    moved = input_ids.gather(1, (cols + pads).clamp(max=T - 1))
    return torch.where(cols < lengths.long()[:, None], moved, torch.zeros_like(moved))


def prepare(
    model: GPT2,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    knobs: dict,
    generation_config: object,
    generator: torch.Generator | None,
    use_cuda_graph: bool | None,
    tokenizer: object,
) -> Request:
    """Check every argument of a generate call (raising before any model state changes).  Returns the
    right-padded prompts and their lengths, each repeated ``num_beams`` (beam search) or
    ``num_return_sequences`` (sampling) times, as transformers expands them."""
    model.check_ids(input_ids)
    device = model.wte.weight.device
    k = check_knobs(resolve_knobs(generation_config, knobs), input_ids.shape[1], model.config.vocab_size, tokenizer)
    lengths = checks.check_attention_mask(input_ids, attention_mask)
    longest = int(lengths.max())
    checks.check_context(longest, k.max_new_tokens, model.config.n_positions)
    checks.check_generator(generator, device)
    checks.check_use_cuda_graph(use_cuda_graph, device)
    pad_id = k.pad_token_id if k.pad_token_id is not None else (k.eos[0] if k.eos else 0)
    prompts = _right_pad(input_ids, lengths)[:, :longest]
    copies = k.num_beams if k.num_beams > 1 else k.num_return_sequences
    if copies > 1:
        prompts, lengths = prompts.repeat_interleave(copies, 0), lengths.repeat_interleave(copies, 0)
    eos_ids = torch.tensor(k.eos, dtype=torch.long, device=device) if k.eos else None
    # Rounded up, so calls with nearby lengths reuse one cache and one captured graph.
    cache_len = min(model.config.n_positions, -(-(longest + k.max_new_tokens - 1) // CACHE_ROUND) * CACHE_ROUND)
    return Request(prompts, lengths, eos_ids, pad_id, cache_len, k)


def decode_inputs(
    model: GPT2, req: Request, prompt_width: int, tokenizer: object
) -> tuple[TokenHistory, LogitRules, StopStrings | None]:
    """The per-row token history, the processors' tensors and the stop-string windows of a validated call (shared
    by sampling and beam search)."""
    k = req.knobs
    history = TokenHistory.from_prompts(req.prompts, req.lengths, req.cache_len + 1)
    vocab, device = model.config.vocab_size, req.prompts.device
    rules = LogitRules(k.sampling, list(k.eos), vocab, prompt_width, device)
    stop = None
    if k.stop_strings is not None:
        stop = StopStrings(k.stop_strings, tokenizer, vocab, req.prompts, req.lengths)
    return history, rules, stop


def _start(
    model: GPT2,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    *,
    check_every: int,
    stream: bool,
    generation_config: object = None,
    generator: torch.Generator | None = None,
    use_cuda_graph: bool | None = None,
    tokenizer: object = None,
    **knobs,
) -> tuple[Request, object, Iterator[torch.Tensor]]:
    """Validate a generate call, set up the cache and state, and return them with the token iterator.

    The iterator yields each step's tokens ``[R]`` (on the device) and stops once every sequence has finished
    (checked on the host every ``check_every`` steps) or after ``max_new_tokens``.
    """
    req = prepare(model, input_ids, attention_mask, knobs, generation_config, generator, use_cuda_graph, tokenizer)
    k = req.knobs
    if stream and k.num_beams > 1:
        raise ValueError(
            f"generate_stream does not support beam search (num_beams={k.num_beams}): the best beam can change "
            "entirely at any step, so its tokens cannot be streamed; use generate"
        )
    if stream and k.return_dict_in_generate:
        raise ValueError("generate_stream yields tokens; return_dict_in_generate=True applies to generate only")
    model.setup_cache(req.prompts.shape[0], req.cache_len)
    if k.num_beams > 1:
        from gpt2fast import beam

        state = beam.BeamState.for_request(model, req, input_ids.shape[1], tokenizer)
    else:
        history, rules, stop = decode_inputs(model, req, input_ids.shape[1], tokenizer)
        state = DecodeState(k.sampling, history, req.eos_ids, req.pad_id, generator, rules, stop)
    step = make_step(model, state, use_cuda_graph)
    can_stop = k.num_beams > 1 or req.eos_ids is not None or k.stop_strings is not None

    @torch.no_grad()  # as a decorator, so grad mode is restored around every yield
    def tokens() -> Iterator[torch.Tensor]:
        new = state.select(model.prefill(req.prompts, req.lengths))
        yield new
        for i in range(1, k.max_new_tokens):
            if can_stop and i % check_every == 0 and bool(state.finished):
                return
            new = step(new)
            yield new

    return req, state, tokens()


def generate(
    model: GPT2, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs
) -> torch.Tensor | GenerateOutput:
    """Generate like transformers' ``generate``; returns ``[R, T + n]``: ``input_ids`` followed by
    ``n <= max_new_tokens`` new tokens (fewer only when every sequence finished), one row per returned sequence
    (``R = B * num_return_sequences``, each prompt's rows together, as transformers lays them out).

    ``input_ids [B, T]`` may be left-padded, with ``attention_mask`` (1 = token, 0 = padding).  Keyword arguments:

    * every knob of :data:`KNOBS`, with transformers' semantics: ``max_new_tokens`` (default 20) or ``max_length``,
      ``min_new_tokens``, ``min_length``, ``do_sample``, ``temperature``, ``top_k`` (0 = off, the default),
      ``top_p``, ``min_p``, ``typical_p``, ``repetition_penalty`` (covers the prompt), ``no_repeat_ngram_size``,
      ``bad_words_ids``, ``eos_token_id`` (an id or a list; None never stops early), ``pad_token_id`` (default:
      the first EOS id), ``num_beams`` with ``length_penalty`` and ``early_stopping`` (True / False / "never"),
      ``num_return_sequences``, ``stop_strings`` (needs ``tokenizer``), ``return_dict_in_generate`` (returns a
      :class:`GenerateOutput`, with ``sequences_scores`` for beam search);
    * ``generation_config``: a transformers ``GenerationConfig`` (keyword arguments override its fields);
    * ``generator`` (seeds sampling), ``use_cuda_graph`` (see :func:`make_step`), ``tokenizer``.

    Greedy decoding ignores temperature / top-k / top-p / min-p / typical-p, as transformers does.  A refused
    transformers knob raises ``ValueError`` naming it; an unknown keyword raises ``TypeError``.
    """
    req, state, stream = _start(model, input_ids, attention_mask, check_every=CHECK_EVERY, stream=False, **kwargs)
    new = list(stream)
    k = req.knobs
    if k.num_beams > 1:
        from gpt2fast import beam

        sequences, scores = beam.finish(state, input_ids, k.num_return_sequences)
    else:
        width = int(state.steps)  # the host sync that trims steps taken after every sequence finished
        prompt = input_ids.repeat_interleave(k.num_return_sequences, 0) if k.num_return_sequences > 1 else input_ids
        sequences, scores = torch.cat([prompt, torch.stack(new, 1)[:, :width].to(input_ids.dtype)], dim=1), None
    return GenerateOutput(sequences, scores) if k.return_dict_in_generate else sequences


def generate_stream(
    model: GPT2, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs
) -> Iterator[torch.Tensor]:
    """Validate now and return an iterator over each step's new tokens ``[R]`` (finished sequences get
    ``pad_token_id``); it stops once every sequence has finished.  Takes :func:`generate`'s arguments, except beam
    search (``num_beams > 1`` raises ``ValueError``: the best beam can change entirely at any step) and
    ``return_dict_in_generate``.

    The model's KV cache belongs to the stream until it is exhausted: do not interleave two streams
    (or a stream and another generate call) on one model.
    """
    return _start(model, input_ids, attention_mask, check_every=1, stream=True, **kwargs)[2]
