"""``patch_hf`` / ``unpatch_hf`` / ``is_patched`` / ``hf_patch_stats`` / ``auto_patch``."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from gpt2fast import checks, ops
from gpt2fast.hf_patch import _classes
from gpt2fast.hf_patch._layout import TANH_GELU_ACTIVATIONS, layout
from gpt2fast.hf_patch._stats import TOTALS, HFPatchStats

#: The transformers classes ``patch_hf`` accepts (every GPT-2 head; the body ``GPT2Model`` itself).
SUPPORTED_CLASSES = (
    "GPT2LMHeadModel",
    "GPT2Model",
    "GPT2DoubleHeadsModel",
    "GPT2ForSequenceClassification",
    "GPT2ForTokenClassification",
    "GPT2ForQuestionAnswering",
)
_HEAD_KINDS = {"GPT2LMHeadModel": "lm_head", "GPT2DoubleHeadsModel": "double_heads"}


@dataclass(frozen=True)
class PatchOptions:
    """What ``patch_hf`` was asked for; one object shared by a model's patched modules."""

    backend: str | None = ops.AUTO
    fused_loss: bool = True
    skip_logits: bool | None = False


def _body(model: nn.Module, lay) -> nn.Module:
    """The ``GPT2Model`` inside ``model`` (or ``model`` itself); ``TypeError`` for anything else."""
    if isinstance(model, lay.GPT2Model):
        return model
    heads = tuple(getattr(lay, name) for name in SUPPORTED_CLASSES)
    if isinstance(model, heads) and isinstance(getattr(model, "transformer", None), lay.GPT2Model):
        return model.transformer
    hint = " (gpt2fast.GPT2 already runs on gpt2fast ops)" if type(model).__name__ == "GPT2" else ""
    raise TypeError(
        f"model must be a transformers {', '.join(SUPPORTED_CLASSES)}; got "
        f"{type(model).__module__}.{type(model).__name__}{hint}"
    )


def _check_backend(backend: str | None, model: nn.Module) -> None:
    """A named ``backend`` must be registered, run the model's shapes and (unless on meta) its device."""
    if backend is None or backend == ops.AUTO:
        return
    names = (ops.AUTO, *ops.backend_names())
    if backend not in names:
        raise ValueError(f"backend must be one of {names} or None, got {backend!r}")
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    if device.type != "meta":  # a meta model (from_pretrained before its weights) is checked at its first call
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
        mlp_dim=(c.n_inner or 4 * c.n_embd) if c.activation_function in TANH_GELU_ACTIVATIONS else None,
        eps=c.layer_norm_epsilon,
        dtype=param.dtype if param is not None else torch.float32,
    )


def _targets(model: nn.Module, body: nn.Module, lay) -> list[tuple[nn.Module, str]]:
    """Every module ``patch_hf`` patches, with its patch kind."""
    out = [(body, "body")]
    for block in body.h:
        out += [(block.ln_1, "layer_norm"), (block.attn, "attention"), (block.ln_2, "layer_norm")]
        if hasattr(block, "crossattention"):
            out += [(block.crossattention, "attention"), (block.ln_cross_attn, "layer_norm")]
        out.append((block.mlp, "mlp"))
    out.append((body.ln_f, "layer_norm"))
    for name, kind in _HEAD_KINDS.items():
        if isinstance(model, getattr(lay, name)):
            out.append((model, kind))
    return out


def patch_hf(
    model: nn.Module,
    backend: str | None = "auto",
    *,
    fused_loss: bool = True,
    skip_logits: bool | None = False,
) -> nn.Module:
    """Make a transformers GPT-2 run on gpt2fast ops, in place, at any point of its life; returns ``model``.

    ``model`` is any GPT-2 class of transformers (:data:`SUPPORTED_CLASSES`), on any device including ``meta``
    (``from_pretrained`` before its weights load).  ``backend`` is ``"auto"``, a registered backend name or
    ``None`` (the process default); a named backend is checked now against the model's shapes and, unless it is on
    meta, its device (a meta model's device is checked at its first call).  ``fused_loss``: with labels,
    ``GPT2LMHeadModel``/``GPT2DoubleHeadsModel`` compute the language-model loss through
    ``ops.linear_cross_entropy``; ``skip_logits`` then says whether they still return the logits (``False``, the
    default: always, as transformers does; ``None``: not in ``train()`` mode, Liger-Kernel's rule; ``True``: never),
    the memory saving being in not building them.  Patching again changes only the
    options.  See :mod:`gpt2fast.hf_patch` for what runs where.
    """
    lay = layout()
    body = _body(model, lay)
    if not isinstance(fused_loss, bool) or skip_logits not in (None, True, False):
        raise TypeError(
            f"fused_loss must be a bool and skip_logits None or a bool, got {fused_loss!r}, {skip_logits!r}"
        )
    _check_backend(backend, model)
    options = PatchOptions(backend, fused_loss, skip_logits)
    stats = body.__dict__.get(_classes.STATS_ATTR) or HFPatchStats()
    for module, kind in _targets(model, body, lay):
        cls = type(module)
        if _classes.original_class(cls) is None:
            module.__class__ = _classes.patched_class(cls, kind)
        setattr(module, _classes.OPTIONS_ATTR, options)
        setattr(module, _classes.STATS_ATTR, stats)
    return model


def unpatch_hf(model: nn.Module) -> bool:
    """Undo :func:`patch_hf` exactly (classes and attributes); returns ``False`` when nothing was patched."""
    _body(model, layout())
    undone = False
    for module in model.modules():
        orig = _classes.original_class(type(module))
        if orig is not None:
            module.__class__ = orig
            undone = True
        for attr in _classes.PATCH_ATTRS:
            module.__dict__.pop(attr, None)
    return undone


def is_patched(model: nn.Module) -> bool:
    """Whether :func:`patch_hf` is in effect on ``model``."""
    body = getattr(model, "transformer", model)
    return _classes.original_class(type(body)) is not None


def hf_patch_stats(model: nn.Module | None = None) -> HFPatchStats:
    """Where the calls of a patched ``model`` went (a live :class:`HFPatchStats`), or, without a model, the calls
    of every patched model of this process."""
    if model is None:
        return TOTALS
    body = getattr(model, "transformer", model)
    stats = body.__dict__.get(_classes.STATS_ATTR)
    if stats is None:
        raise ValueError(f"{type(model).__name__} is not patched (gpt2fast.patch_hf)")
    return stats


class AutoPatch:
    """The hook :func:`auto_patch` installs; ``remove()`` (or leaving its ``with`` block) takes it out again."""

    def __init__(self, options: dict) -> None:
        self.options = options
        self._owner = layout().GPT2PreTrainedModel
        self._own = self._owner.__dict__.get("post_init")  # normally inherited from PreTrainedModel
        inherited = self._owner.post_init
        hook = self

        def post_init(model):
            inherited(model)
            if hook.active and type(model).__name__ in SUPPORTED_CLASSES:
                try:
                    _body(model, layout())
                except TypeError:
                    return
                patch_hf(model, **hook.options)

        self.active = True
        self._owner.post_init = post_init

    def remove(self) -> None:
        """Stop patching newly built models (models already patched stay patched)."""
        global _active
        if not self.active:
            return
        self.active = False
        if self._own is None:
            del self._owner.post_init
        else:
            self._owner.post_init = self._own
        if _active is self:
            _active = None

    def __enter__(self) -> AutoPatch:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


_active: AutoPatch | None = None


def auto_patch(backend: str | None = "auto", *, fused_loss: bool = True, skip_logits: bool | None = False) -> AutoPatch:
    """Patch every transformers GPT-2 model built from now on (``from_pretrained``, ``from_config``, a constructor).

    The hook runs at the end of each model's ``post_init``, i.e. on the meta device inside ``from_pretrained``,
    before its weights load (the backend is resolved at the model's first call).  Returns an :class:`AutoPatch`;
    ``auto_patch(...).remove()`` or ``with gpt2fast.auto_patch(): ...`` ends it.  Calling it again replaces the
    options of the active hook.
    """
    global _active
    options = dict(backend=backend, fused_loss=fused_loss, skip_logits=skip_logits)
    if _active is not None:
        _active.options = options
        return _active
    _active = AutoPatch(options)
    return _active
