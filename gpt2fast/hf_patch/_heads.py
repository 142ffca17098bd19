"""The language-model heads with labels: the loss through ``ops.linear_cross_entropy``, logits kept or skipped.

As Liger-Kernel does for ``*ForCausalLM.forward``, the patched ``GPT2LMHeadModel.forward`` and
``GPT2DoubleHeadsModel.forward`` compute the language-modelling loss from the last hidden states and the tied
``lm_head`` weight, so the ``[tokens, vocab]`` logits need not exist.  ``skip_logits`` (a ``patch_hf`` option)
says whether they are computed anyway: ``False`` (default) keeps them, as transformers returns them; ``None``
skips them in ``train()`` mode and keeps them in ``eval()`` (Liger-Kernel's rule); ``True`` always skips them when
labels are given (``logits`` is ``None``).  The memory saving needs them skipped: with ``False`` only the loss's
own logits and their gradient are never materialised.
Without labels, or where the fused loss does not apply (``fused_loss=False``, ``logits_to_keep``, a custom
``loss_function``, a biased ``lm_head``, a named backend declining the call), transformers' own forward runs.

Semantics are transformers': labels are shifted inside, ``ignore_index`` (``-100``) is ignored, the mean is over
the kept labels, or the sum over ``num_items_in_batch`` when the ``Trainer`` passes it; ``shift_labels`` is taken
as given.  ``GPT2DoubleHeadsModel``'s language-model loss is its plain mean cross-entropy.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

from gpt2fast import ops
from gpt2fast.hf_patch._stats import FALLBACK

LCE = "linear_cross_entropy"


def _skip_logits(model) -> bool:
    skip = model._gpt2fast_options.skip_logits
    return model.training if skip is None else skip


def fused_loss_reason(model, *, custom_loss: bool) -> str | None:
    """Why this head's labelled call keeps transformers' loss, or ``None`` when the fused loss runs."""
    if not model._gpt2fast_options.fused_loss:
        return "fused_loss=False"
    if not hasattr(ops, LCE):
        return "this gpt2fast has no ops.linear_cross_entropy"
    if model.lm_head.bias is not None:
        return "lm_head has a bias"
    if custom_loss:
        return "a custom loss_function / loss_type"
    return None


def causal_lm_loss(model, hidden: torch.Tensor, labels: torch.Tensor | None, loss_kwargs: dict):
    """transformers' causal-LM loss from ``hidden`` ``[..., T, C]``: ``(loss, None)``, or ``(None, reason)``.

    Under autocast the LM head's matmul runs in the autocast dtype (as ``lm_head(h)`` does there): hidden and
    weight are cast to it and the op runs with autocast off, so its own fp32 softmax and sums stay as specified.
    """
    ignore_index = loss_kwargs.get("ignore_index", -100)
    shift_labels = loss_kwargs.get("shift_labels")
    num_items = loss_kwargs.get("num_items_in_batch")
    if shift_labels is None:
        shift_labels = F.pad(labels, (0, 1), value=ignore_index)[..., 1:]
    weight = model.lm_head.weight
    h = hidden.reshape(-1, hidden.shape[-1])
    device = h.device.type
    autocast = torch.is_autocast_enabled(device)
    dtype = torch.get_autocast_dtype(device) if autocast else weight.dtype
    h, weight = h.to(dtype), weight.to(dtype)
    target = shift_labels.reshape(-1).to(h.device)
    args = (h, weight, target, ignore_index, "mean" if num_items is None else "sum")
    backend = model._gpt2fast_options.backend
    if backend not in (None, ops.AUTO):
        reason = ops.supported(LCE, backend, *args)
        if reason is not None:
            return None, reason
    with torch.autocast(device, enabled=False) if autocast else contextlib.nullcontext():
        loss = ops.linear_cross_entropy(*args, backend=backend)
    if num_items is not None:
        loss = loss / (num_items.to(loss.device) if torch.is_tensor(num_items) else num_items)
    return loss.float(), None


def lm_head_mixin(lay) -> type:
    """The mixin of ``GPT2LMHeadModel``: its ``forward`` with the fused loss when labels are given."""

    class LMHeadMixin:
        @lay.can_return_tuple
        @lay.deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
        def forward(
            self,
            input_ids=None,
            cache=None,
            attention_mask=None,
            token_type_ids=None,
            position_ids=None,
            inputs_embeds=None,
            encoder_hidden_states=None,
            encoder_attention_mask=None,
            labels=None,
            use_cache=None,
            logits_to_keep=0,
            **kwargs,
        ):
            """transformers' ``GPT2LMHeadModel.forward``; with labels, the loss never builds the logits."""
            body_args = dict(
                cache=cache,
                attention_mask=attention_mask,
                token_type_ids=token_type_ids,
                position_ids=position_ids,
                inputs_embeds=inputs_embeds,
                encoder_hidden_states=encoder_hidden_states,
                encoder_attention_mask=encoder_attention_mask,
                use_cache=use_cache,
            )
            reason = None
            if labels is not None:
                custom = "_loss_function" in self.__dict__ or self.loss_type not in (None, "ForCausalLM")
                reason = fused_loss_reason(self, custom_loss=custom)
                if reason is None and not (isinstance(logits_to_keep, int) and logits_to_keep == 0):
                    reason = "logits_to_keep with labels"
            if labels is None or reason is not None:
                if labels is not None:
                    self._gpt2fast_stats.record("loss", FALLBACK + reason)
                return super().forward(input_ids, labels=labels, logits_to_keep=logits_to_keep, **body_args, **kwargs)
            out = self.transformer(input_ids, **body_args, **kwargs)
            hidden = out.last_hidden_state
            loss, reason = causal_lm_loss(self, hidden, labels, kwargs)
            if loss is None:
                self._gpt2fast_stats.record("loss", FALLBACK + reason)
                loss = self.loss_function(self.lm_head(hidden), labels, vocab_size=self.config.vocab_size, **kwargs)
            else:
                self._gpt2fast_stats.record("loss", f"gpt2fast.{LCE}")
            return lay.CausalLMOutputWithCrossAttentions(
                loss=loss,
                logits=None if _skip_logits(self) else self.lm_head(hidden),
                cache=out.cache,
                hidden_states=out.hidden_states,
                attentions=out.attentions,
                cross_attentions=out.cross_attentions,
            )

    return LMHeadMixin


def double_heads_mixin(lay) -> type:
    """The mixin of ``GPT2DoubleHeadsModel``: its ``forward`` with the fused language-model loss."""

    class DoubleHeadsMixin:
        @lay.can_return_tuple
        @lay.deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
        def forward(
            self,
            input_ids=None,
            cache=None,
            attention_mask=None,
            token_type_ids=None,
            position_ids=None,
            inputs_embeds=None,
            mc_token_ids=None,
            labels=None,
            mc_labels=None,
            use_cache=None,
            **kwargs,
        ):
            """transformers' ``GPT2DoubleHeadsModel.forward``; with labels, the LM loss never builds the logits."""
            body_args = dict(
                cache=cache,
                attention_mask=attention_mask,
                token_type_ids=token_type_ids,
                position_ids=position_ids,
                inputs_embeds=inputs_embeds,
                use_cache=use_cache,
            )
            reason = None if labels is None else fused_loss_reason(self, custom_loss=False)
            if labels is None or reason is not None:
                if labels is not None:
                    self._gpt2fast_stats.record("loss", FALLBACK + reason)
                return super().forward(
                    input_ids, mc_token_ids=mc_token_ids, labels=labels, mc_labels=mc_labels, **body_args, **kwargs
                )
            out = self.transformer(input_ids, **body_args, **kwargs)
            hidden = out.last_hidden_state
            mc_logits = self.multiple_choice_head(hidden, mc_token_ids).squeeze(-1)
            mc_loss = None
            if mc_labels is not None:
                mc_loss = F.cross_entropy(mc_logits.view(-1, mc_logits.size(-1)), mc_labels.view(-1))
            loss, reason = causal_lm_loss(self, hidden, labels.to(hidden.device), {})
            logits = None if _skip_logits(self) and loss is not None else self.lm_head(hidden)
            if loss is None:
                self._gpt2fast_stats.record("loss", FALLBACK + reason)
                shift = logits[..., :-1, :].contiguous()
                loss = F.cross_entropy(shift.view(-1, shift.size(-1)), labels[..., 1:].contiguous().view(-1))
            else:
                self._gpt2fast_stats.record("loss", f"gpt2fast.{LCE}")
            return lay.GPT2DoubleHeadsModelOutput(
                loss=loss,
                mc_loss=mc_loss,
                logits=logits,
                mc_logits=mc_logits,
                cache=out.cache,
                hidden_states=out.hidden_states,
                attentions=out.attentions,
            )

    return DoubleHeadsMixin
