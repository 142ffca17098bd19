"""Shared helpers of the patch_hf tests: tiny transformers GPT-2 models and a counter of op calls."""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping

import pytest
import torch

from gpt2fast import ops
from gpt2fast.testing.conformance import count_dispatches

N_LAYER = 2
OPS = ("layer_norm", "bias_gelu", "attention", "decode_attention", "linear_cross_entropy")


def cpu_status(name: str) -> tuple[bool, str]:
    """Whether backend ``name`` runs CPU tensors here (Triton: under its interpreter), and why not."""
    status = ops.backend_status(name, "cpu")
    return status.available, status.reason


def backend_param(name: str):
    """``pytest.param(name)`` skipping where the backend cannot run CPU tensors."""
    ok, reason = cpu_status(name)
    return pytest.param(name, marks=pytest.mark.skipif(not ok, reason=f"{name}: {reason}"))


BACKENDS = [backend_param("reference"), backend_param("triton")]


def tiny_config(**overrides):
    """Two layers, head_dim 64 (GPT-2's), a vocab that is not a power of two; weights large enough that greedy
    decoding has clear winners instead of near-ties."""
    from transformers import GPT2Config

    kw = dict(
        n_layer=N_LAYER,
        n_embd=128,
        n_head=2,
        vocab_size=97,
        n_positions=64,
        initializer_range=0.2,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=0,
    )
    kw.update(overrides)
    return GPT2Config(**kw)


def tiny_model(dtype: torch.dtype = torch.float32, device: str = "cpu", cls=None, **overrides):
    """A deterministic tiny transformers GPT-2 (``GPT2LMHeadModel`` unless ``cls``) in eval mode."""
    from transformers import GPT2LMHeadModel

    torch.manual_seed(0)
    model = (cls or GPT2LMHeadModel)(tiny_config(**overrides))
    return model.eval().to(device=device, dtype=dtype)


def ids(batch: int = 2, t: int = 7, vocab: int = 97) -> torch.Tensor:
    """Seeded token ids in [1, vocab) (0 is the pad token)."""
    return torch.randint(1, vocab, (batch, t), generator=torch.Generator().manual_seed(1))


def left_padded(batch: int = 3, t: int = 7) -> tuple[torch.Tensor, torch.Tensor]:
    """Ids and attention mask of a left-padded batch: row 1 has 3 pads, row 2 one, row 0 none."""
    x, mask = ids(batch, t), torch.ones(batch, t, dtype=torch.long)
    for row, pads in ((1, 3), (2, 1)):
        if row < batch:
            x[row, :pads], mask[row, :pads] = 0, 0
    return x, mask


def greedy(model, x, mask=None, n: int = 6, **kw):
    """``n`` greedy tokens (no early stop) from ``model.generate``."""
    mask = torch.ones_like(x) if mask is None else mask
    with torch.no_grad():
        return model.generate(x, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False, **kw)


class OpCalls(Mapping):
    """Calls that reached any backend's implementation, by op (a live view of a ``count_dispatches`` counter);
    ``backends`` is the set of backends that were reached."""

    def __init__(self, by_impl: Counter) -> None:
        self.by_impl = by_impl

    def __getitem__(self, op: str) -> int:
        return sum(n for (o, _), n in self.by_impl.items() if o == op)

    def __iter__(self):
        return iter(OPS)

    def __len__(self) -> int:
        return len(OPS)

    @property
    def backends(self) -> set[str]:
        return {b for (_, b), n in self.by_impl.items() if n}


def count_calls():
    """Generator for a ``counts`` fixture: calls into every backend's op implementations, {op name: calls}."""
    ops.backend_names()  # load the built-in backends first, so their implementations are counted too
    with count_dispatches() as by_impl:
        yield OpCalls(by_impl)
