"""Next-token selection as pure tensor ops: logits processors, sampling and the token history.

Everything that runs per generated token (:func:`process_logits`, :func:`sample`,
:meth:`TokenHistory.append`) has fixed shapes, no host synchronisation and no
Python control flow that depends on tensor values; the only branches look at the
static :class:`SamplingConfig`.  That makes one decode step capturable in a CUDA
graph.

Each knob follows transformers' logits processor of the same name, applied in
transformers' order: repetition penalty, no-repeat-ngram, bad words, min length / min new
tokens, then (sampling only) temperature, top-k, top-p, min-p, typical-p.  The processors
that need tensors built from the knobs (the bad-word tables, the EOS ids, the step below
which EOS is banned) read them from a :class:`LogitRules`, which a decode state holds.
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
    min_p: float | None = None  # None disables it (0.0 keeps every token)
    typical_p: float = 1.0  # 1.0 disables it
    bad_words_ids: tuple[tuple[int, ...], ...] | None = None  # token sequences that are never completed
    min_new_tokens: int = 0  # EOS is banned until this many new tokens exist (needs EOS ids)
    min_length: int = 0  # EOS is banned while prompt width + new tokens < min_length (needs EOS ids)

    def __post_init__(self) -> None:
        if isinstance(self.bad_words_ids, list):  # a list of lists, as transformers takes it: frozen, hashable
            object.__setattr__(self, "bad_words_ids", _as_tuples(self.bad_words_ids))
        self.validate()

    def validate(self) -> None:
        """Raise ``TypeError``/``ValueError`` naming the first bad knob (:func:`gpt2fast.checks.check_sampling`,
        then the knobs added since)."""
        checks.check_sampling(self)
        p = self.min_p
        if p is not None and (isinstance(p, bool) or not isinstance(p, (int, float)) or not 0 <= p <= 1):
            raise ValueError(f"min_p must be None or a number in [0, 1], got {p!r}")
        if isinstance(self.typical_p, bool) or not isinstance(self.typical_p, (int, float)):
            raise TypeError(f"typical_p must be a number, got {self.typical_p!r}")
        if not 0 < self.typical_p <= 1:
            raise ValueError(f"typical_p must lie in (0, 1] (1.0 disables it), got {self.typical_p}")
        for name in ("min_new_tokens", "min_length"):
            checks.check_int(name, getattr(self, name), 0)
        if self.bad_words_ids is not None:
            bad = self.bad_words_ids
            if not isinstance(bad, tuple) or not bad or not all(isinstance(w, tuple) and w for w in bad):
                raise ValueError(f"bad_words_ids must be a non-empty list of non-empty lists of token ids, got {bad!r}")
            for word in bad:
                for t in word:
                    checks.check_int("bad_words_ids", t, 0)


def _as_tuples(words: object) -> object:
    """``[[1, 2], [3]]`` as ``((1, 2), (3,))``; anything else as given (validation names it)."""
    if all(isinstance(w, (list, tuple)) for w in words):
        return tuple(tuple(w) for w in words)
    return words


class TokenHistory:
    """On-device token buffer ``tokens [B, max_len]`` (int64) with per-sequence ``lengths [B]`` (int64).

    Sequences are stored right-padded: row ``b`` holds its tokens in ``tokens[b, :lengths[b]]``, of which the
    first ``start[b]`` are its prompt (``start`` defaults to the lengths given: everything is prompt).
    """

    def __init__(self, tokens: torch.Tensor, lengths: torch.Tensor, start: torch.Tensor | None = None) -> None:
        self.tokens = tokens
        self.lengths = lengths
        self.start = lengths.clone() if start is None else start
        self._rows = torch.arange(tokens.shape[0], device=tokens.device)

    @property
    def new_tokens(self) -> torch.Tensor:
        """How many tokens each row holds past its prompt ``[B]``."""
        return self.lengths - self.start

    @classmethod
    def from_prompts(cls, prompts: torch.Tensor, lengths: torch.Tensor, max_len: int) -> TokenHistory:
        """A history of capacity ``max_len`` holding right-padded ``prompts [B, T]`` of ``lengths [B]``."""
        B, T = prompts.shape
        tokens = torch.zeros(B, max_len, dtype=torch.long, device=prompts.device)
        tokens[:, :T] = prompts
        return cls(tokens, lengths.to(device=prompts.device, dtype=torch.long).clone())

    def append(self, new_tokens: torch.Tensor, active: torch.Tensor | None = None) -> None:
        """Write ``new_tokens [B]`` at each sequence's length and advance the lengths (in place, no sync).

        A full row keeps its tokens and drops the new one (never writes past the end); so does every row when
        ``active`` (a bool tensor, broadcast to ``[B]``) is False.
        """
        cap = self.tokens.shape[1]
        pos = self.lengths.clamp(max=cap - 1)
        keep = self.lengths < cap
        if active is not None:
            keep = keep & active
        old = self.tokens[self._rows, pos]
        self.tokens[self._rows, pos] = torch.where(keep, new_tokens, old)
        self.lengths += keep.long()

    def reorder(self, rows: torch.Tensor) -> None:
        """Row ``r`` becomes a copy of row ``rows[r]`` (in place: beam search's reselection; no sync)."""
        for t in (self.tokens, self.lengths, self.start):
            t.copy_(t.index_select(0, rows))


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


def apply_min_p(logits: torch.Tensor, min_p: float) -> torch.Tensor:
    """transformers' ``MinPLogitsWarper``: drop the tokens whose probability is below ``min_p`` times the most
    likely token's (the most likely token always stays)."""
    probs = torch.softmax(logits, dim=-1)
    drop = probs < min_p * probs.amax(dim=-1, keepdim=True)
    drop.scatter_(-1, torch.topk(probs, 1, dim=-1).indices, False)
    return logits.masked_fill(drop, float("-inf"))


def apply_typical_p(logits: torch.Tensor, mass: float) -> torch.Tensor:
    """transformers' ``TypicalLogitsWarper``: keep the tokens whose surprisal is closest to the distribution's
    entropy, in that order, until their probability reaches ``mass`` (always at least one)."""
    logp = torch.log_softmax(logits, dim=-1)
    entropy = -(logp * logp.exp()).nansum(-1, keepdim=True)
    distance, order = torch.sort((-logp - entropy).abs(), descending=False)
    cum = logits.gather(-1, order).softmax(dim=-1).cumsum(dim=-1)
    last = (cum < mass).sum(dim=-1, keepdim=True).clamp_(max=distance.shape[-1] - 1)
    drop_sorted = distance > distance.gather(-1, last)
    drop_sorted[..., :1] = False
    return logits.masked_fill(drop_sorted.scatter(-1, order, drop_sorted), float("-inf"))


class LogitRules:
    """The device tensors of the processors built from a :class:`SamplingConfig` and the EOS ids (one per
    decode state, so a captured step reads them from fixed buffers):

    * ``eos_mask [V]`` (bool) and ``eos_until`` (a 0-d int64): EOS is banned in rows with fewer new tokens than
      ``eos_until`` (``min_new_tokens`` and ``min_length`` minus the padded prompt width, whichever is larger);
    * ``bad_single [V]`` (bool): one-token bad words, always banned;
    * ``bad_prefix [S, P]`` (right-aligned, ``bad_prefix_len [S]``) and ``bad_last [S]``: a longer bad word bans
      its last token where a row ends with its prefix.

    transformers drops a bad word that is exactly one EOS id; so does this.
    """

    def __init__(
        self, cfg: SamplingConfig, eos_ids: list[int], vocab_size: int, prompt_width: int, device: torch.device
    ) -> None:
        self.eos_until: torch.Tensor | None = None
        if eos_ids and (cfg.min_new_tokens > 0 or cfg.min_length > 0):
            self.eos_mask = torch.zeros(vocab_size, dtype=torch.bool, device=device)
            self.eos_mask[eos_ids] = True
            until = max(cfg.min_new_tokens, cfg.min_length - prompt_width)
            self.eos_until = torch.tensor(until, dtype=torch.long, device=device)
        words = [w for w in cfg.bad_words_ids or () if not (len(w) == 1 and w[0] in eos_ids)]
        for w in words:
            for t in w:
                checks.check_int("bad_words_ids", t, 0, vocab_size)
        singles = [w[0] for w in words if len(w) == 1]
        longer = [w for w in words if len(w) > 1]
        self.bad_single = None
        if singles:
            self.bad_single = torch.zeros(vocab_size, dtype=torch.bool, device=device)
            self.bad_single[singles] = True
        self.bad_prefix = None
        if longer:
            width = max(len(w) for w in longer) - 1
            prefix = torch.zeros(len(longer), width, dtype=torch.long)
            for i, w in enumerate(longer):
                prefix[i, width - len(w) + 1 :] = torch.tensor(w[:-1])
            self.bad_prefix = prefix.to(device)
            self.bad_prefix_len = torch.tensor([len(w) - 1 for w in longer], dtype=torch.long, device=device)
            self.bad_last = torch.tensor([w[-1] for w in longer], dtype=torch.long, device=device)

    @property
    def active(self) -> bool:
        """Whether any rule applies."""
        return self.eos_until is not None or self.bad_single is not None or self.bad_prefix is not None


def apply_bad_words(logits: torch.Tensor, history: TokenHistory, rules: LogitRules) -> torch.Tensor:
    """transformers' ``NoBadWordsLogitsProcessor``: a one-token bad word is always banned; a longer one bans its
    last token in the rows whose tokens end with the rest of it."""
    B, V = logits.shape
    banned = torch.zeros(B, V + 1, dtype=torch.bool, device=logits.device)
    if rules.bad_single is not None:
        banned[:, :V] |= rules.bad_single
    if rules.bad_prefix is not None:
        cap, width = history.tokens.shape[1], rules.bad_prefix.shape[1]
        cols = torch.arange(width, device=logits.device)
        pos = history.lengths[:, None] - width + cols  # [B, P]: each row's last P positions (< 0: before it)
        tail = history.tokens.gather(1, pos.clamp(0, cap - 1))
        needed = cols[None, :] >= width - rules.bad_prefix_len[:, None]  # [S, P]: the prefix's own columns
        same = (tail[:, None, :] == rules.bad_prefix[None, :, :]) | ~needed[None]  # [B, S, P]
        fits = history.lengths[:, None] >= rules.bad_prefix_len[None, :]  # [B, S]
        hit = same.all(-1) & fits
        banned.scatter_(1, torch.where(hit, rules.bad_last[None, :], V), True)
    return logits.masked_fill(banned[:, :V], float("-inf"))


def apply_min_new_tokens(logits: torch.Tensor, history: TokenHistory, rules: LogitRules) -> torch.Tensor:
    """transformers' ``MinLengthLogitsProcessor`` and ``MinNewTokensLengthLogitsProcessor``: EOS is banned in rows
    with fewer than ``rules.eos_until`` new tokens."""
    early = history.new_tokens < rules.eos_until  # [B]
    return logits.masked_fill(early[:, None] & rules.eos_mask[None, :], float("-inf"))


def process_logits(
    logits: torch.Tensor, history: TokenHistory, cfg: SamplingConfig, rules: LogitRules | None = None
) -> torch.Tensor:
    """Apply every enabled knob of ``cfg`` to ``logits [B, V]`` (returned as float32), in transformers' order.

    ``rules`` holds the bad-word and EOS tensors (:class:`LogitRules`); without it those knobs do nothing.
    Greedy decoding (``do_sample=False``) ignores temperature, top-k, top-p, min-p and typical-p, as
    transformers does.
    """
    logits = logits.float()
    if cfg.repetition_penalty != 1.0:
        logits = apply_repetition_penalty(logits, history, cfg.repetition_penalty)
    if cfg.no_repeat_ngram_size > 0:
        logits = apply_no_repeat_ngram(logits, history, cfg.no_repeat_ngram_size)
    if rules is not None and (rules.bad_single is not None or rules.bad_prefix is not None):
        logits = apply_bad_words(logits, history, rules)
    if rules is not None and rules.eos_until is not None:
        logits = apply_min_new_tokens(logits, history, rules)
    if cfg.do_sample:
        if cfg.temperature != 1.0:
            logits = logits / cfg.temperature
        if cfg.top_k > 0:
            logits = apply_top_k(logits, cfg.top_k)
        if cfg.top_p < 1.0:
            logits = apply_top_p(logits, cfg.top_p)
        if cfg.min_p is not None:
            logits = apply_min_p(logits, cfg.min_p)
        if cfg.typical_p < 1.0:
            logits = apply_typical_p(logits, cfg.typical_p)
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
