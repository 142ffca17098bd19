"""Next-token selection as pure tensor ops: logits processors, sampling and the token history.

Everything that runs per generated token (:func:`process_logits`, :func:`sample`,
:meth:`TokenHistory.append`) has fixed shapes, no host synchronisation and no
Python control flow that depends on tensor values; the only branches look at the
static :class:`SamplingConfig`.  That makes one decode step capturable in a CUDA
graph.

Each knob follows transformers' logits processor of the same name, applied in
transformers' order: repetition penalty, no-repeat-ngram, then (sampling only)
temperature, top-k, top-p.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from gpt2fast import checks


@dataclass(frozen=True)
class SamplingConfig:
    """How to pick the next token.  ``top_k=0`` and ``top_p=1.0`` disable those filters."""

    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    no_repeat_ngram_size: int = 0

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ``TypeError``/``ValueError`` naming the first bad knob (:func:`gpt2fast.checks.check_sampling`)."""
        checks.check_sampling(self)


class TokenHistory:
    """On-device token buffer ``tokens [B, max_len]`` (int64) with per-sequence ``lengths [B]`` (int64).

    Sequences are stored right-padded: row ``b`` holds its tokens in ``tokens[b, :lengths[b]]``.
    """

    def __init__(self, tokens: torch.Tensor, lengths: torch.Tensor) -> None:
        self.tokens = tokens
        self.lengths = lengths
        self._rows = torch.arange(tokens.shape[0], device=tokens.device)

    @classmethod
    def from_prompts(cls, prompts: torch.Tensor, lengths: torch.Tensor, max_len: int) -> TokenHistory:
        """A history of capacity ``max_len`` holding right-padded ``prompts [B, T]`` of ``lengths [B]``."""
        B, T = prompts.shape
        tokens = torch.zeros(B, max_len, dtype=torch.long, device=prompts.device)
        tokens[:, :T] = prompts
        return cls(tokens, lengths.to(device=prompts.device, dtype=torch.long).clone())

    def append(self, new_tokens: torch.Tensor) -> None:
        """Write ``new_tokens [B]`` at each sequence's length and advance the lengths (in place, no sync).

        A full row keeps its tokens and drops the new one (never writes past the end).
        """
        cap = self.tokens.shape[1]
        pos = self.lengths.clamp(max=cap - 1)
        keep = self.lengths < cap
        old = self.tokens[self._rows, pos]
        self.tokens[self._rows, pos] = torch.where(keep, new_tokens, old)
        self.lengths += keep.long()


def _valid_mask(history: TokenHistory) -> torch.Tensor:
    cap = history.tokens.shape[1]
    return torch.arange(cap, device=history.tokens.device)[None, :] < history.lengths[:, None]


def apply_repetition_penalty(logits: torch.Tensor, history: TokenHistory, penalty: float) -> torch.Tensor:
    """transformers' ``RepetitionPenaltyLogitsProcessor``: every token seen so far has its logit divided by
    ``penalty`` when positive, multiplied when negative."""
    B, V = logits.shape
    ids = torch.where(_valid_mask(history), history.tokens.clamp(0, V), V)  # padding goes to a spare column
    seen = torch.zeros(B, V + 1, dtype=torch.bool, device=logits.device)
    seen.scatter_(1, ids, True)
    penalised = torch.where(logits < 0, logits * penalty, logits / penalty)
    return torch.where(seen[:, :V], penalised, logits)


def apply_no_repeat_ngram(logits: torch.Tensor, history: TokenHistory, n: int) -> torch.Tensor:
    """transformers' ``NoRepeatNGramLogitsProcessor``: ban every token that would complete an n-gram
    already present in the sequence."""
    B, V = logits.shape
    cap = history.tokens.shape[1]
    if n > cap:  # no n-gram fits in the buffer
        return logits
    lengths = history.lengths
    # the last n-1 tokens of each sequence (indices clamped; rows shorter than n ban nothing below)
    tail_pos = (lengths[:, None] - (n - 1) + torch.arange(n - 1, device=logits.device)).clamp(0, cap - 1)
    prefix = history.tokens.gather(1, tail_pos)  # [B, n-1]
    windows = history.tokens.unfold(1, n, 1)  # [B, cap-n+1, n]
    starts = torch.arange(windows.shape[1], device=logits.device)
    complete = starts[None, :] + n <= lengths[:, None]  # the window lies inside the sequence
    matches = (windows[..., :-1] == prefix[:, None, :]).all(-1) & complete
    banned = torch.zeros(B, V + 1, dtype=torch.bool, device=logits.device)
    banned.scatter_(1, torch.where(matches, windows[..., -1].clamp(0, V), V), True)
    return logits.masked_fill(banned[:, :V], float("-inf"))


def apply_top_k(logits: torch.Tensor, k: int) -> torch.Tensor:
    """transformers' ``TopKLogitsWarper``: keep the ``k`` largest logits (ties with the k-th kept)."""
    k = min(k, logits.shape[-1])
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def apply_top_p(logits: torch.Tensor, p: float) -> torch.Tensor:
    """transformers' ``TopPLogitsWarper``: keep the smallest set of most likely tokens whose probability
    reaches ``p`` (always at least one)."""
    sorted_logits, order = torch.sort(logits, dim=-1, descending=False)
    cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    drop_sorted = cum <= (1 - p)
    drop_sorted[..., -1] = False
    drop = drop_sorted.scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def process_logits(logits: torch.Tensor, history: TokenHistory, cfg: SamplingConfig) -> torch.Tensor:
    """Apply every enabled knob of ``cfg`` to ``logits [B, V]`` (returned as float32), in transformers' order.

    Greedy decoding (``do_sample=False``) ignores temperature, top-k and top-p, as transformers does.
    """
    logits = logits.float()
    if cfg.repetition_penalty != 1.0:
        logits = apply_repetition_penalty(logits, history, cfg.repetition_penalty)
    if cfg.no_repeat_ngram_size > 0:
        logits = apply_no_repeat_ngram(logits, history, cfg.no_repeat_ngram_size)
    if cfg.do_sample:
        if cfg.temperature != 1.0:
            logits = logits / cfg.temperature
        if cfg.top_k > 0:
            logits = apply_top_k(logits, cfg.top_k)
        if cfg.top_p < 1.0:
            logits = apply_top_p(logits, cfg.top_p)
    return logits


def sample(logits: torch.Tensor, cfg: SamplingConfig, generator: torch.Generator | None = None) -> torch.Tensor:
    """Pick one token per row of processed ``logits [B, V]``: argmax, or a draw from their softmax.

    Sampling uses the exponential-race trick (``argmax(p / E)`` with ``E ~ Exp(1)``), which draws exactly
    from ``p`` without the host sync of ``torch.multinomial``; ``generator`` makes it reproducible.
    """
    if not cfg.do_sample:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits.float(), dim=-1)
    race = torch.empty_like(probs).exponential_(1.0, generator=generator).clamp_(min=torch.finfo(probs.dtype).tiny)
    return (probs / race).argmax(dim=-1)
