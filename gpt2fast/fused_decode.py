"""The fused decode step: four ops per layer, each one launch on the kernel backends.

Per layer, on ``[B, C]`` rows (one token per sequence):

1. ``fused_linear``: ln_1 as the prologue of the QKV projection, its bias in the epilogue;
2. ``decode_attention``: the K/V append and flash-decoding, the split merge in the same launch (Triton);
3. ``fused_linear``: the output projection with its bias and the residual add;
4. ``fused_mlp``: ln_2, c_fc + bias + GELU, c_proj + bias and the residual add.

Then the LM head: ``fused_linear`` over the tied embedding with ln_f as its prologue.  The residual stream is
carried explicitly (each sublayer returns ``x + f(x)``), so no LayerNorm needs a residual input.

Whether a step takes this path is decided per batch size through the op registry (:func:`use_fused`):
``model.decode_path`` "auto" takes it when the model's backend resolves ``fused_linear`` and ``fused_mlp`` to an
implementation other than the reference for the step's shapes (a kernel backend, or a CPU one, implements
them); otherwise the unfused ops run, as before.  "fused" and "unfused" force either (tests compare them).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from gpt2fast import ops
from gpt2fast.ops import _registry

if TYPE_CHECKING:
    from gpt2fast.model import GPT2

#: The values of ``GPT2.decode_path``.
DECODE_PATHS = ("auto", "fused", "unfused")
#: The ops whose implementation decides "auto" (decode_attention is shared with the unfused path).
FUSED_OPS = ("fused_linear", "fused_mlp")


def check_decode_path(value: object) -> str:
    """``value`` is one of :data:`DECODE_PATHS`; returns it."""
    if value not in DECODE_PATHS:
        raise ValueError(f"decode_path must be one of {DECODE_PATHS}, got {value!r}")
    return value


def _step_args(model: GPT2, batch: int) -> dict[str, tuple]:
    """The arguments of the fused ops in a step of ``batch`` rows: the model's own parameters, meta rows."""
    block, c = model.h[0], model.config.n_embd
    rows = torch.empty(batch, c, dtype=model.wte.weight.dtype, device="meta")
    eps = model.config.layer_norm_epsilon
    a, m = block.attn, block.mlp
    ln1, ln2 = block.ln_1, block.ln_2
    return {
        "fused_linear": (rows, a.c_attn.weight, a.c_attn.bias, ln1.weight, ln1.bias, eps, False, None),
        "fused_mlp": (rows, ln2.weight, ln2.bias, eps, m.c_fc.weight, m.c_fc.bias, m.c_proj.weight, m.c_proj.bias),
        "lm_head": (rows, model.wte.weight, None, model.ln_f.weight, model.ln_f.bias, eps, False, None),
    }


def fused_backends(model: GPT2, batch: int) -> dict[str, str | None]:
    """The backend each fused op of a ``batch``-row step resolves to for the model's backend (None: none can)."""
    device = model.wte.weight.device
    out: dict[str, str | None] = {}
    with torch.no_grad():
        for name, args in _step_args(model, batch).items():
            op = "fused_linear" if name == "lm_head" else name
            try:
                out[name] = _registry.select(op, model.backend, args, device).backend
            except (ValueError, _registry.BackendUnavailableError):
                out[name] = None
    return out


def use_fused(model: GPT2, batch: int) -> bool:
    """Whether a decode step of ``batch`` sequences takes the fused path (memoised per batch size and backend).

    "auto": every fused op resolves, for the model's backend on its device and the step's shapes, to an
    implementation other than the reference (the reference runs the unfused ops just as well).
    """
    path = model.decode_path
    if path != "auto":
        return path == "fused"
    key = (batch, model.backend, ops.get_backend(), model.wte.weight.device, model.wte.weight.dtype)
    memo = model.__dict__.setdefault("_fused_memo", {})
    if key not in memo:
        chosen = fused_backends(model, batch).values()
        memo[key] = all(b is not None and b != ops.REFERENCE for b in chosen)
    return memo[key]


def decode_logits(model: GPT2, tokens: torch.Tensor) -> torch.Tensor:
    """One fused decode step: append ``tokens [B]`` at each sequence's cache length; next-token logits [B, V].

    The caller (``GPT2.decode_step``) checked the tokens and the cache bound and advances the lengths.
    """
    cache, cfg, backend = model.cache, model.config, model.backend
    B, C, H = tokens.shape[0], cfg.n_embd, cfg.n_head
    eps = cfg.layer_norm_epsilon
    x = model.wte(tokens) + model.wpe(cache.seqlens)  # [B, C]: the residual stream
    for i, block in enumerate(model.h):
        a, m, kv = block.attn, block.mlp, cache.layer(i)
        qkv = ops.fused_linear(x, a.c_attn.weight, a.c_attn.bias, block.ln_1.weight, block.ln_1.bias, eps,
                               backend=backend)  # fmt: skip
        q, k, v = qkv.view(B, 3, H, C // H).unbind(1)  # [B, H, D] each, strided views
        y = ops.decode_attention(q, kv.k, kv.v, kv.seqlens, k, v, backend=backend, check_seqlens=False)
        x = ops.fused_linear(y.view(B, C), a.c_proj.weight, a.c_proj.bias, residual=x, backend=backend)
        x = ops.fused_mlp(x, block.ln_2.weight, block.ln_2.bias, eps, m.c_fc.weight, m.c_fc.bias, m.c_proj.weight,
                          m.c_proj.bias, backend=backend)  # fmt: skip
    return ops.fused_linear(x, model.wte.weight, None, model.ln_f.weight, model.ln_f.bias, eps, backend=backend)
