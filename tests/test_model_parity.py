"""GPT2 logits against transformers' GPT2LMHeadModel on tiny random configs, the KV-cache paths
against the full forward, and the model's input checks.

The helpers here (``TINY_CONFIGS``, ``hf_model``, ``pair``) are shared by the other model tests.
"""

from __future__ import annotations

import pytest
import torch

from gpt2fast import GPT2
from gpt2fast.testing import assert_fa_close

transformers = pytest.importorskip("transformers")

#: Small shapes that still exercise the odd cases: 1 and 3 heads, a vocab that is not a multiple of 64,
#: n_positions < 100, an explicit MLP width.
TINY_CONFIGS = {
    "h3_v101": dict(vocab_size=101, n_positions=48, n_embd=48, n_layer=2, n_head=3),
    "h1_v64": dict(vocab_size=64, n_positions=32, n_embd=16, n_layer=1, n_head=1),
    "h4_v257_inner": dict(vocab_size=257, n_positions=96, n_embd=64, n_layer=3, n_head=4, n_inner=80),
}


def hf_model(name: str | dict = "h3_v101", seed: int = 0, attn_implementation: str = "eager", **overrides):
    """A transformers GPT2LMHeadModel (fp32, eager attention by default) of a ``TINY_CONFIGS`` name or a config
    dict, whose every parameter is random, including biases and LayerNorm weights, so a mis-mapped tensor cannot
    go unnoticed."""
    kw = dict(TINY_CONFIGS[name] if isinstance(name, str) else name, bos_token_id=0, eos_token_id=0, **overrides)
    cfg = transformers.GPT2Config(**kw, attn_implementation=attn_implementation)
    torch.manual_seed(seed)
    model = transformers.GPT2LMHeadModel(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    model.generation_config.eos_token_id = None  # tests pass EOS explicitly
    return model


def pair(name: str = "h3_v101", seed: int = 0, dtype: torch.dtype | None = None):
    """``(transformers model, gpt2fast copy)`` on CPU with the reference backend."""
    hf = hf_model(name, seed)
    return hf, GPT2.from_hf(hf, dtype=dtype, backend="reference")


def random_ids(vocab: int, shape: tuple[int, ...], seed: int = 1) -> torch.Tensor:
    """Reproducible random token ids."""
    return torch.randint(0, vocab, shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", list(TINY_CONFIGS))
@pytest.mark.parametrize("B,T", [(1, 1), (2, 7), (3, 17)])
def test_fp32_logits_match_transformers(name, B, T):
    hf, model = pair(name)
    ids = random_ids(model.config.vocab_size, (B, T))
    with torch.no_grad():
        ref = hf(ids).logits
        out = model(ids)
    assert out.shape == ref.shape
    assert (out - ref).abs().max().item() <= 1e-4


def test_full_context_logits_match_transformers():
    hf, model = pair("h1_v64")
    ids = random_ids(64, (2, model.config.n_positions))
    with torch.no_grad():
        assert (model(ids) - hf(ids).logits).abs().max().item() <= 1e-4


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("name", ["h3_v101", "h4_v257_inner"])
def test_low_precision_logits_fa_rule(name, dtype):
    hf, model = pair(name, dtype=dtype)
    ids = random_ids(model.config.vocab_size, (2, 11))
    with torch.no_grad():
        ref32 = hf(ids).logits
        base = hf.to(dtype)(ids).logits
        out = model(ids)
    assert out.dtype == dtype
    assert_fa_close(out, ref32, base, msg=f"{name} logits")


def test_decode_steps_equal_full_forward():
    _, model = pair("h4_v257_inner")
    ids = random_ids(257, (2, 12))
    with torch.no_grad():
        full = model(ids)
    model.setup_cache(2, 12)
    logits = [model.prefill(ids[:, :5])]
    logits += [model.decode_step(ids[:, t]) for t in range(5, 12)]
    assert model.cache.seqlens.tolist() == [12, 12]
    stepped = torch.stack(logits, dim=1)
    assert (stepped[:, :-1] - full[:, 4:-1]).abs().max().item() <= 1e-4
    assert (stepped[:, -1] - full[:, -1]).abs().max().item() <= 1e-4


def test_ragged_prefill_then_decode_equals_per_sequence_forward():
    _, model = pair("h3_v101")
    lengths = [3, 9, 1]
    seqs = [random_ids(101, (1, n + 2), seed=n) for n in lengths]  # each prompt plus two decoded tokens
    prompts = torch.zeros(3, max(lengths), dtype=torch.long)
    for b, n in enumerate(lengths):
        prompts[b, :n] = seqs[b][0, :n]
    model.setup_cache(3, max(lengths) + 2)
    first = model.prefill(prompts, torch.tensor(lengths))
    second = model.decode_step(torch.stack([s[0, n] for s, n in zip(seqs, lengths)]))
    third = model.decode_step(torch.stack([s[0, n + 1] for s, n in zip(seqs, lengths)]))
    for b, n in enumerate(lengths):
        with torch.no_grad():
            full = model(seqs[b])[0]
        for got, pos in ((first, n - 1), (second, n), (third, n + 1)):
            assert (got[b] - full[pos]).abs().max().item() <= 1e-4, (b, pos)


def test_decode_step_fp16_fa_rule():
    hf, model = pair("h3_v101", dtype=torch.float16)
    ids = random_ids(101, (2, 6))
    with torch.no_grad():
        ref32 = hf(ids).logits[:, -1]
        base = hf.to(torch.float16)(ids).logits[:, -1]
    model.setup_cache(2, 6)
    model.prefill(ids[:, :5])
    assert_fa_close(model.decode_step(ids[:, 5]), ref32, base, msg="decode step")


@pytest.mark.parametrize(
    "ids, err, match",
    [
        (torch.zeros(1, 3), TypeError, "integer"),
        (torch.zeros(1, 3, dtype=torch.bool), TypeError, "integer"),
        ([[1, 2]], TypeError, "torch.Tensor"),
        (torch.tensor([[1, 101]]), ValueError, "outside the vocabulary"),
        (torch.tensor([[-1, 3]]), ValueError, "outside the vocabulary"),
        (torch.tensor([1, 2]), ValueError, "2-D"),
        (torch.zeros(1, 0, dtype=torch.long), ValueError, "empty"),
        (torch.zeros(1, 49, dtype=torch.long), ValueError, "n_positions"),
    ],
)
def test_forward_rejects_bad_ids(ids, err, match):
    _, model = pair("h3_v101")
    good = random_ids(101, (1, 4))
    before = model(good)
    with pytest.raises(err, match=match):
        model(ids)
    assert torch.equal(model(good), before)


def test_prefill_and_cache_errors():
    _, model = pair("h3_v101")
    ids = random_ids(101, (2, 4))
    with pytest.raises(RuntimeError, match="setup_cache"):
        model.prefill(ids)
    with pytest.raises(RuntimeError, match="setup_cache"):
        model.decode_step(ids[:, 0])
    with pytest.raises(ValueError, match="max_len"):
        model.setup_cache(2, 49)
    with pytest.raises(ValueError, match="batch_size"):
        model.setup_cache(0, 8)
    model.setup_cache(2, 3)
    with pytest.raises(ValueError, match="max_len"):
        model.prefill(ids)
    model.setup_cache(2, 8)
    with pytest.raises(ValueError, match="lengths"):
        model.prefill(ids, torch.tensor([0, 4]))
    with pytest.raises(ValueError, match="lengths"):
        model.prefill(ids, torch.tensor([5, 4]))
    model.prefill(ids)
    for bad in (ids[:1, 0], ids[:, :1], ids[:, 0].float()):
        with pytest.raises(ValueError, match=r"tokens must be integer ids \[2\]"):
            model.decode_step(bad)
    assert model.cache.seqlens.tolist() == [4, 4]


def test_decode_step_refuses_a_full_cache_without_touching_it():
    """The host-side bound stops an overflowing append before any op runs; the cache is unchanged."""
    _, model = pair("h3_v101")
    ids = random_ids(101, (2, 4))
    model.setup_cache(2, 5)
    model.prefill(ids, torch.tensor([4, 2]))
    model.decode_step(ids[:, 0])  # the longer sequence now fills all 5 positions
    k_before = model.cache.k.clone()
    with pytest.raises(ValueError, match="KV cache is full"):
        model.decode_step(ids[:, 1])
    assert model.cache.seqlens.tolist() == [5, 3]
    assert torch.equal(model.cache.k, k_before)


def test_prefill_lengths_setup_cache_and_decode_ids_are_checked():
    """Wrongly shaped or typed prefill lengths, non-int cache sizes and out-of-vocab decode ids are refused
    before the model runs, and the cache is untouched."""
    _, model = pair("h3_v101")
    ids = random_ids(101, (2, 4))
    with pytest.raises(TypeError, match="batch_size must be an int"):
        model.setup_cache(2.5, 8)
    with pytest.raises(TypeError, match="max_len must be an int"):
        model.setup_cache(2, 8.0)
    model.setup_cache(2, 8)
    for bad in (torch.tensor([3]), torch.tensor([3, 4, 4]), torch.tensor([2.7, 3.0]), [3, 4]):
        with pytest.raises(ValueError, match=r"lengths must be an integer tensor of shape \[2\]"):
            model.prefill(ids, bad)
    assert model.cache.seqlens.tolist() == [0, 0] and not model.cache.k.any()
    model.prefill(ids)
    for bad in (torch.tensor([5, 101]), torch.tensor([-1, 3])):
        with pytest.raises(ValueError, match=r"outside the vocabulary \[0, 101\)"):
            model.decode_step(bad)
    assert model.cache.seqlens.tolist() == [4, 4]


def test_one_token_prefill_into_a_used_cache_starts_at_position_0():
    """A 1-token prompt takes the decode path (one token with a cache); prefill still writes it at position 0,
    even into a cache that a longer prompt filled before."""
    _, model = pair("h3_v101")
    ids = random_ids(101, (2, 6))
    model.setup_cache(2, 8)
    model.prefill(ids[:, :5])
    model.decode_step(ids[:, 5])
    first = model.prefill(ids[:, :1])
    assert model.cache.seqlens.tolist() == [1, 1] and model.cache.host_max == 1
    second = model.decode_step(ids[:, 1])
    with torch.no_grad():
        full = model(ids[:, :2])
    assert (first - full[:, 0]).abs().max().item() <= 1e-4
    assert (second - full[:, 1]).abs().max().item() <= 1e-4


def test_the_cache_and_the_input_length_pick_the_attention_op():
    """No cache: causal attention; a cache and several tokens (prefill): attention; a cache and one token
    (decode): decode_attention.  Every LayerNorm and MLP runs through the ops too."""
    from gpt2fast.testing.conformance import count_dispatches

    _, model = pair("h3_v101")
    L = model.config.n_layer
    ids = random_ids(101, (2, 4))
    model.setup_cache(2, 8)
    runs = {
        "forward": (lambda: model(ids), "attention"),
        "prefill": (lambda: model.prefill(ids), "attention"),
        "decode": (lambda: model.decode_step(ids[:, 0]), "decode_attention"),
    }
    for name, (run, attention_op) in runs.items():
        with count_dispatches() as counts:
            run()
        expected = {("layer_norm", "reference"): 2 * L + 1, ("bias_gelu", "reference"): L}
        expected[(attention_op, "reference")] = L
        assert dict(counts) == expected, name


# ---- the backend, checked against the model's shapes up front ------------------------------------------------

#: Head dims 8 and 16: no built-in kernel is compiled for them.
SMALL_HEADS = {8: dict(vocab_size=64, n_positions=32, n_embd=16, n_layer=1, n_head=2),
               16: dict(vocab_size=64, n_positions=32, n_embd=32, n_layer=1, n_head=2)}  # fmt: skip
#: What each built-in named backend says about such a head dim.
HEAD_DIM_REASONS = {
    "triton": r"triton attention supports head dims \(32, 64, 128\); got q with D={d}",
    "cuda": r"cuda backend: head dim D = {d} is not supported",
}


def _implements(backend: str) -> bool:
    from gpt2fast import ops

    return ("attention", backend) in {(r.op, r.backend) for r in ops.implementations("cpu")}


@pytest.mark.parametrize("d", list(SMALL_HEADS))
@pytest.mark.parametrize("backend", list(HEAD_DIM_REASONS))
def test_named_backend_refuses_unsupported_head_dims_up_front(backend, d):
    """Not just at the first op call: construction, random/from_hf/from_pretrained and the setter refuse."""
    if not _implements(backend):
        pytest.skip(f"the {backend} backend did not register its ops here")
    from gpt2fast import GPT2Config

    config = GPT2Config(**SMALL_HEADS[d])
    match = rf"backend '{backend}' cannot run this model: " + HEAD_DIM_REASONS[backend].format(d=d)
    with pytest.raises(ValueError, match=match):
        GPT2(config, backend=backend)
    with pytest.raises(ValueError, match=match):
        GPT2.random(config, backend=backend)
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(**SMALL_HEADS[d])).eval()
    with pytest.raises(ValueError, match=match):
        GPT2.from_hf(hf, backend=backend)
    model = GPT2.random(config, backend="reference")
    with pytest.raises(ValueError, match=match):
        model.backend = backend
    assert model.backend == "reference"
    assert {m.backend for m in model.modules() if hasattr(m, "backend")} == {"reference"}


def test_from_pretrained_refuses_an_unsupported_backend(tmp_path):
    if not _implements("triton"):
        pytest.skip("the triton backend did not register its ops here")
    from gpt2fast import GPT2Config

    GPT2.random(GPT2Config(**SMALL_HEADS[8])).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="backend 'triton' cannot run this model: triton attention"):
        GPT2.from_pretrained(tmp_path, backend="triton", quiet=True)


@pytest.mark.parametrize("d", list(SMALL_HEADS))
def test_auto_backend_runs_small_head_dims(d):
    """ "auto" never refuses: each op falls through per call (to reference for head dim 8/16)."""
    from gpt2fast import GPT2Config

    config = GPT2Config(**SMALL_HEADS[d])
    auto = GPT2.random(config, seed=2, backend="auto")
    ref = GPT2.random(config, seed=2, backend="reference")
    ids = random_ids(64, (2, 5))
    assert torch.equal(auto.generate(ids, max_new_tokens=4), ref.generate(ids, max_new_tokens=4))
    auto.backend = None
    assert auto.backend is None


def test_unknown_or_mistyped_backend_is_refused():
    from gpt2fast import GPT2Config

    config = GPT2Config(**TINY_CONFIGS["h1_v64"])
    with pytest.raises(ValueError, match=r"unknown backend 'fastest'; choose one of \("):
        GPT2(config, backend="fastest")
    with pytest.raises(TypeError, match="backend must be a str or None, got 3"):
        GPT2(config, backend=3)
