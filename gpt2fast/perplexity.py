"""Perplexity of a fixed-length model on a long text: the library behind ``gpt2fast eval perplexity``.

:func:`sliding_window_perplexity` follows transformers' documented method ("Perplexity of fixed-length models",
https://huggingface.co/docs/transformers/perplexity) step for step, so its figure is the one that recipe gives on
the same weights:

* windows of ``max_length`` tokens start every ``stride`` tokens (the last one ends at the text's end, and the
  loop stops at the first window that reaches it);
* in each window only the tokens not scored by the previous window are targets (the others are labelled -100),
  so every token is predicted once, with up to ``max_length - stride`` tokens of context before the window's first
  target;
* the window's mean loss (transformers' shifted-label semantics) is weighted by its number of valid labels minus
  one (the recipe's correction for the label shift), and the perplexity is ``exp(sum of weighted losses / sum of
  weights)``.  For every window after the first, the first label is already -100, so that weight is one less than
  the number of targets the mean was taken over: a small quirk of the recipe, reproduced as it is.

:func:`transformers_perplexity` is the recipe itself on a transformers model (the oracle of the tests and of
``--compare-backends``); :func:`unigram_perplexity` is the baseline that ships next to the default model's figure.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class PerplexityResult:
    """A perplexity with what it was computed over: ``nll`` is the mean negative log-likelihood (nats per token)
    and ``tokens`` the recipe's token count (the sum of its weights)."""

    perplexity: float
    nll: float
    tokens: int
    windows: int
    max_length: int
    stride: int


def window_plan(n_tokens: int, max_length: int, stride: int) -> list[tuple[int, int, int]]:
    """The recipe's windows over ``n_tokens`` tokens: ``(begin, end, targets)``, the last ``targets`` tokens of
    ``[begin, end)`` being scored.  Raises ``ValueError`` unless ``1 <= stride <= max_length`` and the text holds
    at least two tokens."""
    from gpt2fast.checks import check_int

    check_int("max_length", max_length, 2)
    check_int("stride", stride, 1, max_length + 1)
    if n_tokens < 2:
        raise ValueError(f"the text has {n_tokens} token(s); perplexity needs at least 2")
    plan, prev_end = [], 0
    for begin in range(0, n_tokens, stride):
        end = min(begin + max_length, n_tokens)
        plan.append((begin, end, end - prev_end))
        prev_end = end
        if end == n_tokens:
            break
    return plan


def _resolve_lengths(config_positions: int, max_length: int | None, stride: int | None) -> tuple[int, int]:
    max_length = config_positions if max_length is None else max_length
    if isinstance(max_length, int) and max_length > config_positions:
        raise ValueError(f"max_length {max_length} exceeds the model's n_positions={config_positions}")
    stride = max(1, max_length // 2) if stride is None else stride
    return max_length, stride


def _flat_ids(input_ids: torch.Tensor | Sequence[int]) -> torch.Tensor:
    ids = torch.as_tensor(input_ids)
    if ids.dim() == 2 and ids.shape[0] == 1:
        ids = ids[0]
    if ids.dim() != 1 or ids.dtype.is_floating_point:
        raise ValueError(f"input_ids must be one sequence of token ids ([N] or [1, N]), got {list(ids.shape)}")
    return ids.long()


def _finish(weighted: float, count: int, windows: int, max_length: int, stride: int) -> PerplexityResult:
    nll = weighted / count
    return PerplexityResult(math.exp(nll), nll, count, windows, max_length, stride)


@torch.no_grad()
def sliding_window_perplexity(
    model: torch.nn.Module,
    input_ids: torch.Tensor | Sequence[int],
    max_length: int | None = None,
    stride: int | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> PerplexityResult:
    """Perplexity of a gpt2fast ``GPT2`` on one long sequence of ids by the sliding-window recipe (module
    docstring).  ``max_length`` defaults to the model's ``n_positions``, ``stride`` to half of ``max_length``.
    ``progress(done, total)`` is called after each window."""
    ids = _flat_ids(input_ids)
    max_length, stride = _resolve_lengths(model.config.n_positions, max_length, stride)
    plan = window_plan(len(ids), max_length, stride)
    device = model.wte.weight.device
    weighted, count = 0.0, 0
    was_training = model.training
    model.eval()
    try:
        for i, (begin, end, targets) in enumerate(plan):
            window = ids[begin:end].to(device)[None]  # [1, L]
            labels = window.clone()
            labels[:, : window.shape[1] - targets] = -100
            loss = float(model(window, labels=labels).loss)
            weight = int((labels != -100).sum()) - 1  # the recipe's correction for the label shift
            weighted += loss * weight
            count += weight
            if progress is not None:
                progress(i + 1, len(plan))
    finally:
        model.train(was_training)
    return _finish(weighted, count, len(plan), max_length, stride)


@torch.no_grad()
def transformers_perplexity(
    hf_model: torch.nn.Module, input_ids: torch.Tensor, max_length: int | None = None, stride: int | None = None
) -> PerplexityResult:
    """transformers' documented recipe, literally, on a ``GPT2LMHeadModel`` (its own loop, not
    :func:`window_plan`): the oracle :func:`sliding_window_perplexity` is checked against."""
    ids = _flat_ids(input_ids)[None]  # [1, N]
    max_length, stride = _resolve_lengths(hf_model.config.n_positions, max_length, stride)
    device = next(hf_model.parameters()).device
    seq_len = ids.shape[1]
    nll_sum, n_tokens, prev_end, windows = 0.0, 0, 0, 0
    for begin in range(0, seq_len, stride):
        end = min(begin + max_length, seq_len)
        trg_len = end - prev_end
        window = ids[:, begin:end].to(device)
        target = window.clone()
        target[:, :-trg_len] = -100
        loss = hf_model(window, labels=target).loss
        n_loss = int((target != -100).sum()) - target.shape[0]
        nll_sum += float(loss) * n_loss
        n_tokens += n_loss
        prev_end, windows = end, windows + 1
        if end == seq_len:
            break
    return _finish(nll_sum, n_tokens, windows, max_length, stride)


def unigram_perplexity(
    train_ids: np.ndarray | Sequence[int], eval_ids: np.ndarray | Sequence[int], vocab_size: int, alpha: float = 1.0
) -> float:
    """Perplexity of the add-``alpha`` (Laplace for 1.0) unigram model of ``train_ids`` on ``eval_ids[1:]`` (the
    tokens a language model predicts, the first having no context): ``p(t) = (count(t) + alpha) / (N + alpha V)``
    over the whole vocabulary of ``vocab_size`` ids."""
    if alpha <= 0:
        raise ValueError(f"alpha must be > 0, got {alpha}")
    counts = np.bincount(np.asarray(train_ids, dtype=np.int64), minlength=vocab_size).astype(np.float64)
    if len(counts) > vocab_size:
        raise ValueError(f"train_ids hold ids >= vocab_size {vocab_size}")
    logp = np.log(counts + alpha) - math.log(counts.sum() + alpha * vocab_size)
    targets = np.asarray(eval_ids, dtype=np.int64)[1:]
    if len(targets) == 0:
        raise ValueError("eval_ids need at least two tokens")
    return float(math.exp(-logp[targets].mean()))
