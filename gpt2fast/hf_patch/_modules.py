"""The patched forwards: one mixin per patch kind, put in front of the transformers class it patches.

Each forward first decides whether gpt2fast can serve the call; if not, it records why and runs the class's own
forward (``super().forward``), i.e. exactly the transformers code, with the model's configured attention.
"""

from __future__ import annotations

import torch

from gpt2fast import ops
from gpt2fast.hf_patch import _classes, _heads
from gpt2fast.hf_patch._layout import layout
from gpt2fast.hf_patch._routing import PLAN_KWARG, attend, plan_forward
from gpt2fast.hf_patch._stats import FALLBACK
from gpt2fast.ops._validate import FLOAT_DTYPES

_checked_devices: set[tuple[str, torch.device]] = set()
#: transformers' layout, set when the mixins are built (before any patched forward runs; no lookup in a forward,
#: so ``torch.compile`` traces none).
_lay = None


def _record(module, site: str, route: str) -> None:
    module._gpt2fast_stats.record(site, route)


def _backend(module) -> str | None:
    return module._gpt2fast_options.backend


def _named(backend: str | None) -> bool:
    return backend not in (None, ops.AUTO)


def check_device(backend: str | None, device: torch.device) -> None:
    """A named backend must run on ``device``: checked at a model's first call there (a meta-device model was
    patched before its weights existed), raising ``BackendUnavailableError`` with the reason."""
    if not _named(backend) or (backend, device) in _checked_devices:
        return
    status = ops.backend_status(backend, device)
    if not status.available:
        raise ops.BackendUnavailableError(
            f"backend {backend!r} cannot run this model's {device} tensors: {status.reason}"
        )
    _checked_devices.add((backend, device))


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype a matmul on ``x`` produces here (autocast's, when autocast is on for its device)."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


# ---- LayerNorm ------------------------------------------------------------------------------------------------
class LayerNormMixin:
    """``nn.LayerNorm`` over the last dim through ``ops.layer_norm`` (in fp32 under autocast, as torch does)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """LayerNorm of ``x``; the original forward where gpt2fast cannot serve the call."""
        args, reason = self._gpt2fast_args(x)
        if reason is not None:
            _record(self, "layer_norm", FALLBACK + reason)
            return super().forward(x)
        _record(self, "layer_norm", "gpt2fast.layer_norm")
        return ops.layer_norm(*args, backend=_backend(self))

    def _gpt2fast_args(self, x: torch.Tensor):
        w, b = self.weight, self.bias
        if len(self.normalized_shape) != 1 or w is None or b is None:
            return None, "LayerNorm without one normalized dim, a weight and a bias"
        if torch.is_autocast_enabled(x.device.type):  # autocast runs layer_norm in fp32
            x, w, b = x.float(), w.float(), b.float()
        if not x.dtype == w.dtype == b.dtype:
            return None, f"mixed dtypes {x.dtype}/{w.dtype}"
        if x.dtype not in FLOAT_DTYPES:
            return None, f"dtype {x.dtype}"
        args = (x, w, b, self.eps, None)
        reason = ops.supported("layer_norm", _backend(self), *args) if _named(_backend(self)) else None
        return args, reason


# ---- MLP ------------------------------------------------------------------------------------------------------
class MLPMixin:
    """GPT-2's MLP with ``c_fc``'s bias add and the tanh GELU fused into ``ops.bias_gelu``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``dropout(c_proj(gelu_tanh(x @ W_fc + b_fc)))``; the original forward where gpt2fast cannot serve it."""
        fc = self.c_fc
        reason = self._gpt2fast_reason(x)
        if reason is None:
            h = torch.matmul(x, fc.weight)  # Conv1D's weight is [in, out]; its bias is added inside the GELU kernel
            args = (h, fc.bias.to(h.dtype))
            backend = _backend(self)
            reason = ops.supported("bias_gelu", backend, *args) if _named(backend) else None
        if reason is not None:  # (a named backend declining at run time costs the matmul twice)
            _record(self, "mlp", FALLBACK + reason)
            return super().forward(x)
        _record(self, "mlp", "gpt2fast.bias_gelu")
        return self.dropout(self.c_proj(ops.bias_gelu(*args, backend=backend)))

    def _gpt2fast_reason(self, x: torch.Tensor) -> str | None:
        if not isinstance(self.act, _lay.tanh_gelu_classes):
            return f"activation {type(self.act).__name__} is not the tanh GELU"
        fc = self.c_fc
        dtype = _compute_dtype(x)
        if dtype == x.dtype and not x.dtype == fc.weight.dtype == fc.bias.dtype:
            return f"mixed dtypes {x.dtype}/{fc.weight.dtype}"
        if dtype not in FLOAT_DTYPES:
            return f"dtype {dtype}"
        return None


# ---- attention ------------------------------------------------------------------------------------------------
class AttentionMixin:
    """GPT-2 self-attention through ``ops.attention`` / ``ops.decode_attention`` (see ``_routing``)."""

    def forward(
        self,
        hidden_states,
        cache=None,
        attention_mask=None,
        encoder_hidden_states=None,
        encoder_attention_mask=None,
        output_attentions=False,
        **kwargs,
    ):
        """Attention as transformers computes it; the original forward where gpt2fast cannot serve the call."""
        plan = kwargs.pop(PLAN_KWARG, None)
        reason = self._gpt2fast_reason(plan, encoder_hidden_states, output_attentions)
        if reason is not None:
            _record(self, "attention", FALLBACK + reason)
            return super().forward(
                hidden_states,
                cache=cache,
                attention_mask=attention_mask,
                encoder_hidden_states=encoder_hidden_states,
                encoder_attention_mask=encoder_attention_mask,
                output_attentions=output_attentions,
                **kwargs,
            )
        q, k, v = self.c_attn(hidden_states).split(self.split_size, dim=2)
        shape = (*q.shape[:-1], -1, self.head_dim)
        q, k, v = (x.view(shape).transpose(1, 2) for x in (q, k, v))
        if cache is not None:
            own = cache.self_attention_cache if isinstance(cache, _lay.EncoderDecoderCache) else cache
            k, v = own.update(k, v, self.layer_idx, kwargs=kwargs)
        out, route = attend(self, q, k, v, plan, _backend(self))
        if out is None:  # the cache is updated already: run the configured attention function itself
            _record(self, "attention", FALLBACK + route)
            out, _ = self._gpt2fast_configured(q, k, v, attention_mask, **kwargs)
        else:
            _record(self, "attention", route)
        out = self.c_proj(out.reshape(*out.shape[:-2], -1).contiguous())
        return self.resid_dropout(out), None

    def _gpt2fast_reason(self, plan, encoder_hidden_states, output_attentions) -> str | None:
        if self.is_cross_attention or encoder_hidden_states is not None:
            return "cross-attention"
        if plan is None:
            return "called outside a patched GPT2Model forward"
        if plan.reason is not None:
            return plan.reason
        if output_attentions:
            return "output_attentions=True"
        if self.training and self.attn_dropout.p > 0:
            return f"attention dropout in training (attn_pdrop={self.attn_dropout.p})"
        return None

    def _gpt2fast_configured(self, q, k, v, attention_mask, **kwargs):
        """The attention function the model is configured with, called as ``GPT2Attention.forward`` calls it."""
        lay = _lay
        impl = self.config._attn_implementation
        if impl == "eager" and self.reorder_and_upcast_attn:
            return self._upcast_and_reordered_attn(q, k, v, attention_mask)
        fn = lay.ALL_ATTENTION_FUNCTIONS.get_interface(impl, lay.eager_attention_forward)
        dropout = self.attn_dropout.p if self.training else 0.0
        return fn(self, q, k, v, attention_mask, dropout=dropout, scaling=self.scaling, **kwargs)


# ---- the GPT2Model body ---------------------------------------------------------------------------------------
def _body_mixin(lay) -> type:
    class BodyMixin:
        """``GPT2Model.forward`` plus the attention plan of the call, handed to every attention layer."""

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
            use_cache=None,
            **kwargs,
        ):
            """transformers' ``GPT2Model.forward``, its attention layers routed to the gpt2fast kernels."""
            x = input_ids if input_ids is not None else inputs_embeds
            if x is not None:
                check_device(_backend(self), x.device)
            kwargs[PLAN_KWARG] = plan_forward(
                self, input_ids, inputs_embeds, attention_mask, cache, position_ids, kwargs, lay
            )
            return super().forward(
                input_ids,
                cache=cache,
                attention_mask=attention_mask,
                token_type_ids=token_type_ids,
                position_ids=position_ids,
                inputs_embeds=inputs_embeds,
                encoder_hidden_states=encoder_hidden_states,
                encoder_attention_mask=encoder_attention_mask,
                use_cache=use_cache,
                **kwargs,
            )

    return BodyMixin


def _build_mixins() -> dict[str, type]:
    global _lay
    lay = _lay = layout()
    return {
        "layer_norm": LayerNormMixin,
        "mlp": MLPMixin,
        "attention": AttentionMixin,
        "body": _body_mixin(lay),
        "lm_head": _heads.lm_head_mixin(lay),
        "double_heads": _heads.double_heads_mixin(lay),
    }


_classes.set_mixin_factory(_build_mixins)
