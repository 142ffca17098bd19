"""gpt2fast.patch_hf on tiny transformers GPT-2 models, inference (CPU; Triton under its interpreter).

Every parity test also counts the calls that reach the backend's op functions, so a test can never pass by
comparing an unpatched model with itself (the failure mode of Liger-Kernel issue #176).
"""

from __future__ import annotations

import copy
import io
import re

import pytest
import torch

pytest.importorskip("transformers")
import transformers
from transformers import GPT2LMHeadModel, GPT2Model

import gpt2fast
from gpt2fast import hf_patch_stats, is_patched, ops, patch_hf, unpatch_hf
from gpt2fast.hf_patch import SUPPORTED_CLASSES
from gpt2fast.testing import assert_fa_close
from tests._hf import BACKENDS, N_LAYER, count_calls, cpu_status, greedy, ids, left_padded, tiny_config, tiny_model

LN_CALLS = 2 * N_LAYER + 1


@pytest.fixture
def counts():
    """{op name: calls that reached a backend's implementation} during the test."""
    yield from count_calls()


def _attention_routes(model) -> dict[str, int]:
    return hf_patch_stats(model).routes("attention")


@pytest.mark.parametrize("backend", BACKENDS)
def test_greedy_generate_token_identical_fp32(backend, counts):
    model = tiny_model()
    x = ids()
    n_new = 6
    expected = greedy(model, x, n=n_new)
    assert sum(counts.values()) == 0, "the unpatched model must not touch gpt2fast ops"
    assert len(set(expected[0, x.shape[1] :].tolist())) > 1, "degenerate test model: pick another seed"

    patch_hf(model, backend=backend)
    assert torch.equal(greedy(model, x, n=n_new), expected)
    # one prefill + (n_new - 1) cached decode steps, every module through gpt2fast
    assert counts["layer_norm"] == n_new * LN_CALLS
    assert counts["bias_gelu"] == n_new * N_LAYER
    assert counts["attention"] == N_LAYER
    assert counts["decode_attention"] == (n_new - 1) * N_LAYER
    assert counts.backends == {backend}
    assert hf_patch_stats(model).fallback() == 0


def _check_low_precision(backend: str, dtype: torch.dtype, device: str, counts) -> None:
    """Prefill logits and one cached decode step's logits of the patched model in ``dtype``, against the
    unpatched model in fp32 (reference) and in ``dtype`` (baseline), under the FlashAttention rule."""
    x = ids(batch=2, t=9).to(device)
    prompt, last = x[:, :-1], x[:, -1:]

    def run(model):
        with torch.no_grad():
            pre = model(prompt, use_cache=True)
            step = model(last, cache=pre.cache, use_cache=True)
        return pre.logits.float(), step.logits.float()

    ref32 = run(tiny_model(device=device))
    base = run(tiny_model(dtype, device))
    out = run(patch_hf(tiny_model(dtype, device), backend=backend))
    assert counts["attention"] == N_LAYER and counts["decode_attention"] == N_LAYER
    assert counts["layer_norm"] == 2 * LN_CALLS and counts["bias_gelu"] == 2 * N_LAYER
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
    x = ids()
    expected = greedy(model, x)
    with torch.no_grad():
        ref = model(x).logits
        patch_hf(model, backend="reference")
        got = model(x).logits
    assert counts["attention"] == N_LAYER
    assert_fa_close(got, ref)
    assert torch.equal(greedy(model, x), expected)


# ---- the fast path on padded batches, static caches, chunked prefill, no mask ------------------------------
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("cache", [None, "static"])
def test_left_padded_generate_reaches_the_kernels(attn, cache, counts):
    """A left-padded batch (dynamic or static cache) runs every attention call on gpt2fast, token-identical."""
    model = tiny_model(attn_implementation=attn)
    x, mask = left_padded()
    kw = {} if cache is None else dict(cache_implementation=cache)
    expected = greedy(model, x, mask, **kw)
    patch_hf(model, backend="reference")
    assert torch.equal(greedy(model, x, mask, **kw), expected)
    routes = _attention_routes(model)
    assert routes == {"gpt2fast.attention": N_LAYER, "gpt2fast.decode_attention": 5 * N_LAYER}, routes
    assert counts["attention"] == N_LAYER and counts["decode_attention"] == 5 * N_LAYER
    assert hf_patch_stats(model).fallback() == 0


def test_left_padded_forward_matches_on_unpadded_positions(counts):
    """Logits of a left-padded forward equal the unpatched model's wherever the mask is 1."""
    model = tiny_model()
    x, mask = left_padded()
    with torch.no_grad():
        ref = model(x, attention_mask=mask).logits
        got = patch_hf(model, backend="reference")(x, attention_mask=mask).logits
    keep = mask.bool()
    assert_fa_close(got[keep], ref[keep])
    assert _attention_routes(model) == {"gpt2fast.attention": N_LAYER}


def test_no_mask_forward_and_chunked_prefill_reach_the_kernels(counts):
    """A forward without a mask, then new tokens after a cache (chunked prefill), through the kernels."""
    model = tiny_model()
    x = ids(batch=2, t=9)
    with torch.no_grad():
        full = model(x).logits
        patch_hf(model, backend="reference")
        no_mask = model(x).logits
        first = model(x[:, :5], use_cache=True)
        rest = model(x[:, 5:], cache=first.cache, use_cache=True).logits
    assert_fa_close(no_mask, full)
    assert_fa_close(rest, full[:, 5:])
    routes = _attention_routes(model)
    assert routes == {"gpt2fast.attention": 2 * N_LAYER, "gpt2fast.decode_attention (chunked prefill)": N_LAYER}
    assert counts["decode_attention"] == N_LAYER


def test_mask_with_holes_falls_back_exactly(counts):
    model = tiny_model()
    x = ids()
    mask = torch.ones_like(x)
    mask[0, 3] = 0  # a hole: not padding
    with torch.no_grad():
        ref = model(x, attention_mask=mask).logits
        got = patch_hf(model, backend="reference")(x, attention_mask=mask).logits
    assert_fa_close(got, ref)
    assert counts["attention"] == 0 and counts["layer_norm"] == LN_CALLS
    assert hf_patch_stats(model).reasons() == {"attention_mask with holes (not one run of ones per row)": N_LAYER}


# ---- falling back to the configured implementation ---------------------------------------------------------
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_output_attentions_falls_back_to_the_configured_implementation(attn, counts):
    """``output_attentions=True`` returns what the unpatched model returns (eager: the weights), not ()."""
    model = tiny_model(attn_implementation=attn)
    x = ids()
    with torch.no_grad():
        ref = model(x, output_attentions=True)
        patch_hf(model, backend="reference")
        got = model(x, output_attentions=True)
    assert model.config._attn_implementation == attn
    assert len(got.attentions) == len(ref.attentions)
    if attn == "eager":
        assert len(ref.attentions) == N_LAYER
    for a, b in zip(got.attentions, ref.attentions):
        assert torch.equal(a, b)
    assert counts["attention"] == 0 and counts["layer_norm"] == LN_CALLS
    assert hf_patch_stats(model).reasons() == {"output_attentions=True": N_LAYER}


def test_eager_fallback_keeps_reorder_and_upcast_attn(counts):
    """An eager model's fallback runs eager's own reorder-and-upcast path: its attention weights are fp32-computed
    softmaxes, identical to the unpatched model's, even for an fp16 model."""
    model = tiny_model(torch.float16, attn_implementation="eager", reorder_and_upcast_attn=True)
    x = ids()
    with torch.no_grad():
        ref = model(x, output_attentions=True)
        patch_hf(model, backend="reference")
        got = model(x, output_attentions=True)
        fast = model(x).logits
    assert model.config._attn_implementation == "eager"
    assert len(got.attentions) == N_LAYER
    for a, b in zip(got.attentions, ref.attentions):
        assert a.dtype == torch.float16 and torch.equal(a, b)
    with torch.no_grad():
        ref32 = tiny_model(attn_implementation="eager", reorder_and_upcast_attn=True)(x).logits
    assert_fa_close(fast.float(), ref32, ref.logits.float())  # the fast path: gpt2fast attention, fp32 inside
    assert hf_patch_stats(model).routes("attention") == {
        "fallback: output_attentions=True": N_LAYER,
        "gpt2fast.attention": N_LAYER,
    }


def test_float64_model_keeps_transformers_code(counts):
    """The ops take fp32/fp16/bf16 only: a patched fp64 model must still run (on transformers' code), exactly."""
    model = tiny_model(torch.float64)
    x = ids()
    with torch.no_grad():
        ref = model(x).logits
        out = patch_hf(model, backend="reference")(x).logits
    assert torch.equal(out, ref)
    assert sum(counts.values()) == 0
    dtype = "dtype torch.float64"
    assert set(hf_patch_stats(model).reasons()) == {dtype, f"{dtype}/torch.float64/torch.float64"}


def test_non_tanh_activation_keeps_transformers_mlp(counts):
    model = patch_hf(tiny_model(activation_function="gelu"), backend="reference")
    with torch.no_grad():
        model(ids())
    assert counts["bias_gelu"] == 0 and counts["layer_norm"] == LN_CALLS
    assert hf_patch_stats(model).routes("mlp") == {"fallback: activation GELUActivation is not the tanh GELU": N_LAYER}


# ---- every head class --------------------------------------------------------------------------------------
HEADS = SUPPORTED_CLASSES  # every GPT-2 class of transformers


def _first_output(out) -> torch.Tensor:
    for name in ("logits", "last_hidden_state", "start_logits"):
        if getattr(out, name, None) is not None:
            return getattr(out, name)
    raise AssertionError(out)


@pytest.mark.parametrize("name", HEADS)
def test_every_head_class_runs_on_gpt2fast(name, counts):
    cls = getattr(transformers, name)
    model = tiny_model(cls=cls)
    x, mask = left_padded()
    with torch.no_grad():
        ref = _first_output(model(x, attention_mask=mask))
        patch_hf(model, backend="reference")
        assert is_patched(model) and type(model).__name__ == name
        got = _first_output(model(x, attention_mask=mask))
    keep = mask.bool()
    if ref.dim() == 2 and ref.shape[-1] != x.shape[-1]:  # sequence classification: one row per sequence
        keep = torch.ones(ref.shape[0], dtype=torch.bool)
    assert_fa_close(got[keep], ref[keep])
    assert counts["attention"] == N_LAYER and counts["layer_norm"] == LN_CALLS
    assert unpatch_hf(model) and not is_patched(model) and type(model) is cls


# ---- copies, pickles, state dicts, .to() -------------------------------------------------------------------
def test_deepcopy_is_independent_of_the_original(counts):
    model = patch_hf(tiny_model(), backend="reference")
    twin = copy.deepcopy(model)
    x = ids()
    with torch.no_grad():
        before = twin(x).logits
        model.transformer.h[0].mlp.c_fc.weight.add_(1.0)  # change only the original
        after = twin(x).logits
    assert torch.equal(before, after)
    assert is_patched(twin) and hf_patch_stats(twin) is not hf_patch_stats(model)
    twin(x).logits.sum().backward()  # gradients reach the copy's own parameters
    assert twin.transformer.h[0].mlp.c_fc.weight.grad is not None
    assert model.transformer.h[0].mlp.c_fc.weight.grad is None
    assert counts["bias_gelu"] > 0


def test_torch_save_and_load_of_the_whole_model(counts):
    model = patch_hf(tiny_model(), backend="reference")
    x = ids()
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    assert is_patched(loaded) and type(loaded) is type(model)
    calls = counts["attention"]
    with torch.no_grad():
        assert torch.equal(loaded(x).logits, model(x).logits)
    assert counts["attention"] == calls + 2 * N_LAYER


def test_state_dict_round_trip_and_to(counts):
    """A patched model's state dict is the unpatched one's (keys and values); ``.to()`` keeps the patch."""
    plain = tiny_model()
    patched = patch_hf(tiny_model(), backend="reference")
    sd = patched.state_dict()
    assert list(sd) == list(plain.state_dict())
    fresh = tiny_model(initializer_range=0.5)
    fresh.load_state_dict(sd)
    patched.load_state_dict(fresh.state_dict())
    x = ids()
    with torch.no_grad():
        assert_fa_close(patched(x).logits, fresh(x).logits)
        half = patched.to(torch.bfloat16)
        assert half is patched and is_patched(half)
        out = half(x).logits
    assert out.dtype == torch.bfloat16 and counts["attention"] == 2 * N_LAYER


def test_unpatch_restores_exactly(counts):
    model = tiny_model()
    x = ids()
    with torch.no_grad():
        before = model(x).logits
    attn_impl = model.config._attn_implementation
    classes = {name: type(m) for name, m in model.named_modules()}
    dicts = {name: set(m.__dict__) for name, m in model.named_modules()}

    patch_hf(model, backend="reference")
    assert is_patched(model) and model.config._attn_implementation == attn_impl
    with torch.no_grad():
        model(x)
    assert counts["layer_norm"] > 0

    assert unpatch_hf(model) is True
    assert not is_patched(model)
    assert model.config._attn_implementation == attn_impl
    assert {name: type(m) for name, m in model.named_modules()} == classes
    assert {name: set(m.__dict__) for name, m in model.named_modules()} == dicts
    frozen = dict(counts)
    with torch.no_grad():
        after = model(x).logits
        greedy(model, x, n=3)
    assert counts == frozen, "an unpatched model must not call gpt2fast ops"
    assert torch.equal(after, before)
    assert unpatch_hf(model) is False  # nothing left to undo


def test_patch_twice_updates_options_only(counts):
    model = patch_hf(tiny_model(), backend="reference")
    cls, stats = type(model.transformer.ln_f), hf_patch_stats(model)
    patch_hf(model, backend="auto", skip_logits=True)
    assert type(model.transformer.ln_f) is cls and hf_patch_stats(model) is stats
    assert model.transformer.ln_f._gpt2fast_options.backend == "auto"
    with torch.no_grad():
        model(ids())
    assert counts["layer_norm"] == LN_CALLS
    unpatch_hf(model)  # one unpatch undoes both patch calls
    assert type(model.transformer.ln_f) is torch.nn.LayerNorm


# ---- patching before the weights exist ---------------------------------------------------------------------
def test_meta_device_model_resolves_its_backend_at_first_call(counts):
    """``patch_hf(backend="triton")`` on a meta model: shapes are checked now, the device at the first call."""
    ok, reason = cpu_status("triton")
    if not ok:
        pytest.skip(f"triton: {reason}")
    with torch.device("meta"):
        model = GPT2LMHeadModel(tiny_config()).eval()
    patch_hf(model, backend="triton")
    model.to_empty(device="cpu")
    model.load_state_dict(tiny_model().state_dict())
    x = ids()
    with torch.no_grad():
        got = model(x).logits
        ref = tiny_model()(x).logits
    assert_fa_close(got, ref)
    assert counts.backends == {"triton"} and counts["attention"] == N_LAYER
    with torch.device("meta"):
        small = GPT2LMHeadModel(tiny_config(n_embd=32))
    with pytest.raises(ValueError, match=r"backend 'triton' cannot run this model: .*D=16"):
        patch_hf(small, backend="triton")  # the shapes are checked on meta too


def test_auto_patch_patches_from_pretrained(tmp_path, counts):
    source = tiny_model()
    source.save_pretrained(tmp_path)
    x = ids()
    with gpt2fast.auto_patch(backend="reference"):
        loaded = GPT2LMHeadModel.from_pretrained(tmp_path).eval()
        body = GPT2Model(source.config)
    assert is_patched(loaded) and is_patched(body)
    assert not is_patched(GPT2LMHeadModel(source.config))  # the hook is gone after the block
    with torch.no_grad():
        assert_fa_close(loaded(x).logits, source(x).logits)
    assert counts["attention"] == N_LAYER and hf_patch_stats(loaded).fallback() == 0


def test_named_backend_unavailable_on_first_call_device_raises():
    with torch.device("meta"):
        model = GPT2LMHeadModel(tiny_config()).eval()
    patch_hf(model, backend="cuda")  # meta: the device is not known yet
    model.to_empty(device="cpu")
    with pytest.raises(ops.BackendUnavailableError, match="backend 'cuda' cannot run this model's cpu tensors"):
        model(ids())


# ---- arguments ---------------------------------------------------------------------------------------------
def test_bad_arguments_raise_clear_errors():
    with pytest.raises(TypeError, match="GPT2LMHeadModel, GPT2Model, GPT2DoubleHeadsModel"):
        patch_hf(torch.nn.Linear(2, 2))
    with pytest.raises(TypeError, match="GPT2LMHeadModel"):
        unpatch_hf(torch.nn.Linear(2, 2))
    model = tiny_model()
    with pytest.raises(ValueError, match="backend must be one of"):
        patch_hf(model, backend="fastest")
    with pytest.raises(ops.BackendUnavailableError, match="'cuda'"):
        patch_hf(model, backend="cuda")
    with pytest.raises(TypeError, match="skip_logits"):
        patch_hf(model, skip_logits="yes")
    with pytest.raises(ValueError, match="is not patched"):
        hf_patch_stats(model)
    assert not is_patched(model)


@pytest.mark.parametrize("n_embd, d", [(16, 8), (32, 16)])
def test_named_backend_refuses_unsupported_head_dims_at_patch_time(n_embd, d, counts):
    """A head dim the triton kernels lack is refused by patch_hf (not by every later generate call); "auto"
    patches and generates, each op falling through per call."""
    ok, reason = cpu_status("triton")
    if not ok:
        pytest.skip(f"triton: {reason}")
    model = tiny_model(n_embd=n_embd)
    with pytest.raises(ValueError, match=rf"backend 'triton' cannot run this model: .*got q with D={d}"):
        patch_hf(model, backend="triton")
    assert not is_patched(model)
    x = ids()
    expected = greedy(model, x)
    patch_hf(model, backend="auto")
    assert torch.equal(greedy(model, x), expected)
    assert counts["attention"] == N_LAYER and counts["decode_attention"] > 0
    with pytest.raises(ValueError, match=rf"backend 'triton' cannot run this model: .*got q with D={d}"):
        patch_hf(model, backend="triton")  # re-patching checks too, and keeps the backend it had
    assert model.transformer.ln_f._gpt2fast_options.backend == "auto"


def test_backend_names_come_from_the_registry():
    model = tiny_model()
    with pytest.raises(ValueError, match=re.escape(str(("auto", *ops.backend_names())))):
        patch_hf(model, backend="fastest")
