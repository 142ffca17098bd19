"""The transformers GPT-2 layout that ``patch_hf`` relies on, imported and checked once.

``gpt2fast`` imports without transformers; this module imports it on first use and raises one clear error naming
the installed version when anything the patch reads or mirrors is missing or has changed shape.
"""

from __future__ import annotations

import functools
import inspect
from types import SimpleNamespace

#: Oldest transformers major version whose GPT-2 layout is targeted (tested with 5.24).
MIN_TRANSFORMERS_MAJOR = 5
TESTED = "5.24"
#: ``activation_function`` values whose MLP activation equals ``ops.bias_gelu``'s tanh GELU.
TANH_GELU_ACTIVATIONS = ("gelu_new", "gelu_pytorch_tanh")

#: Parameters of the forwards that the patched classes mirror; a transformers that changes them is refused.
FORWARD_PARAMS = {
    "GPT2Model": (
        "input_ids", "cache", "attention_mask", "token_type_ids", "position_ids", "inputs_embeds",
        "encoder_hidden_states", "encoder_attention_mask", "use_cache", "kwargs",
    ),
    "GPT2LMHeadModel": (
        "input_ids", "cache", "attention_mask", "token_type_ids", "position_ids", "inputs_embeds",
        "encoder_hidden_states", "encoder_attention_mask", "labels", "use_cache", "logits_to_keep", "kwargs",
    ),
    "GPT2DoubleHeadsModel": (
        "input_ids", "cache", "attention_mask", "token_type_ids", "position_ids", "inputs_embeds", "mc_token_ids",
        "labels", "mc_labels", "use_cache", "kwargs",
    ),
    "GPT2Attention": (
        "hidden_states", "cache", "attention_mask", "encoder_hidden_states", "encoder_attention_mask",
        "output_attentions", "kwargs",
    ),
}  # fmt: skip

_MODELING_NAMES = (
    "GPT2Model",
    "GPT2LMHeadModel",
    "GPT2DoubleHeadsModel",
    "GPT2ForSequenceClassification",
    "GPT2ForTokenClassification",
    "GPT2ForQuestionAnswering",
    "GPT2PreTrainedModel",
    "GPT2Attention",
    "GPT2MLP",
    "GPT2DoubleHeadsModelOutput",
    "CausalLMOutputWithCrossAttentions",
    "ALL_ATTENTION_FUNCTIONS",
    "eager_attention_forward",
)


@functools.cache
def layout() -> SimpleNamespace:
    """transformers' GPT-2 classes and helpers, as a namespace; raises when the installed version lacks them."""
    try:
        import transformers
    except ImportError as exc:  # pragma: no cover - transformers is a dev dependency
        raise ImportError("gpt2fast.patch_hf needs transformers (pip install 'transformers>=5')") from exc
    version = transformers.__version__
    if int(version.split(".")[0]) < MIN_TRANSFORMERS_MAJOR:
        raise RuntimeError(
            f"gpt2fast.patch_hf supports transformers >= {MIN_TRANSFORMERS_MAJOR}.0 (tested with {TESTED}); "
            f"installed is {version}"
        )
    missing: list[str] = []
    found: dict[str, object] = {}
    try:
        from transformers.activations import ACT2CLS
        from transformers.cache_utils import EncoderDecoderCache
        from transformers.models.gpt2 import modeling_gpt2 as mg
        from transformers.utils.deprecation import deprecate_kwarg
        from transformers.utils.generic import can_return_tuple

        found.update(
            ACT2CLS=ACT2CLS,
            EncoderDecoderCache=EncoderDecoderCache,
            deprecate_kwarg=deprecate_kwarg,
            can_return_tuple=can_return_tuple,
        )
        for name in _MODELING_NAMES:
            if hasattr(mg, name):
                found[name] = getattr(mg, name)
            else:
                missing.append(f"transformers.models.gpt2.modeling_gpt2.{name}")
    except ImportError as exc:
        missing.append(str(exc))
    if not missing:
        if not hasattr(found["GPT2Attention"], "_upcast_and_reordered_attn"):
            missing.append("GPT2Attention._upcast_and_reordered_attn")
        for cls_name, params in FORWARD_PARAMS.items():
            got = tuple(inspect.signature(found[cls_name].forward).parameters)[1:]
            if got != params:
                missing.append(f"{cls_name}.forward{params} (found {got})")
    if missing:
        raise RuntimeError(
            f"gpt2fast.patch_hf: transformers {version} lacks the GPT-2 layout it needs "
            f"(tested with {TESTED}): missing {', '.join(missing)}"
        )
    found["tanh_gelu_classes"] = tuple(found["ACT2CLS"][name] for name in TANH_GELU_ACTIVATIONS)
    return SimpleNamespace(version=version, **found)
