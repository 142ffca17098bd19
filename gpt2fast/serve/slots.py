"""The engine's per-slot state on the device and per-row token selection (each row with its own settings).

:class:`SlotTable` holds, for every cache slot, the request's sampling parameters (temperature, top-k, top-p,
repetition penalty, seed), its limits (max tokens, stop ids), its token history, its last token and its
flags.  :func:`select` picks one token per row from a step's logits with every row's own settings, updates
the table in place and returns ``[3, R]`` (token, done, live) for the one host read-back of a step.  It is
pure tensor code with fixed shapes and no host sync, so a decode step that ends in it can be captured in a
CUDA graph; :class:`Features` lets an eager step skip processors that no row uses.

Sampling inverts each row's CDF at a uniform hashed from (seed, tokens generated so far), so a seeded request
gives the same tokens whatever else shares the batch, and the step needs no RNG state.
Each processor follows transformers' of the same name, in its order: repetition penalty, temperature, top-k,
top-p (reusing :mod:`gpt2fast.sampling`'s functions with per-row tensors where they broadcast).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from gpt2fast.sampling import TokenHistory, apply_repetition_penalty, apply_top_p

_M32 = 0xFFFFFFFF


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """``(x * c) mod 2**32`` for int64 ``x`` in [0, 2**32) and a 32-bit constant, without int64 overflow."""
    lo, hi = c & 0xFFFF, c >> 16
    return (x * lo + (((x * hi) & 0xFFFF) << 16)) & _M32


def mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash (Wellons' "lowbias32" constants) of int64 ``x`` in [0, 2**32); same range out."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def row_keys(seed: torch.Tensor, counter: torch.Tensor) -> torch.Tensor:
    """One 32-bit key per row ``[R]`` from int64 seeds (any value) and counters (tokens generated so far)."""
    lo, hi = seed & _M32, (seed >> 32) & _M32
    return mix32(lo ^ mix32(hi ^ mix32(counter & _M32)))


def uniform(keys: torch.Tensor) -> torch.Tensor:
    """One uniform float32 in (0, 1) per 32-bit key (24 random bits)."""
    return ((mix32(keys) >> 8).float() + 0.5) * (1.0 / (1 << 24))


def sample_rows(logits: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """One draw per row from ``softmax(logits [R, V])`` by inverting its CDF at a uniform hashed from ``keys [R]``:
    reproducible per key, no RNG state, no host sync, and only ``[R]`` random numbers per step.  A token of
    probability 0 is never drawn."""
    cdf = torch.softmax(logits, dim=-1).cumsum(dim=-1)  # [R, V]
    target = uniform(keys)[:, None] * cdf[:, -1:]  # in (0, total): rounding cannot run past the last token
    return torch.searchsorted(cdf, target).clamp_(max=logits.shape[-1] - 1)[:, 0]


def apply_top_k_rows(logits: torch.Tensor, top_k: torch.Tensor) -> torch.Tensor:
    """transformers' ``TopKLogitsWarper`` per row: keep each row's ``top_k[r]`` largest logits (ties with the
    k-th kept); ``top_k[r] == 0`` keeps the row whole."""
    V = logits.shape[-1]
    ranked = logits.sort(dim=-1, descending=True).values
    kth = ranked.gather(1, (top_k.clamp(1, V) - 1)[:, None])  # [R, 1]
    return logits.masked_fill((top_k[:, None] > 0) & (logits < kth), float("-inf"))


@dataclass(frozen=True)
class Features:
    """Which processors a step runs (an eager step skips those no live row uses; a captured one runs all)."""

    penalty: bool = True
    sample: bool = True
    top_k: bool = True
    top_p: bool = True


ALL = Features()
#: Columns of :attr:`SlotTable.floats` and :attr:`SlotTable.ints`.
FLOAT_COLUMNS = ("temperature", "top_p", "repetition_penalty")
INT_COLUMNS = ("top_k", "seed", "max_tokens", "generated")


class SlotTable:
    """Per-slot device state for ``n`` slots (or a view of some rows of a bigger table, see :meth:`rows`).

    ``floats [n, 3]`` (temperature, top_p, repetition_penalty) and ``ints [n, 4]`` (top_k, seed, max_tokens,
    generated) are each written with one copy when a request is admitted; ``stop_ids [n, S]`` (-1 pads);
    ``history``: prompt + generated tokens (for the repetition penalty); ``last [n]``: each slot's latest token
    (the next decode input); ``active``: the slot decodes; ``done``: it finished (a stop id or max_tokens).
    """

    def __init__(self, n: int, history_len: int, max_stop_ids: int, device: torch.device) -> None:
        self.floats = torch.ones(n, len(FLOAT_COLUMNS), dtype=torch.float32, device=device)
        self.ints = torch.zeros(n, len(INT_COLUMNS), dtype=torch.long, device=device)
        self.stop_ids = torch.full((n, max_stop_ids), -1, dtype=torch.long, device=device)
        self.history = TokenHistory(
            torch.zeros(n, history_len, dtype=torch.long, device=device),
            torch.zeros(n, dtype=torch.long, device=device),
        )
        self.last = torch.zeros(n, dtype=torch.long, device=device)
        self.active = torch.zeros(n, dtype=torch.bool, device=device)
        self.done = torch.zeros(n, dtype=torch.bool, device=device)

    def rows(self, start: int, stop: int) -> SlotTable:
        """A table over rows ``[start, stop)`` whose tensors are views of this one's (writes go through)."""
        view = object.__new__(SlotTable)
        for name in ("floats", "ints", "stop_ids", "last", "active", "done"):
            setattr(view, name, getattr(self, name)[start:stop])
        view.history = TokenHistory(self.history.tokens[start:stop], self.history.lengths[start:stop])
        return view

    def column(self, name: str) -> torch.Tensor:
        """One named column of ``floats`` or ``ints`` (a strided view)."""
        if name in FLOAT_COLUMNS:
            return self.floats[:, FLOAT_COLUMNS.index(name)]
        return self.ints[:, INT_COLUMNS.index(name)]

    def load(
        self, slot: int, prompt: torch.Tensor, floats: torch.Tensor, ints: torch.Tensor, stop: torch.Tensor
    ) -> None:
        """Reset ``slot`` for a new request: its parameters (host rows, see the columns), its stop ids ``[S]``
        and its prompt ``[P]`` (on the device) as its history; not active until its prefill completes."""
        self.floats[slot].copy_(floats, non_blocking=True)
        self.ints[slot].copy_(ints, non_blocking=True)
        self.stop_ids[slot].copy_(stop, non_blocking=True)
        self.history.tokens[slot, : prompt.shape[0]].copy_(prompt)
        self.history.lengths[slot] = prompt.shape[0]
        self.active[slot] = False
        self.done[slot] = False


def append_live(history: TokenHistory, tokens: torch.Tensor, live: torch.Tensor) -> None:
    """Append ``tokens [R]`` to the rows of ``history`` where ``live`` (others untouched; a full row drops it)."""
    cap = history.tokens.shape[1]
    rows = torch.arange(tokens.shape[0], device=tokens.device)
    pos = history.lengths.clamp(max=cap - 1)
    keep = live & (history.lengths < cap)
    history.tokens[rows, pos] = torch.where(keep, tokens, history.tokens[rows, pos])
    history.lengths += keep.long()


def select(logits: torch.Tensor, table: SlotTable, features: Features = ALL) -> torch.Tensor:
    """Pick the next token of every live row (``active`` and not ``done``) of ``table`` from ``logits [R, V]``
    with that row's settings; update its history, count, ``done`` flag and ``last`` token in place.

    Temperature 0 is greedy (argmax after the repetition penalty, as transformers' greedy search); a row that is
    not live keeps its ``last`` token.  Returns ``[3, R]`` int64: the token, done and live of each row.
    """
    live = table.active & ~table.done
    x = logits.float()
    if features.penalty:
        x = apply_repetition_penalty(x, table.history, table.column("repetition_penalty")[:, None])
    token = x.argmax(dim=-1)
    if features.sample:
        t = table.column("temperature")
        y = x / torch.where(t > 0, t, 1.0)[:, None]
        if features.top_k:
            y = apply_top_k_rows(y, table.column("top_k"))
        if features.top_p:
            y = apply_top_p(y, table.column("top_p")[:, None])
        drawn = sample_rows(y, row_keys(table.column("seed"), table.column("generated")))
        token = torch.where(t > 0, drawn, token)
    token = torch.where(live, token, table.last)
    append_live(table.history, token, live)
    generated = table.column("generated")
    generated += live.long()
    stopped = (token[:, None] == table.stop_ids).any(-1)
    table.done |= live & (stopped | (generated >= table.column("max_tokens")))
    table.last.copy_(token)
    return torch.stack([token, table.done.long(), live.long()])
