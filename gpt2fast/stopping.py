"""Stop strings on the device: transformers' ``StopStringCriteria`` as fixed-shape tensor ops, no host sync.

A sequence stops when a stop string occurs in its text and that occurrence ends inside its last token
(``["st", "op"]``, ``["las", "topper"]``, ``["stop"]`` and a last token "xstopx" stop on "stop";
``["stop", "at"]`` does not), as transformers' implementation decides (its end-overlap table).  Text is
compared as bytes, which is what transformers does for byte-level BPE
tokenizers such as GPT-2's.

Each row keeps the last ``W`` bytes of its text in a window (``int16``, -1 where there is no text yet), with
``W`` = the longest token + the longest stop string, enough for any occurrence that ends in the last token.
A step appends the token's bytes (from a ``[V, M]`` table) and compares every offset of the window with every
stop string.  Beam search extends the windows of candidate continuations the same way and reorders them with
the beams.

Known differences: the prompt's left padding is not text here (transformers' check may read pad tokens as
text when a prompt is shorter than a stop string); only the prompt's last ``W`` bytes can start a match, which
covers every match transformers can find.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

#: Window value where a row has no text yet (never equal to a byte).
NO_BYTE = -1


def token_bytes(tokenizer: object, vocab_size: int) -> list[bytes]:
    """The bytes of each of the first ``vocab_size`` ids of ``tokenizer``: a gpt2fast :class:`~gpt2fast.Tokenizer`
    or anything with ``token_bytes(id) -> bytes``, or a transformers tokenizer of a byte-level BPE (GPT-2's).

    Ids from the tokenizer's ``vocab_size`` on (a model's vocabulary padded past the tokenizer's) have no bytes.
    """
    if hasattr(tokenizer, "token_bytes"):
        n = getattr(tokenizer, "vocab_size", vocab_size)
        return [bytes(tokenizer.token_bytes(i)) if i < n else b"" for i in range(vocab_size)]
    if not hasattr(tokenizer, "convert_ids_to_tokens"):
        raise TypeError(
            f"tokenizer must be a gpt2fast.Tokenizer, a transformers byte-level BPE tokenizer, or have "
            f"token_bytes(id); got {type(tokenizer).__name__}"
        )
    from gpt2fast.tokenizer import _token_bytes

    pieces = tokenizer.convert_ids_to_tokens(list(range(vocab_size)))
    return [b"" if p is None else _token_bytes(p) for p in pieces]


def check_stop_strings(stop_strings: object) -> tuple[str, ...]:
    """``stop_strings`` (a str or a list of non-empty str) as a tuple."""
    strings = (stop_strings,) if isinstance(stop_strings, str) else stop_strings
    if not isinstance(strings, (list, tuple)) or not strings or not all(isinstance(s, str) and s for s in strings):
        raise ValueError(f"stop_strings must be a non-empty str or a non-empty list of them, got {stop_strings!r}")
    return tuple(strings)


class StopStrings:
    """Per-row byte windows and the tables to extend and match them (every tensor on the model's device)."""

    def __init__(
        self,
        stop_strings: Sequence[str],
        tokenizer: object,
        vocab_size: int,
        prompts: torch.Tensor,
        lengths: torch.Tensor,
    ) -> None:
        """``prompts [B, T]`` right-padded with ``lengths [B]``: the windows start with each prompt's tail."""
        device = prompts.device
        pieces = token_bytes(tokenizer, vocab_size)
        width = max(1, max(len(p) for p in pieces))
        table = np.full((vocab_size, width), NO_BYTE, dtype=np.int16)
        for i, p in enumerate(pieces):
            table[i, : len(p)] = np.frombuffer(p, dtype=np.uint8)
        self.table = torch.from_numpy(table).to(device)  # [V, M]
        self.table_len = torch.tensor([len(p) for p in pieces], dtype=torch.long, device=device)  # [V]
        encoded = [st.encode("utf-8") for st in stop_strings]
        longest = max(len(e) for e in encoded)
        patterns = torch.full((len(encoded), longest), NO_BYTE, dtype=torch.int16)
        for i, e in enumerate(encoded):
            patterns[i, : len(e)] = torch.tensor(list(e), dtype=torch.int16)
        self.patterns = patterns.to(device)  # [S, L], padded with NO_BYTE
        self.pattern_len = torch.tensor([len(e) for e in encoded], dtype=torch.long, device=device)  # [S]
        self.size = width + longest  # W
        window = torch.full((prompts.shape[0], self.size), NO_BYTE, dtype=torch.int16, device=device)
        for t in range(prompts.shape[1]):  # the prompt's bytes, token by token (only real tokens are text)
            window = torch.where((t < lengths.long())[:, None], self.extend(window, prompts[:, t]), window)
        self.window = window  # [B, W]

    def extend(self, window: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """``window [R, W]`` with ``tokens [R]``'s bytes appended (the oldest bytes drop out)."""
        joined = torch.cat([window, self.table[tokens]], dim=1)  # [R, W + M]; the token's first n bytes are real
        cols = torch.arange(self.size, device=window.device)[None, :] + self.table_len[tokens][:, None]
        return joined.gather(1, cols)

    def matches(self, window: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """``[R]`` bool: a stop string in ``window [R, W]`` ends inside its last token ``tokens [R]``."""
        R, W = window.shape
        L = self.patterns.shape[1]
        padded = torch.cat([window, window.new_full((R, L - 1), NO_BYTE)], dim=1)  # an occurrence never runs past W
        spans = padded.unfold(1, L, 1)  # [R, W, L]: the L bytes from each offset
        cols = torch.arange(L, device=window.device)
        inside = cols[None, :] < self.pattern_len[:, None]  # [S, L]: each pattern's own bytes
        same = (spans[:, None] == self.patterns[None, :, None, :]) | ~inside[None, :, None, :]  # [R, S, W, L]
        found = same.all(-1)  # [R, S, W]: pattern s occurs at offset a (NO_BYTE padding never matches a byte)
        first = (W - self.table_len[tokens])[:, None, None]  # where the last token's bytes begin
        start = torch.arange(W, device=window.device)[None, None, :]
        ends_in_last = start + self.pattern_len[None, :, None] > first
        return (found & ends_in_last).flatten(1).any(-1)

    def push(self, tokens: torch.Tensor) -> torch.Tensor:
        """Append ``tokens [B]`` to the windows (in place); returns which rows now end in a stop string."""
        self.window.copy_(self.extend(self.window, tokens))
        return self.matches(self.window, tokens)
