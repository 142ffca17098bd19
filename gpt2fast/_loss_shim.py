"""TEMPORARY SHIM (issue 12 waiting on issue 11): the language-modelling loss of a gpt2fast model.

Issue 11 gives ``GPT2.forward(input_ids, labels=...)`` returning an object with ``.loss`` (transformers'
semantics, through ``ops.linear_cross_entropy``).  Until that lands on main, :func:`lm_loss` uses it when the model
accepts ``labels`` and otherwise computes the same loss from the full logits.  Delete this module when issue 11 is
merged and call ``model(input_ids, labels=labels).loss`` at its two call sites (gpt2fast/train.py,
gpt2fast/perplexity.py).
"""

from __future__ import annotations

import inspect

import torch
import torch.nn.functional as F


def lm_loss(model: torch.nn.Module, input_ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy of ``model`` (or a DDP wrapper of one) on ``input_ids [B, T]``: ``labels``
    are shifted inside and ``-100`` is ignored, as transformers' ``GPT2LMHeadModel(input_ids, labels=...).loss``."""
    inner = getattr(model, "module", model)
    if "labels" in inspect.signature(inner.forward).parameters:  # issue 11 has landed
        return model(input_ids, labels=labels).loss
    logits = model(input_ids)  # [B, T, V]
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100)
