"""Drop-in gpt2fast ops for an existing transformers GPT-2: ``patch_hf(model)`` / ``unpatch_hf(model)``.

``patch_hf`` rewires a ``GPT2LMHeadModel`` or ``GPT2Model`` *in place* so that, at inference,

* every LayerNorm (``ln_1``, ``ln_2``, ``ln_f``, and ``ln_cross_attn`` if present) runs ``ops.layer_norm``;
* the MLP runs ``c_fc``'s matmul without its bias, then the fused ``ops.bias_gelu`` (needs a tanh-GELU
  activation, ``gelu_new`` / ``gelu_pytorch_tanh``, as every GPT-2 checkpoint uses; other activations keep
  transformers' MLP);
* self-attention goes through a transformers attention function registered as ``"gpt2fast"``
  (``AttentionInterface``), which runs ``ops.attention`` for prefill (query and key lengths equal, causal)
  and ``ops.decode_attention`` for one-token cached decode.

Users keep calling ``model(...)`` / ``model.generate(...)``.

When transformers' own code runs instead (the fallbacks)
--------------------------------------------------------
* **Training or autograd**: when the module is in ``train()`` mode (dropout) or a gradient is needed
  (grad mode on and an input or parameter requires grad), the original transformers code runs, so training
  and gradients are untouched.  The fast path is for inference: ``torch.no_grad()`` / ``inference_mode()``
  (``generate`` runs under ``no_grad``) in ``eval()`` mode.
* **Padding masks**: the registered mask function is transformers' ``sdpa_mask``, which returns ``None``
  when the mask is plain causal (no padding; q_len == kv_len, or q_len == 1).  When a mask *is*
  materialised (left/right padding in a batch, packed sequences, a static cache's decode step, a prefill
  that continues an existing cache with q_len > 1) attention runs transformers' ``sdpa_attention_forward``
  with that mask -- exact, but not through gpt2fast.  LayerNorm and bias+GELU still use gpt2fast there.
* **Dtype mismatches** (e.g. autocast making activations fp16 against fp32 weights) and dtypes the ops do
  not take (an fp64 model): that module runs transformers' code.
* **Cross-attention** (non-causal attention modules): transformers' sdpa path.
* ``output_attentions=True``: the gpt2fast attention returns no attention weights (``None``).

Supported transformers: 5.x whose GPT-2 uses the ``AttentionInterface`` (tested with 5.24).  The module
layout is checked at patch time and a clear error names the installed version when something is missing.

Reversibility: ``patch_hf`` stores what it replaced on the model; ``unpatch_hf`` restores the original
``forward`` bindings, the original ``config._attn_implementation`` and removes every attribute it added.
Patching twice only updates the backend (no double wrapping).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from gpt2fast import checks, ops
from gpt2fast.ops._validate import FLOAT_DTYPES

#: Name under which the gpt2fast attention function and its mask function are registered in transformers.
ATTN_IMPLEMENTATION = "gpt2fast"
#: Oldest transformers major version whose GPT-2 layout this module targets (tested: 5.24).
MIN_TRANSFORMERS_MAJOR = 5
#: MLP activations that equal ``ops.bias_gelu``'s tanh GELU (before the bias add is fused in).
TANH_GELU_ACTIVATIONS = ("gelu_new", "gelu_pytorch_tanh")

_STATE_ATTR = "_gpt2fast_patch"  # on the patched top-level model
_MODULE_ATTR = "_gpt2fast_state"  # on each patched submodule (read by the attention function)


@dataclass
class _PatchState:
    """What ``patch_hf`` changed on one model, so that ``unpatch_hf`` can undo exactly that."""

    backend: str | None
    attn_implementation: str | None
    # (module, forward found in the instance __dict__ before patching, or None when it was the class method)
    forwards: list[tuple[nn.Module, Callable | None]] = field(default_factory=list)
    tagged: list[nn.Module] = field(default_factory=list)  # modules carrying _MODULE_ATTR
    mlp_patched: bool = False


# ---- transformers layout checks ------------------------------------------------------------------------


def _transformers_layout():
    """Import and check everything patching relies on; raise one clear error naming the version if absent."""
    try:
        import transformers
    except ImportError as exc:  # pragma: no cover - transformers is a dev dependency
        raise ImportError("gpt2fast.patch_hf needs transformers (pip install 'transformers>=5')") from exc
    version = transformers.__version__
    major = int(version.split(".")[0])
    if major < MIN_TRANSFORMERS_MAJOR:
        raise RuntimeError(
            f"gpt2fast.patch_hf supports transformers >= {MIN_TRANSFORMERS_MAJOR}.0 (tested with 5.24); "
            f"installed is {version}"
        )
    missing = []
    try:
        from transformers.models.gpt2 import modeling_gpt2 as mg

        for name in (
            "GPT2Model",
            "GPT2LMHeadModel",
            "GPT2Attention",
            "GPT2MLP",
            "GPT2Block",
            "ALL_ATTENTION_FUNCTIONS",
        ):
            if not hasattr(mg, name):
                missing.append(f"transformers.models.gpt2.modeling_gpt2.{name}")
        from transformers import AttentionInterface
        from transformers.integrations.sdpa_attention import sdpa_attention_forward
        from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
    except ImportError as exc:
        missing.append(str(exc))
    if not missing and not hasattr(mg.GPT2LMHeadModel, "set_attn_implementation"):
        missing.append("PreTrainedModel.set_attn_implementation")
    if missing:
        raise RuntimeError(
            f"gpt2fast.patch_hf: transformers {version} lacks the GPT-2 layout it needs "
            f"(tested with 5.24): missing {', '.join(missing)}"
        )
    return mg, AttentionInterface, AttentionMaskInterface, sdpa_mask, sdpa_attention_forward


def _gpt2_body(model: nn.Module, mg) -> nn.Module:
    """Return the ``GPT2Model`` inside ``model``; raise ``TypeError`` for anything else."""
    if isinstance(model, mg.GPT2LMHeadModel):
        return model.transformer
    if isinstance(model, mg.GPT2Model):
        return model
    hint = " (gpt2fast.GPT2 already runs on gpt2fast ops)" if type(model).__name__ == "GPT2" else ""
    raise TypeError(
        "model must be a transformers GPT2LMHeadModel or GPT2Model, got "
        f"{type(model).__module__}.{type(model).__name__}{hint}"
    )


# ---- the fast-path rule --------------------------------------------------------------------------------


def _needs_autograd(tensors: tuple[torch.Tensor, ...]) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _fast_ok(module: nn.Module, *tensors: torch.Tensor) -> bool:
    """The gpt2fast path runs only at inference: eval mode, no gradient needed, one dtype throughout,
    and one the ops support (an fp64 model keeps transformers' code instead of failing in ``ops``)."""
    if module.training or _needs_autograd(tensors):
        return False
    dtypes = {t.dtype for t in tensors if t is not None}
    return len(dtypes) == 1 and dtypes <= set(FLOAT_DTYPES)


# ---- replacement forwards ------------------------------------------------------------------------------


def _layer_norm_forward(ln: nn.LayerNorm, state: _PatchState, original: Callable) -> Callable:
    def forward(x: torch.Tensor) -> torch.Tensor:
        if not _fast_ok(ln, x, ln.weight, ln.bias):
            return original(x)
        return ops.layer_norm(x, ln.weight, ln.bias, ln.eps, backend=state.backend)

    return forward


def _mlp_forward(mlp: nn.Module, state: _PatchState, original: Callable) -> Callable:
    fc = mlp.c_fc

    def forward(x: torch.Tensor) -> torch.Tensor:
        if not _fast_ok(mlp, x, fc.weight, fc.bias):
            return original(x)
        h = torch.matmul(x, fc.weight)  # HF Conv1D weight is [in, out]; its bias is fused into the GELU
        h = ops.bias_gelu(h, fc.bias, backend=state.backend)
        return mlp.dropout(mlp.c_proj(h))  # dropout is the identity in eval mode

    return forward


def gpt2fast_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers attention function (``AttentionInterface``) running gpt2fast attention ops.

    ``query``/``key``/``value`` are ``[B, H, T, D]`` (keys/values already include the cache).  Returns
    ``([B, T_q, H, D], None)``.  Fast path (no mask, i.e. plain causal): ``T_q == T_k`` runs
    ``ops.attention(causal=True)``; ``T_q == 1`` runs ``ops.decode_attention`` over all ``T_k`` cached
    positions (the cache already holds the new token, so nothing is appended).  Anything else -- a
    materialised mask (padding), ``1 < T_q != T_k``, dropout, training, autograd, cross-attention --
    runs transformers' ``sdpa_attention_forward`` unchanged.
    """
    state = getattr(module, _MODULE_ATTR, None)
    backend = state.backend if state is not None else None
    t_q, t_k = query.shape[2], key.shape[2]
    fast = (
        attention_mask is None
        and dropout == 0.0
        and getattr(module, "is_causal", True)
        and _fast_ok(module, query, key, value)
        and (t_q == t_k or t_q == 1)
    )
    if not fast:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    if t_q == t_k:
        out = ops.attention(
            query,
            key,
            value,
            causal=True,
            scale=scaling,
            backend=backend,  # the kernels read strided views
        )
    else:
        b = query.shape[0]
        seqlens = torch.full((b,), t_k, dtype=torch.int32, device=query.device)
        out = ops.decode_attention(
            query[:, :, 0].contiguous(),
            key.contiguous(),
            value.contiguous(),
            seqlens,
            scale=scaling,
            backend=backend,
            check_seqlens=False,  # seqlens == T_k == the cache's length by construction: no device read-back
        )[:, :, None]
    return out.transpose(1, 2), None


# ---- public API -----------------------------------------------------------------------------------------


def _replace_forward(state: _PatchState, module: nn.Module, make: Callable) -> None:
    saved = module.__dict__.get("forward")
    original = module.forward  # bound method, or whatever instance forward (e.g. a hook wrapper) was there
    module.forward = make(module, state, original)
    state.forwards.append((module, saved))


def _tag(state: _PatchState, module: nn.Module) -> None:
    setattr(module, _MODULE_ATTR, state)
    state.tagged.append(module)


def _check_backend(backend: str | None, model: nn.Module, mlp_patched: bool) -> None:
    """A named ``backend`` must be registered, available on the model's device and able to run its shapes."""
    if backend is None or backend == ops.AUTO:
        return
    names = (ops.AUTO, *ops.backend_names())
    if backend not in names:
        raise ValueError(f"backend must be one of {names} or None, got {backend!r}")
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    status = ops.backend_status(backend, device)
    if not status.available:
        raise ops.BackendUnavailableError(
            f"backend {backend!r} cannot run this model's {device} parameters: {status.reason}"
        )
    c = model.config
    checks.check_backend(
        backend,
        n_embd=c.n_embd,
        n_head=c.n_head,
        mlp_dim=(c.n_inner or 4 * c.n_embd) if mlp_patched else None,
        eps=c.layer_norm_epsilon,
        dtype=param.dtype if param is not None else torch.float32,
    )


def patch_hf(model: nn.Module, backend: str | None = "auto") -> nn.Module:
    """Make a transformers ``GPT2LMHeadModel``/``GPT2Model`` run on gpt2fast ops, in place; returns ``model``.

    ``backend`` is ``"auto"``, a registered backend name (:func:`gpt2fast.ops.backend_names`) or ``None``
    (the process-wide default, see :func:`gpt2fast.ops.set_backend`).  A named backend is checked now against
    the model's device and its shapes (a head dim the backend's kernels lack is refused here, with the reason,
    not in every later call); "auto" falls through per call instead.  Patching an already patched model only
    changes its backend.  See the module docstring for when transformers' own code still runs.
    """
    mg, attention_interface, mask_interface, sdpa_mask, _ = _transformers_layout()
    body = _gpt2_body(model, mg)
    tanh_mlp = model.config.activation_function in TANH_GELU_ACTIVATIONS  # else transformers' MLP stays
    _check_backend(backend, model, tanh_mlp)

    existing = model.__dict__.get(_STATE_ATTR)
    if existing is not None:
        existing.backend = backend
        return model

    attention_interface.register(ATTN_IMPLEMENTATION, gpt2fast_attention)
    mask_interface.register(ATTN_IMPLEMENTATION, sdpa_mask)
    state = _PatchState(backend=backend, attn_implementation=model.config._attn_implementation)
    layer_norms = [body.ln_f]
    for block in body.h:
        layer_norms += [block.ln_1, block.ln_2]
        if hasattr(block, "ln_cross_attn"):
            layer_norms.append(block.ln_cross_attn)
        for attn in (block.attn, getattr(block, "crossattention", None)):
            if attn is not None:
                _tag(state, attn)
    for ln in layer_norms:
        _replace_forward(state, ln, _layer_norm_forward)
    if tanh_mlp:
        for block in body.h:
            _replace_forward(state, block.mlp, _mlp_forward)
        state.mlp_patched = True
    model.set_attn_implementation(ATTN_IMPLEMENTATION)
    setattr(model, _STATE_ATTR, state)
    return model


def unpatch_hf(model: nn.Module) -> bool:
    """Undo :func:`patch_hf` exactly; returns ``False`` when ``model`` was not patched."""
    mg = _transformers_layout()[0]
    _gpt2_body(model, mg)
    state = model.__dict__.get(_STATE_ATTR)
    if state is None:
        return False
    for module, saved in reversed(state.forwards):
        if saved is None:
            del module.forward
        else:
            module.forward = saved
    for module in state.tagged:
        delattr(module, _MODULE_ATTR)
    model.config._attn_implementation = state.attn_implementation
    delattr(model, _STATE_ATTR)
    return True


def is_patched(model: nn.Module) -> bool:
    """Whether :func:`patch_hf` is in effect on ``model``."""
    return _STATE_ATTR in model.__dict__
