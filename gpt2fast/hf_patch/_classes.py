"""Patched module classes: a subclass of each transformers class, swapped in with ``module.__class__ = ...``.

A patched module keeps all of its own state (parameters, buffers, config) and gains two plain attributes, its
:class:`~gpt2fast.hf_patch._patch.PatchOptions` and its model's :class:`~gpt2fast.hf_patch._stats.HFPatchStats`.
Nothing closes over a module, so ``copy.deepcopy``, ``torch.save``/``torch.load`` of the whole model,
``state_dict`` round trips and ``.to()`` behave as on the unpatched model, and unpatching is a class swap back.

Each patched class keeps the original's ``__name__``, ``__qualname__`` and ``__module__``: transformers keys some
of its bookkeeping on those (``str(type(model))`` for the recorded outputs, the module source for
``set_attn_implementation``, ``__name__`` for ``save_pretrained``'s ``architectures``).  Instances pickle through
:func:`_rebuild` (their ``__reduce_ex__``), which re-creates the patched class from the original class and the
patch kind, so loading needs gpt2fast importable but no class of its by name.
"""

from __future__ import annotations

from collections.abc import Callable

#: Attributes every patched module carries (removed again by ``unpatch_hf``).
OPTIONS_ATTR = "_gpt2fast_options"
STATS_ATTR = "_gpt2fast_stats"
PATCH_ATTRS = (OPTIONS_ATTR, STATS_ATTR)

_mixin_factory: Callable[[], dict[str, type]] | None = None
_mixins: dict[str, type] | None = None
_classes: dict[tuple[type, str], type] = {}


def set_mixin_factory(factory: Callable[[], dict[str, type]]) -> None:
    """Register the function that builds the mixin of each patch kind (called once, on first use)."""
    global _mixin_factory
    _mixin_factory = factory


def _mixin(kind: str) -> type:
    global _mixins
    if _mixins is None:
        assert _mixin_factory is not None, "gpt2fast.hf_patch._modules registers the mixins on import"
        _mixins = _mixin_factory()
    return _mixins[kind]


def original_class(cls: type) -> type | None:
    """The transformers class a patched class stands for, or ``None`` for a class that is not patched."""
    return cls.__dict__.get("_gpt2fast_original")


def patched_class(orig: type, kind: str) -> type:
    """The patched subclass of ``orig`` for patch ``kind`` (``"layer_norm"``, ``"attention"``...), memoised."""
    key = (orig, kind)
    cls = _classes.get(key)
    if cls is None:
        namespace = {
            "__module__": orig.__module__,
            "__qualname__": orig.__qualname__,
            "__doc__": orig.__doc__,
            "_gpt2fast_original": orig,
            "_gpt2fast_kind": kind,
            "__reduce_ex__": _reduce_ex,
        }
        cls = _classes[key] = type(orig.__name__, (_mixin(kind), orig), namespace)
    return cls


def _reduce_ex(self, protocol: int):
    cls = type(self)
    return _rebuild, (cls._gpt2fast_original, cls._gpt2fast_kind), self.__getstate__()


def _rebuild(orig: type, kind: str):
    """Unpickling / deepcopy: an empty instance of the patched class (its state is set next)."""
    cls = patched_class(orig, kind)
    return cls.__new__(cls)
