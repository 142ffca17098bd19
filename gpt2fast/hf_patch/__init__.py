"""Drop-in gpt2fast ops for transformers' GPT-2: ``patch_hf(model)`` / ``unpatch_hf(model)`` / ``auto_patch()``.

``patch_hf`` rewires any transformers GPT-2 (``GPT2LMHeadModel``, ``GPT2Model``, ``GPT2DoubleHeadsModel``,
``GPT2ForSequenceClassification``, ``GPT2ForTokenClassification``, ``GPT2ForQuestionAnswering``) *in place*:

* every LayerNorm of the ``transformer`` body runs ``ops.layer_norm``;
* each MLP runs ``c_fc``'s matmul, then the fused ``ops.bias_gelu`` (tanh-GELU activations only);
* self-attention runs ``ops.attention`` (prefill, training) or ``ops.decode_attention`` (cached decode, chunked
  prefill), with transformers' causal mask turned into lengths (padded batches included, see ``_routing``);
* with labels, ``GPT2LMHeadModel`` and ``GPT2DoubleHeadsModel`` compute the language-model loss with
  ``ops.linear_cross_entropy`` from the hidden states, the logits kept or skipped (see ``_heads``).

It works in ``eval()`` and ``train()`` mode, with or without gradients: a call that needs a gradient runs only
differentiable implementations (the registry's rule; ``reference`` always is).  Users keep calling
``model(...)``, ``model.generate(...)``, ``Trainer(model=...)`` and ``torch.compile(model)``.

How it patches
--------------
Each patched module's class is swapped for a subclass (same name, module and qualname) whose ``forward`` runs
gpt2fast or, where it cannot serve the call, ``super().forward``: transformers' own code.  The modules own
nothing new but two plain attributes (their options, and the model's call counter), so ``copy.deepcopy``,
``torch.save``/``torch.load`` of the whole model, ``state_dict`` round trips and ``.to()`` behave as unpatched,
and ``unpatch_hf`` swaps the classes back.  ``config._attn_implementation`` is never touched: it keeps the name
the model was built with (``"eager"``, ``"sdpa"``...), checks of it keep working, and every fallback runs that
implementation, with its mask, exactly as unpatched (an eager model keeps eager-only behaviour such as
``reorder_and_upcast_attn``).

When transformers' own code runs (the fallbacks; each one counted, with its reason)
------------------------------------------------------------------------------------
* ``output_attentions=True`` (call or config): the configured attention, which returns weights where it can;
* attention dropout in ``train()`` mode (``attn_pdrop > 0``): the kernels have no dropout; the other modules
  stay on gpt2fast (their dropout is the module's own);
* cross-attention (``add_cross_attention``), a custom 4-D mask, a mask with holes, packed sequences
  (``position_ids`` restarting), bidirectional configs (``is_causal=False``), chunked prefill of a padded batch,
  sliding or linear cache layers;
* dtypes the ops do not take (fp64) and mixed dtypes outside autocast (under autocast, LayerNorm runs in fp32 and
  the rest in the autocast dtype, as torch does);
* a named backend that declines an input, or that has no backward when a gradient is needed;
* the loss: ``fused_loss=False``, ``logits_to_keep`` with labels, a custom ``loss_function``.
``head_mask`` is ignored, as transformers 5's GPT-2 ignores it.

Where every call went: ``gpt2fast.hf_patch_stats(model)`` (an :class:`HFPatchStats`; ``.fast()``,
``.fallback()``, ``.reasons()``, ``.summary()``); without a model, the totals of the whole process.

Lifecycle: ``patch_hf`` works on a meta-device model (a named backend is then resolved at its first call);
``gpt2fast.auto_patch(...)`` patches every GPT-2 model built afterwards, ``from_pretrained`` included (a hook at
the end of ``post_init``, before the weights load).

Supported transformers: 5.x (tested with 5.24); the layout is checked at patch time and a clear error names the
installed version when something it mirrors is missing or has changed.
"""

from gpt2fast.hf_patch import _modules  # noqa: F401  (registers the patched classes' mixins)
from gpt2fast.hf_patch._patch import (
    SUPPORTED_CLASSES,
    AutoPatch,
    PatchOptions,
    auto_patch,
    hf_patch_stats,
    is_patched,
    patch_hf,
    unpatch_hf,
)
from gpt2fast.hf_patch._stats import HFPatchStats

__all__ = [
    "SUPPORTED_CLASSES",
    "AutoPatch",
    "HFPatchStats",
    "PatchOptions",
    "auto_patch",
    "hf_patch_stats",
    "is_patched",
    "patch_hf",
    "unpatch_hf",
]
