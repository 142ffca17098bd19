"""``layer_norm`` on CPU: ATen's kernel after the residual add, exactly the reference (registered so that
``backend="cpu"`` runs a whole model)."""

from __future__ import annotations

from gpt2fast.ops._registry import register_impl
from gpt2fast.ops.specs import layer_norm as spec

#: The registered implementation: the reference's ``F.layer_norm`` (+ the residual add), nothing faster exists.
layer_norm = register_impl("layer_norm", "cpu", differentiable=True)(spec.reference)
