"""generate / generate_stream against transformers' generate, ragged batches, EOS handling, seeding,
and argument validation."""

from __future__ import annotations

import pytest
import torch
from test_model_parity import pair, random_ids

from gpt2fast import generation

transformers = pytest.importorskip("transformers")


def _hf_generate(hf, ids, **kwargs):
    kwargs.setdefault("pad_token_id", 0)
    kwargs.setdefault("eos_token_id", None)
    kwargs.setdefault("attention_mask", torch.ones_like(ids))  # else transformers masks every pad id it sees
    with torch.no_grad():
        return hf.generate(ids, do_sample=False, **kwargs)


@pytest.mark.parametrize("name", ["h3_v101", "h4_v257_inner"])
@pytest.mark.parametrize("B,T", [(1, 1), (3, 6)])
def test_greedy_matches_transformers(name, B, T):
    hf, model = pair(name)
    ids = random_ids(model.config.vocab_size, (B, T))
    out = model.generate(ids, max_new_tokens=12)
    assert torch.equal(out, _hf_generate(hf, ids, max_new_tokens=12))


@pytest.mark.parametrize(
    "knobs",
    [dict(repetition_penalty=1.5), dict(no_repeat_ngram_size=2), dict(repetition_penalty=0.7, no_repeat_ngram_size=3)],
)
def test_greedy_with_history_knobs_matches_transformers(knobs):
    hf, model = pair("h1_v64")  # a weak model repeats itself, so the knobs change the output
    ids = random_ids(64, (2, 5))
    out = model.generate(ids, max_new_tokens=16, **knobs)
    assert torch.equal(out, _hf_generate(hf, ids, max_new_tokens=16, **knobs))
    assert not torch.equal(out, model.generate(ids, max_new_tokens=16))


def test_eos_stops_each_sequence_and_pads_like_transformers():
    hf, model = pair("h3_v101")
    ids = random_ids(101, (3, 4))
    free = model.generate(ids, max_new_tokens=14)
    eos = int(free[0, 4 + 2])  # sequence 0 emits this by its 3rd step
    first = free[0, 4:].tolist().index(eos)
    for pad in (None, 7):
        out = model.generate(ids, max_new_tokens=14, eos_token_id=eos, pad_token_id=pad)
        ref = _hf_generate(hf, ids, max_new_tokens=14, eos_token_id=eos, pad_token_id=eos if pad is None else pad)
        assert torch.equal(out, ref)
        pad_id = eos if pad is None else pad
        row = out[0, 4:].tolist()
        assert row[: first + 1] == free[0, 4 : 5 + first].tolist()
        assert row[first + 1 :] and all(t == pad_id for t in row[first + 1 :])


def test_output_is_trimmed_when_every_sequence_finishes():
    _, model = pair("h3_v101")
    ids = random_ids(101, (2, 3))
    free = model.generate(ids, max_new_tokens=20)
    new = free[:, 3:]
    eos = [int(new[0, 1]), int(new[1, 2])]  # an eos list: one id per sequence, hit early
    out = model.generate(ids, max_new_tokens=20, eos_token_id=eos, pad_token_id=0)
    first = [min(i for i, t in enumerate(new[b].tolist()) if t in eos) for b in range(2)]
    assert out.shape[1] == 3 + max(first) + 1
    for b in range(2):
        assert torch.equal(out[b, : 3 + first[b] + 1], free[b, : 3 + first[b] + 1])


def test_left_padded_batch_equals_per_sequence_runs():
    hf, model = pair("h4_v257_inner")
    lengths = [5, 2, 7, 1]
    prompts = [random_ids(257, (1, n), seed=n) for n in lengths]
    T = max(lengths)
    ids = torch.full((4, T), 3)
    mask = torch.zeros(4, T, dtype=torch.long)
    for b, (p, n) in enumerate(zip(prompts, lengths)):
        ids[b, T - n :], mask[b, T - n :] = p[0], 1
    knobs = dict(max_new_tokens=9, repetition_penalty=1.2, no_repeat_ngram_size=2)
    out = model.generate(ids, attention_mask=mask, **knobs)
    assert torch.equal(out[:, :T], ids)
    for b, p in enumerate(prompts):
        single = model.generate(p, **knobs)
        assert torch.equal(out[b, T:], single[0, p.shape[1] :]), b
    plain = model.generate(ids, attention_mask=mask, max_new_tokens=9)
    assert torch.equal(plain, _hf_generate(hf, ids, attention_mask=mask, max_new_tokens=9))


def test_stream_yields_the_same_tokens():
    _, model = pair("h3_v101")
    ids = random_ids(101, (2, 4))
    out = model.generate(ids, max_new_tokens=10, do_sample=True, generator=torch.Generator().manual_seed(5))
    steps = list(
        model.generate_stream(ids, max_new_tokens=10, do_sample=True, generator=torch.Generator().manual_seed(5))
    )
    assert len(steps) == 10 and all(s.shape == (2,) for s in steps)
    assert torch.equal(torch.stack(steps, 1), out[:, 4:])
    eos = int(out[0, 4])
    assert len(list(model.generate_stream(ids[:1], max_new_tokens=10, eos_token_id=eos, do_sample=True,
                                          generator=torch.Generator().manual_seed(5)))) == 1  # fmt: skip


def test_seeded_sampling_is_reproducible():
    _, model = pair("h3_v101")
    ids = random_ids(101, (3, 4))
    knobs = dict(max_new_tokens=16, do_sample=True, temperature=1.5, top_k=20, top_p=0.95)
    a = model.generate(ids, generator=torch.Generator().manual_seed(11), **knobs)
    b = model.generate(ids, generator=torch.Generator().manual_seed(11), **knobs)
    c = model.generate(ids, generator=torch.Generator().manual_seed(12), **knobs)
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_top_k_one_sampling_is_greedy():
    _, model = pair("h3_v101")
    ids = random_ids(101, (2, 4))
    sampled = model.generate(ids, max_new_tokens=8, do_sample=True, top_k=1, generator=torch.Generator().manual_seed(0))
    assert torch.equal(sampled, model.generate(ids, max_new_tokens=8))


def test_use_cuda_graph_needs_cuda_and_cpu_gets_the_eager_step():
    _, model = pair("h3_v101")
    ids = random_ids(101, (1, 2))
    with pytest.raises(ValueError, match="use_cuda_graph"):
        model.generate(ids, use_cuda_graph=True)
    history = generation.TokenHistory.from_prompts(ids, torch.tensor([2]), max_len=4)
    state = generation.DecodeState(generation.SamplingConfig(), history, None, 0, None)
    model.setup_cache(1, 4)
    first = state.select(model.prefill(ids))
    step = generation.make_step(model, state, use_cuda_graph=None)
    assert step.__name__ == "eager_step"
    second = step(first)
    assert torch.equal(torch.cat([ids[0], first, second]), model.generate(ids, max_new_tokens=2)[0])


def test_boundaries_and_int32_ids():
    hf, model = pair("h3_v101")
    ids = random_ids(101, (2, 3))
    full = model.generate(ids, max_new_tokens=45)  # prompt + new == n_positions
    assert full.shape == (2, 48) and torch.equal(full, _hf_generate(hf, ids, max_new_tokens=45))
    one = model.generate(ids.int(), max_new_tokens=1)
    assert one.dtype == torch.int32 and torch.equal(one.long(), full[:, :4])


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_generator_on_another_gpu_is_refused():
    _, model = pair("h3_v101")
    model = model.to("cuda:1")
    ids = random_ids(101, (1, 3)).to("cuda:1")
    with pytest.raises(ValueError, match="generator is on cuda:0"):
        model.generate(ids, do_sample=True, generator=torch.Generator("cuda:0"))


@pytest.mark.parametrize(
    "kwargs, err, match",
    [
        (dict(input_ids=torch.zeros(1, 3)), TypeError, "integer"),
        (dict(input_ids=torch.tensor([[1, 101]])), ValueError, "vocabulary"),
        (dict(max_new_tokens=46), ValueError, "n_positions"),
        (dict(max_new_tokens=0), ValueError, "max_new_tokens"),
        (dict(max_new_tokens=2.0), TypeError, "max_new_tokens"),
        (dict(do_sample=True, temperature=0.0), ValueError, "temperature"),
        (dict(top_p=0.0), ValueError, "top_p"),
        (dict(top_p=1.01), ValueError, "top_p"),
        (dict(top_k=-1), ValueError, "top_k"),
        (dict(repetition_penalty=0.0), ValueError, "repetition_penalty"),
        (dict(no_repeat_ngram_size=-1), ValueError, "no_repeat_ngram_size"),
        (dict(attention_mask=torch.ones(2, 3)), ValueError, "attention_mask"),
        (dict(attention_mask=torch.ones(1, 3)), TypeError, "attention_mask"),
        (dict(attention_mask=torch.tensor([[1, 1, 0]])), ValueError, "left-padded"),
        (dict(attention_mask=torch.tensor([[0, 0, 0]])), ValueError, "attention_mask"),
        (dict(attention_mask=torch.tensor([[0, 2, 1]])), ValueError, "0 and 1"),
        (dict(eos_token_id=101), ValueError, "eos_token_id"),
        (dict(eos_token_id=[3, -1]), ValueError, "eos_token_id"),
        (dict(pad_token_id=-1), ValueError, "pad_token_id"),
        (dict(generator=3), TypeError, "generator"),
        (dict(bogus_knob=1), TypeError, "bogus_knob"),
    ],
)
def test_bad_arguments_raise_before_any_work(kwargs, err, match):
    _, model = pair("h3_v101")
    ids = random_ids(101, (2, 3))
    before = model.generate(ids, max_new_tokens=4)
    cache = model.cache
    saved = (cache.k.clone(), cache.seqlens.clone())
    call = {"input_ids": random_ids(101, (1, 3)), **kwargs}
    with pytest.raises(err, match=match):
        model.generate(**call)
    with pytest.raises(err, match=match):
        model.generate_stream(**call)  # validated at the call, not at the first next()
    assert model.cache is cache and torch.equal(cache.k, saved[0]) and torch.equal(cache.seqlens, saved[1])
    assert torch.equal(model.generate(ids, max_new_tokens=4), before)
