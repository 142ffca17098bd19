"""Attention routing: what transformers' causal mask says, as lengths the gpt2fast attention ops take.

transformers builds a 4-D mask (or ``None``) from the 2-D ``attention_mask``, the cache and the shapes.  The
patched ``GPT2Model.forward`` reads those inputs itself, once per forward, into an :class:`AttentionPlan` (passed
to every attention layer through the forward's ``**kwargs``), and each layer turns the plan into a kernel call:

* no padding, nothing cached: ``ops.attention(causal=True)`` (prefill, training);
* one new token: ``ops.decode_attention`` with every row attending ``past + 1`` keys (dynamic or static cache;
  a static cache's length is a device tensor, read by no one: sync-free);
* several new tokens after a cache (chunked prefill): ``ops.decode_attention`` with one row per query position,
  query ``i`` attending ``past + i + 1`` keys (the keys are a stride-0 view, not a copy);
* a padded batch whose mask is one run of ones per row (left and/or right padding): prefill runs
  ``ops.attention`` on rows rotated left by their padding (a gather of q, k, v and back), decode runs
  ``ops.decode_attention`` with per-row lengths (left padding gathers the cached keys into rotated order first).
  Queries at padded positions (``attention_mask == 0``) get a zero output, as transformers' flash-attention
  path gives; eager and sdpa give other values there.  Every other position matches.

A prepared 4-D mask (``generate`` builds one for static caches) is served when it is exactly causal at the cache's
offset plus a padding row (checked on the device); any other 4-D mask is custom and falls back.

Everything else falls back to the model's configured attention, with the reason.  The one host read: a forward
given an ``attention_mask`` (2-D or 4-D) reads a few flags of it back (one sync per forward, not per layer;
transformers' own sdpa mask reads it too); with no mask, nothing is read (dynamic or static cache alike), except
``position_ids`` without a mask or a cache, read once to detect packed sequences.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from gpt2fast import ops
from gpt2fast.ops._validate import FLOAT_DTYPES

#: The keyword under which the patched ``GPT2Model.forward`` hands the plan to its attention layers.
PLAN_KWARG = "gpt2fast_attention_plan"


@dataclass(frozen=True)
class AttentionPlan:
    """How the attention layers of one forward reach the kernels (or why they cannot)."""

    reason: str | None = None  # every attention call of the forward falls back, for this reason
    past: int | torch.Tensor = 0  # positions cached before this forward (a 0-d device tensor for static caches)
    starts: torch.Tensor | None = None  # [B] first attended key per row; None: no padding
    ends: torch.Tensor | None = None  # [B] one past the last attended key per row
    left_padded: bool = False  # some row starts after key 0 (its keys are rotated before the kernel)


def _fallback(reason: str) -> AttentionPlan:
    return AttentionPlan(reason=reason)


def plan_forward(body, input_ids, inputs_embeds, attention_mask, cache, position_ids, kwargs: dict, layout):
    """The :class:`AttentionPlan` of one ``GPT2Model.forward`` call (its arguments as passed)."""
    config = body.config
    if kwargs.get("output_attentions", getattr(config, "output_attentions", False)):
        return _fallback("output_attentions=True")
    if not getattr(config, "is_causal", True):
        return _fallback("config.is_causal=False (bidirectional attention)")
    if input_ids is not None:
        shape = input_ids.shape
    elif inputs_embeds is not None:
        shape = inputs_embeds.shape[:-1]
    else:
        return _fallback("no input_ids or inputs_embeds")
    t = shape[-1]
    batch = input_ids.reshape(-1, t).shape[0] if input_ids is not None else shape[0]
    past: int | torch.Tensor = 0
    if cache is not None:
        own = cache.self_attention_cache if isinstance(cache, layout.EncoderDecoderCache) else cache
        layers = getattr(own, "layers", None)
        if layers is None:
            return _fallback(f"cache type {type(cache).__name__}")
        for layer in layers[:1]:
            if getattr(layer, "is_sliding", False) or getattr(layer, "is_linear", False):
                return _fallback(f"cache layer {type(layer).__name__}")
        past = own.get_seq_length()
        if isinstance(past, torch.Tensor):
            past = past.detach().clone()  # the static layer's counter is updated in place by the first layer
    if attention_mask is not None and not isinstance(attention_mask, torch.Tensor):
        return _fallback(f"attention_mask of type {type(attention_mask).__name__}")
    if attention_mask is None:
        if position_ids is not None and cache is None and t > 1:
            pos = position_ids.reshape(-1, t)
            if bool((pos[:, 1:] - pos[:, :-1] != 1).any()):  # host read, as transformers' own packed check
                return _fallback("packed sequences (position_ids restart)")
        return AttentionPlan(past=past)
    if attention_mask.ndim == 4:
        return _plan_4d(attention_mask, past, t, batch)
    return _padded_plan(attention_mask.reshape(batch, -1).bool(), past, t)


def _plan_4d(mask: torch.Tensor, past: int | torch.Tensor, t: int, batch: int) -> AttentionPlan:
    """A prepared ``[B, 1, T, L]`` mask (``generate`` builds one for static caches): served when it is exactly
    causal at the cache's offset and a padding row, checked on the device with the same single host read."""
    if mask.shape[1] != 1 or mask.shape[2] != t or mask.shape[0] not in (1, batch):
        return _fallback(f"a 4-D attention_mask of shape {list(mask.shape)}")
    if mask.dtype == torch.bool:
        valid, clean = mask[:, 0], None
    elif mask.is_floating_point():  # eager's additive mask: 0 where attended, the dtype's minimum (or -inf) not
        valid = mask[:, 0] == 0
        clean = (valid | (mask[:, 0] == torch.finfo(mask.dtype).min) | mask[:, 0].isneginf()).all()
    else:
        return _fallback(f"a 4-D attention_mask of dtype {mask.dtype}")
    keys = torch.arange(valid.shape[-1], device=mask.device)
    row = valid[:, -1]  # the last query sees every key it may: the padding row, cut at the causal limit
    causal = keys[None, :] <= (torch.arange(t, device=mask.device) + past)[:, None]
    ok = ((causal[None] & row[:, None, :]) == valid).all()
    return _padded_plan(row.expand(batch, -1), past, t, ok if clean is None else ok & clean)


def _padded_plan(
    mask: torch.Tensor, past: int | torch.Tensor, t: int, causal_ok: torch.Tensor | None = None
) -> AttentionPlan:
    """Rows of ``mask`` (``[B, L]`` bool, one per key position) as ``starts``/``ends``; one host read.
    ``causal_ok`` (a device bool from :func:`_plan_4d`) joins that read."""
    if isinstance(past, int):
        mask = mask[:, : past + t]  # transformers ignores mask columns past the keys
    if mask.shape[-1] == 0:
        return _fallback("an empty attention_mask")
    ones = mask.sum(-1)
    starts = mask.to(torch.uint8).argmax(-1)  # first 1 (0 for a row of zeros)
    runs = (mask[:, 1:] & ~mask[:, :-1]).sum(-1) + mask[:, 0]
    flags = [(runs <= 1).all(), mask.all(), (starts > 0).any()]
    if causal_ok is not None:
        flags.append(causal_ok)
    one_run, full, left, *causal = torch.stack(flags).tolist()
    if causal and not causal[0]:
        return _fallback("a 4-D attention_mask that is not causal plus padding")
    if not one_run:
        return _fallback("attention_mask with holes (not one run of ones per row)")
    if full and isinstance(past, int) and mask.shape[-1] >= past + t:
        return AttentionPlan(past=past)
    return AttentionPlan(past=past, starts=starts, ends=starts + ones, left_padded=bool(left))


# ---- one attention layer ------------------------------------------------------------------------------------
def attend(module, q, k, v, plan: AttentionPlan, backend: str | None):
    """Run the gpt2fast kernel for one layer: ``(out [B, T, H, D], route)``, or ``(None, reason)`` to fall back.

    ``q`` is ``[B, H, T, D]``; ``k``/``v`` the layer's keys and values after the cache update.
    """
    if not (q.dtype == k.dtype == v.dtype and q.dtype in FLOAT_DTYPES):
        return None, f"dtype {q.dtype}/{k.dtype}/{v.dtype}"
    t, t_kv, past = q.shape[2], k.shape[2], plan.past
    static = isinstance(past, torch.Tensor)
    if not static and t_kv != past + t:
        if past != 0 or t_kv < t:
            return None, f"{t_kv} keys for {past} cached + {t} new positions"
        k, v, t_kv = k[:, :, :t], v[:, :, :t], t  # a static cache's first call: keys beyond the prompt are empty
    if not static and past == 0:
        return _prefill(module, q, k, v, plan, backend)
    if t == 1:
        return _decode(module, q, k, v, plan, backend)
    if plan.starts is not None:
        return None, "chunked prefill (new tokens after a cache) of a padded batch"
    return _chunked(module, q, k, v, past, backend)


def _run(op: str, backend: str | None, *args, **kwargs):
    """Run ``ops.<op>``; ``(None, reason)`` when a named backend declines these arguments (e.g. no backward)."""
    if backend not in (None, ops.AUTO):
        reason = ops.supported(op, backend, *args)
        if reason is not None:
            return None, reason
    return getattr(ops, op)(*args, backend=backend, **kwargs), f"gpt2fast.{op}"


def _rows(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``x[b, :, index[b, j]]`` for ``x`` ``[B, H, T, D]`` and ``index`` ``[B, J]`` (a gather, differentiable)."""
    b, h, _, d = x.shape
    return torch.gather(x, 2, index[:, None, :, None].expand(b, h, index.shape[1], d))


def _prefill(module, q, k, v, plan: AttentionPlan, backend):
    t = q.shape[2]
    if plan.left_padded:  # rotate each row left by its padding: its keys become a prefix, causal stays causal
        pos = torch.arange(t, device=q.device)
        index = (pos + plan.starts[:, None]) % t
        q, k, v = (_rows(x, index) for x in (q, k, v))
    out, route = _run("attention", backend, q, k, v, True, module.scaling)
    if out is None:
        return None, route
    if plan.starts is not None:
        pos = torch.arange(t, device=q.device)
        if plan.left_padded:
            out = _rows(out, (pos - plan.starts[:, None]) % t)
        valid = (pos >= plan.starts[:, None]) & (pos < plan.ends[:, None])
        out = torch.where(valid[:, None, :, None], out, 0)
    return out.transpose(1, 2), route


def _decode(module, q, k, v, plan: AttentionPlan, backend):
    b, t_kv = q.shape[0], k.shape[2]
    query = plan.past  # the new token's key position
    if plan.starts is None:
        lengths = _full_lengths(query + 1, b, q.device)
        valid = None
    else:
        if plan.left_padded:  # a copy of the cached keys, rotated so each row's keys start at 0
            index = (torch.arange(t_kv, device=q.device) + plan.starts[:, None]) % t_kv
            k, v = _rows(k, index), _rows(v, index)
        lengths = (torch.clamp(plan.ends, max=query + 1) - plan.starts).clamp(min=0).to(torch.int32)
        valid = (plan.starts <= query) & (query < plan.ends)
    out, route = _run("decode_attention", backend, q[:, :, 0], k, v, lengths, None, None, module.scaling,
                      check_seqlens=False)  # fmt: skip
    if out is None:
        return None, route
    if valid is not None:
        out = torch.where(valid[:, None, None], out, 0)
    return out[:, None], route


def _full_lengths(n: int | torch.Tensor, b: int, device: torch.device) -> torch.Tensor:
    if isinstance(n, torch.Tensor):
        return n.to(device=device, dtype=torch.int32).reshape(1).expand(b).contiguous()
    return torch.full((b,), n, dtype=torch.int32, device=device)


def _chunked(module, q, k, v, past, backend):
    """Queries ``past .. past + T - 1`` against the cache: one decode row per query position, over all heads."""
    b, h, t, d = q.shape
    t_kv = k.shape[2]
    qs = q.permute(2, 0, 1, 3).reshape(t, b * h, d)
    ks, vs = (x.reshape(b * h, t_kv, d).unsqueeze(0).expand(t, -1, -1, -1) for x in (k, v))
    lengths = (torch.arange(t, device=q.device) + (past + 1)).to(torch.int32)
    out, route = _run("decode_attention", backend, qs, ks, vs, lengths, None, None, module.scaling,
                      check_seqlens=False)  # fmt: skip
    if out is None:
        return None, route
    return out.view(t, b, h, d).permute(1, 0, 2, 3), route + " (chunked prefill)"
