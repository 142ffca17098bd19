"""``decode_attention`` on CPU: the append as one indexed write per cache, attention over the live cache length only.

CPU tensors' lengths are read on the host at no cost (there is no device to synchronise with), so instead of
masking the whole ``T_max`` cache as the sync-free reference does, this runs SDPA over the first
``max(lengths)`` positions (the same semantics: ``flash_attn_with_kvcache``'s); ragged batches get a key mask,
and a sequence with nothing to attend to gets zeros.  Lengths outside [0, T_max] (only possible unchecked) are
clamped, as in the kernels.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from gpt2fast.ops._registry import register_impl


@register_impl("decode_attention", "cpu")
def decode_attention(q, k_cache, v_cache, cache_seqlens, k_new, v_new, scale) -> torch.Tensor:
    """Append ``k_new``/``v_new`` at ``cache_seqlens[b]`` (when given), then attend to each sequence's
    positions; returns [B, H, D]."""
    t_max = k_cache.shape[2]
    lengths = [min(max(n, 0), t_max) for n in cache_seqlens.tolist()]
    if k_new is not None:
        rows = [b for b, n in enumerate(lengths) if n < t_max]  # a full cache appends nothing, as in the kernels
        if rows:  # one indexed write per cache for the whole batch: k_cache[b, :, lengths[b]] = k_new[b]
            at = (torch.tensor(rows), slice(None), torch.tensor([lengths[b] for b in rows]))
            k_cache[at] = k_new[rows]
            v_cache[at] = v_new[rows]
            for b in rows:
                lengths[b] += 1
    live = max(lengths)
    if live == 0:
        return q.new_zeros(q.shape)
    kc, vc = k_cache[:, :, :live], v_cache[:, :, :live]
    mask = None
    if min(lengths) < live:  # ragged: mask each sequence's positions past its length
        lens = torch.tensor(lengths, device=q.device)
        mask = (torch.arange(live, device=q.device)[None, :] < lens[:, None])[:, None, None, :]  # [B, 1, 1, T]
    out = F.scaled_dot_product_attention(q[:, :, None], kc, vc, attn_mask=mask, scale=scale)[:, :, 0]
    if min(lengths) == 0:  # an all-masked row is NaN in SDPA: nothing to attend to gives zeros
        out[torch.tensor([n == 0 for n in lengths], device=q.device)] = 0
    return out
