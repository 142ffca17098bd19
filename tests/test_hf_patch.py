"""gpt2fast.patch_hf on tiny transformers GPT-2 models (CPU; Triton under its interpreter).

Every parity test also counts the calls that reach the backend's op functions, so a test can never pass by
comparing an unpatched model with itself (the failure mode of Liger-Kernel issue #176).
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Mapping

import pytest
import torch

pytest.importorskip("transformers")
from transformers import GPT2Config, GPT2LMHeadModel, GPT2Model

from gpt2fast import ops
from gpt2fast.hf_patch import ATTN_IMPLEMENTATION, is_patched, patch_hf, unpatch_hf
from gpt2fast.testing import assert_fa_close
from gpt2fast.testing.conformance import count_dispatches

N_LAYER = 2
OPS = ("layer_norm", "bias_gelu", "attention", "decode_attention")


def _cpu_status(name: str) -> tuple[bool, str]:
    """Whether backend ``name`` runs CPU tensors here (Triton: under its interpreter), and why not."""
    try:
        status = ops.backend_status(name, "cpu")
    except Exception as exc:  # a backend still being written may not import cleanly
        return False, f"backend_status failed: {exc!r}"
    return status.available, status.reason


def _backend_param(name: str):
    ok, reason = _cpu_status(name)
    return pytest.param(name, marks=pytest.mark.skipif(not ok, reason=f"{name}: {reason}"))


BACKENDS = [_backend_param("reference"), _backend_param("triton")]


def tiny_config(**overrides) -> GPT2Config:
    """Two layers, head_dim 64 (GPT-2's), a vocab that is not a power of two; weights large enough that
    greedy decoding has clear winners instead of near-ties."""
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


def tiny_model(dtype: torch.dtype = torch.float32, device: str = "cpu", **overrides) -> GPT2LMHeadModel:
    """A deterministic tiny GPT2LMHeadModel in eval mode."""
    torch.manual_seed(0)
    return GPT2LMHeadModel(tiny_config(**overrides)).eval().to(device=device, dtype=dtype)


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


@pytest.fixture
def counts():
    """Count calls into every backend's op implementations: {op name: calls}."""
    ops.backend_names()  # load the built-in backends first, so their implementations are counted too
    with count_dispatches() as by_impl:
        yield OpCalls(by_impl)


def _greedy(model, ids, mask=None, n=6):
    mask = torch.ones_like(ids) if mask is None else mask
    with torch.no_grad():
        return model.generate(ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False)


def _ids(batch=2, t=7, vocab=97):
    return torch.randint(1, vocab, (batch, t), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("backend", BACKENDS)
def test_greedy_generate_token_identical_fp32(backend, counts):
    model = tiny_model()
    ids = _ids()
    n_new = 6
    expected = _greedy(model, ids, n=n_new)
    assert sum(counts.values()) == 0, "the unpatched model must not touch gpt2fast ops"
    assert len(set(expected[0, ids.shape[1] :].tolist())) > 1, "degenerate test model: pick another seed"

    patch_hf(model, backend=backend)
    got = _greedy(model, ids, n=n_new)
    assert torch.equal(got, expected)
    # one prefill + (n_new - 1) cached decode steps, every module through gpt2fast
    forwards = n_new
    assert counts["layer_norm"] == forwards * (2 * N_LAYER + 1)
    assert counts["bias_gelu"] == forwards * N_LAYER
    assert counts["attention"] == N_LAYER
    assert counts["decode_attention"] == (n_new - 1) * N_LAYER
    assert counts.backends == {backend}


def _check_low_precision(backend: str, dtype: torch.dtype, device: str, counts: dict) -> None:
    """Prefill logits and one cached decode step's logits of the patched model in ``dtype``, against the
    unpatched model in fp32 (reference) and in ``dtype`` (baseline), under the FlashAttention rule."""
    ids = _ids(batch=2, t=9).to(device)
    prompt, last = ids[:, :-1], ids[:, -1:]

    def run(model):
        with torch.no_grad():
            pre = model(prompt, use_cache=True)
            step = model(last, cache=pre.cache, use_cache=True)
        return pre.logits.float(), step.logits.float()

    ref32 = run(tiny_model(device=device))
    base = run(tiny_model(dtype, device))
    model = patch_hf(tiny_model(dtype, device), backend=backend)
    out = run(model)
    assert counts["attention"] == N_LAYER and counts["decode_attention"] == N_LAYER
    assert counts["layer_norm"] == 2 * (2 * N_LAYER + 1) and counts["bias_gelu"] == 2 * N_LAYER
    assert_fa_close(out[0], ref32[0], base[0], msg="prefill logits")
    assert_fa_close(out[1], ref32[1], base[1], msg="decode logits")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_logits_low_precision_within_fa_rule(backend, dtype, counts):
    _check_low_precision(backend, dtype, "cpu", counts)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["auto", "triton", "cuda"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_logits_low_precision_within_fa_rule_cuda(backend, dtype, counts):
    """The same check on a CUDA model (UNVERIFIED: never run in the session that wrote it)."""
    if backend != "auto" and not ops.backend_status(backend, "cuda").available:
        pytest.skip(f"{backend}: {ops.backend_status(backend, 'cuda').reason}")
    _check_low_precision(backend, dtype, "cuda", counts)


@pytest.mark.parametrize(
    "flags", [dict(scale_attn_by_inverse_layer_idx=True), dict(scale_attn_weights=False, reorder_and_upcast_attn=True)]
)
def test_attention_scaling_flags_are_honoured(flags, counts):
    """GPT-2's optional attention scalings reach gpt2fast's ``scale`` argument (prefill and decode)."""
    model = tiny_model(**flags)
    ids = _ids()
    expected = _greedy(model, ids)
    with torch.no_grad():
        ref = model(ids).logits
        patch_hf(model, backend="reference")
        got = model(ids).logits
    assert counts["attention"] == N_LAYER
    assert_fa_close(got, ref)
    assert torch.equal(_greedy(model, ids), expected)


def test_unpatch_restores_exactly(counts):
    model = tiny_model()
    ids = _ids()
    with torch.no_grad():
        before = model(ids).logits
    attn_impl = model.config._attn_implementation
    dicts = {name: set(m.__dict__) for name, m in model.named_modules()}

    patch_hf(model, backend="reference")
    assert is_patched(model) and model.config._attn_implementation == ATTN_IMPLEMENTATION
    with torch.no_grad():
        model(ids)
    assert counts["layer_norm"] > 0

    assert unpatch_hf(model) is True
    assert not is_patched(model)
    assert model.config._attn_implementation == attn_impl
    assert {name: set(m.__dict__) for name, m in model.named_modules()} == dicts
    frozen = dict(counts)
    with torch.no_grad():
        after = model(ids).logits
        _greedy(model, ids, n=3)
    assert counts == frozen, "an unpatched model must not call gpt2fast ops"
    assert torch.equal(after, before)
    assert unpatch_hf(model) is False  # nothing left to undo


def test_patch_twice_does_not_double_wrap(counts):
    model = tiny_model()
    patch_hf(model, backend="reference")
    ln_forward = model.transformer.ln_f.forward
    mlp_forward = model.transformer.h[0].mlp.forward
    patch_hf(model, backend="reference")
    assert model.transformer.ln_f.forward is ln_forward
    assert model.transformer.h[0].mlp.forward is mlp_forward
    with torch.no_grad():
        model(_ids())
    assert counts["layer_norm"] == 2 * N_LAYER + 1
    unpatch_hf(model)  # one unpatch undoes both patch calls
    assert "forward" not in model.transformer.ln_f.__dict__
    assert "forward" not in model.transformer.h[0].mlp.__dict__


def test_gpt2model_body_is_patched(counts):
    torch.manual_seed(0)
    body = GPT2Model(tiny_config()).eval()
    ids = _ids()
    with torch.no_grad():
        expected = body(ids).last_hidden_state
        patch_hf(body, backend="reference")
        got = body(ids).last_hidden_state
    assert counts["attention"] == N_LAYER and counts["bias_gelu"] == N_LAYER
    assert_fa_close(got, expected)
    unpatch_hf(body)


def test_left_padding_falls_back_for_attention_and_stays_exact(counts):
    """A padded batch materialises a mask: attention runs transformers' sdpa path (documented), the rest
    still runs on gpt2fast, and generation matches the unpatched model."""
    model = tiny_model()
    ids = _ids(batch=2, t=7)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # left padding on the second prompt
    ids[1, :3] = 0
    expected = _greedy(model, ids, mask)
    patch_hf(model, backend="reference")
    got = _greedy(model, ids, mask)
    assert torch.equal(got, expected)
    assert counts["attention"] == 0 and counts["decode_attention"] == 0
    assert counts["layer_norm"] > 0 and counts["bias_gelu"] > 0


def test_training_and_autograd_use_transformers_code(counts):
    model = patch_hf(tiny_model(), backend="reference")
    ids = _ids()
    loss = model(ids, labels=ids).loss  # eval mode, grad enabled: gradients are needed -> fallback
    loss.backward()
    assert model.transformer.wte.weight.grad is not None
    model.train()
    model(ids)
    assert sum(counts.values()) == 0


def test_float64_model_keeps_transformers_code(counts):
    """The ops take fp32/fp16/bf16 only: a patched fp64 model must still run (on transformers' code), exactly."""
    model = tiny_model(torch.float64)
    ids = _ids()
    with torch.no_grad():
        ref = model(ids).logits
        patch_hf(model, backend="reference")
        out = model(ids).logits
    assert torch.equal(out, ref)
    assert sum(counts.values()) == 0


def test_non_tanh_activation_keeps_transformers_mlp(counts):
    model = patch_hf(tiny_model(activation_function="gelu"), backend="reference")
    with torch.no_grad():
        model(_ids())
    assert counts["bias_gelu"] == 0 and counts["layer_norm"] == 2 * N_LAYER + 1


def test_bad_arguments_raise_clear_errors():
    with pytest.raises(TypeError, match="GPT2LMHeadModel or GPT2Model"):
        patch_hf(torch.nn.Linear(2, 2))
    with pytest.raises(TypeError, match="GPT2LMHeadModel or GPT2Model"):
        unpatch_hf(torch.nn.Linear(2, 2))
    model = tiny_model()
    with pytest.raises(ValueError, match="backend must be one of"):
        patch_hf(model, backend="fastest")
    with pytest.raises(ops.BackendUnavailableError, match="'cuda'"):
        patch_hf(model, backend="cuda")
    assert not is_patched(model)


@pytest.mark.parametrize("n_embd, d", [(16, 8), (32, 16)])
def test_named_backend_refuses_unsupported_head_dims_at_patch_time(n_embd, d, counts):
    """A head dim the triton kernels lack is refused by patch_hf (not by every later generate call); "auto"
    patches and generates, each op falling through per call."""
    ok, reason = _cpu_status("triton")
    if not ok:
        pytest.skip(f"triton: {reason}")
    model = tiny_model(n_embd=n_embd)
    with pytest.raises(ValueError, match=rf"backend 'triton' cannot run this model: .*got q with D={d}"):
        patch_hf(model, backend="triton")
    assert not is_patched(model)
    ids = _ids()
    expected = _greedy(model, ids)
    patch_hf(model, backend="auto")
    assert torch.equal(_greedy(model, ids), expected)
    assert counts["attention"] == N_LAYER and counts["decode_attention"] > 0
    with pytest.raises(ValueError, match=rf"backend 'triton' cannot run this model: .*got q with D={d}"):
        patch_hf(model, backend="triton")  # re-patching checks too, and keeps the backend it had
    assert model.__dict__["_gpt2fast_patch"].backend == "auto"


def test_backend_names_come_from_the_registry():
    model = tiny_model()
    with pytest.raises(ValueError, match=re.escape(str(("auto", *ops.backend_names())))):
        patch_hf(model, backend="fastest")
