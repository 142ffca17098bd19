"""The fused decode path (gpt2fast.fused_decode): chosen through the registry with fall-through, token-identical
to the unfused ops, and at most four launches per layer (counted on CPU, Triton under its interpreter)."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from _backends import DEVICE, backend_param

from gpt2fast import GPT2, GPT2Config, fused_decode, ops
from gpt2fast.bench import e2e
from gpt2fast.testing import assert_fa_close
from gpt2fast.testing.conformance import count_dispatches

pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")

#: The tiny test model with a small vocab: the LM head is a fused GEMV too, and the interpreter runs it per program.
TINY = dataclasses.replace(GPT2Config.from_name("tiny"), vocab_size=512)
#: Backends whose fused ops run here (the Triton interpreter on CPU, or a GPU), plus the CPU backend on CPU.
FUSED_BACKENDS = [backend_param("triton"), backend_param("cpu")]


def model(backend: str | None, n_layer: int = TINY.n_layer, path: str = "auto") -> GPT2:
    """A seeded random tiny model on the test device."""
    m = GPT2.random(dataclasses.replace(TINY, n_layer=n_layer), seed=0, device=DEVICE, backend=backend)
    m.decode_path = path
    return m


def prompts(batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded prompts of ragged lengths (1..7 tokens) and their attention mask."""
    g = torch.Generator().manual_seed(batch)
    ids = torch.randint(0, TINY.vocab_size, (batch, 7), generator=g)
    lengths = torch.randint(1, 8, (batch,), generator=g)
    mask = (torch.arange(7)[None, :] >= 7 - lengths[:, None]).long()
    return ids.to(DEVICE), mask.to(DEVICE)


# ---- which path runs -----------------------------------------------------------------------------------------
def test_auto_takes_the_fused_path_where_a_backend_implements_it():
    assert not fused_decode.use_fused(model("reference"), 2)  # the reference runs the unfused ops
    on_cpu = model(None)
    if DEVICE == "cpu":  # "auto" on CPU tensors: the cpu backend implements the fused ops
        assert fused_decode.fused_backends(on_cpu, 2) == {"fused_linear": "cpu", "fused_mlp": "cpu", "lm_head": "cpu"}
        assert fused_decode.use_fused(on_cpu, 2)
    if ops.backend_status("triton", DEVICE).available:
        tri = model("triton")
        assert fused_decode.use_fused(tri, 16)
        assert not fused_decode.use_fused(tri, 17)  # the kernels take 16 rows at most: the unfused ops run
    forced = model("reference", path="fused")
    assert fused_decode.use_fused(forced, 2) and not fused_decode.use_fused(model("cpu", path="unfused"), 2)


def test_decode_path_is_checked():
    m = model("reference")
    with pytest.raises(ValueError, match=r"decode_path must be one of \('auto', 'fused', 'unfused'\), got 'fast'"):
        m.decode_path = "fast"
    assert m.decode_path == "auto"


def test_the_fused_step_calls_the_fused_ops():
    m = model("reference", path="fused")
    m.setup_cache(2, 16)
    m.prefill(torch.randint(0, TINY.vocab_size, (2, 3), device=DEVICE))
    with count_dispatches() as calls:
        m.decode_step(torch.tensor([1, 2], device=DEVICE))
    n = TINY.n_layer
    assert dict(calls) == {
        ("fused_linear", "reference"): 2 * n + 1,  # QKV and output projection per layer, the LM head
        ("decode_attention", "reference"): n,
        ("fused_mlp", "reference"): n,
    }


# ---- the same tokens -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", FUSED_BACKENDS)
@pytest.mark.parametrize("batch", [1, 3])
def test_greedy_generation_is_token_identical_to_the_unfused_path(backend, batch):
    # fp32 on a tiny model: the fused ops (LayerNorm prologues, epilogues, in-launch reductions) change rounding
    # only, which must not change a greedy token here.  Ragged, left-padded prompts.
    ids, mask = prompts(batch)
    fused = model(backend, path="fused").generate(ids, mask, max_new_tokens=5)
    unfused = model(backend, path="unfused").generate(ids, mask, max_new_tokens=5)
    assert torch.equal(fused, unfused)


@pytest.mark.parametrize("backend", FUSED_BACKENDS)
def test_fused_logits_at_batch_13_match_the_reference(backend):
    ids = torch.randint(0, TINY.vocab_size, (13, 4), generator=torch.Generator().manual_seed(1)).to(DEVICE)
    fused, ref = model(backend, path="fused"), model("reference", path="unfused")
    for m in (fused, ref):
        m.setup_cache(13, 16)
        m.prefill(ids)
    for i in range(2):  # two steps: the cache grows
        assert_fa_close(fused.decode_step(ids[:, i]), ref.decode_step(ids[:, i]), msg=f"step {i}")


# ---- launches ------------------------------------------------------------------------------------------------
def step_launches(m: GPT2, batch: int = 2) -> e2e.Launches:
    """Launches of one decode step of ``m`` after a 5-token prompt (bench e2e's own counter)."""
    ids = torch.randint(0, TINY.vocab_size, (batch, 5), generator=torch.Generator().manual_seed(0)).to(DEVICE)
    return e2e.count_launches(e2e._gpt2fast_runner(m).prepare_step(ids), torch.device(DEVICE))


@pytest.mark.skipif(DEVICE != "cpu", reason="the CPU count (Triton interpreter launches + aten ops)")
@pytest.mark.skipif(not ops.backend_status("triton", "cpu").available, reason="needs the Triton interpreter")
def test_fused_path_launches_at_most_four_kernels_per_layer():
    one, two = (step_launches(model("triton", n_layer=n)) for n in (1, 2))
    per_layer = {k: two.by_name.get(k, 0) - one.by_name.get(k, 0) for k in two.by_name | one.by_name}
    per_layer = {k: v for k, v in per_layer.items() if v}
    assert per_layer == {
        "triton::_fused_linear_kernel": 2,  # ln_1 + QKV + bias; output projection + bias + residual
        "triton::_decode_split_kernel": 1,  # append + flash-decoding + the split merge
        "triton::_fused_mlp_kernel": 1,  # ln_2 + c_fc + GELU + c_proj + residual
    }
    assert sum(per_layer.values()) <= 4
    unfused = step_launches(model("triton", n_layer=2, path="unfused"))
    assert two.total < unfused.total, (two.by_name, unfused.by_name)


def test_launch_counter_counts_work_not_views():
    # A torch-only step: matmuls and elementwise ops count, views and allocations do not.
    x, w = torch.randn(2, 8), torch.randn(8, 8)

    def step():
        y = (x @ w).view(4, 4)[1:].unsqueeze(0)  # one mm, three views
        return torch.tanh(y + 1)  # two ops

    got = e2e.count_launches(step, torch.device("cpu"))
    assert got.total == 3 and got.by_name == {"aten::mm": 1, "aten::add": 1, "aten::tanh": 1}
