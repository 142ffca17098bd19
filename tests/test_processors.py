"""The processors and knobs added for transformers parity: min_new_tokens, min_length, an EOS list, bad_words_ids,
min_p, typical_p, stop_strings, generation_config= and num_return_sequences; greedy generation token-identical
to transformers, the warpers equal to transformers' on the same logits, and every refused knob named."""

from __future__ import annotations

import json

import pytest
import torch
from test_generation import _hf_generate
from test_model_parity import pair, random_ids
from test_sampling import B, V, _history, _logits, _per_row

from gpt2fast import GPT2, Tokenizer
from gpt2fast.sampling import LogitRules, SamplingConfig, TokenHistory, apply_min_p, apply_typical_p, process_logits
from gpt2fast.stopping import StopStrings

transformers = pytest.importorskip("transformers")
lp = pytest.importorskip("transformers.generation.logits_process")


# ---- the warpers on the same logits --------------------------------------------------------------------------
def _with_filtered(logits: torch.Tensor) -> torch.Tensor:
    """Logits where earlier processors already removed some tokens (-inf), as in a real chain."""
    out = logits.clone()
    out[0, :5] = float("-inf")
    out[2, 10:30] = float("-inf")
    return out


@pytest.mark.parametrize("p", [0.0, 0.05, 0.3, 0.9, 1.0])
def test_min_p_matches_transformers(p):
    for logits in (_logits(), _with_filtered(_logits(1))):
        assert torch.equal(apply_min_p(logits, p), lp.MinPLogitsWarper(p)(None, logits.clone()))


@pytest.mark.parametrize("mass", [1e-3, 0.2, 0.5, 0.95])
def test_typical_p_matches_transformers(mass):
    for logits in (_logits(), _with_filtered(_logits(2))):
        expected = lp.TypicalLogitsWarper(mass)(None, logits.clone())
        got = apply_typical_p(logits, mass)
        assert torch.equal(got, expected)
        assert torch.isfinite(got).sum(-1).min() >= 1


def test_the_full_sampling_chain_matches_transformers():
    h, logits = _history(vocab=4), _logits()
    eos = [3, 7]
    cfg = SamplingConfig(do_sample=True, temperature=0.8, top_k=20, top_p=0.95, min_p=0.05, typical_p=0.9,
                         repetition_penalty=1.2, no_repeat_ngram_size=2, bad_words_ids=[[5], [1, 2], [0, 0, 3]],
                         min_new_tokens=20)  # fmt: skip
    chain = lp.LogitsProcessorList([
        lp.RepetitionPenaltyLogitsProcessor(1.2), lp.NoRepeatNGramLogitsProcessor(2),
        lp.NoBadWordsLogitsProcessor([[5], [1, 2], [0, 0, 3]], eos),
        lp.MinNewTokensLengthLogitsProcessor(0, 20, eos), lp.TemperatureLogitsWarper(0.8), lp.TopKLogitsWarper(20),
        lp.TopPLogitsWarper(0.95), lp.MinPLogitsWarper(0.05), lp.TypicalLogitsWarper(0.9),
    ])  # fmt: skip
    rules = LogitRules(cfg, eos, V, prompt_width=0, device=torch.device("cpu"))
    h0 = TokenHistory(h.tokens, h.lengths, torch.zeros(B, dtype=torch.long))  # every token counts as new
    expected = _per_row(chain, h, logits)
    got = process_logits(logits, h0, cfg, rules)
    assert torch.equal(torch.isinf(got), torch.isinf(expected))
    assert torch.allclose(got, expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_bad_words_match_transformers(seed):
    h, logits = _history(vocab=3, seed=seed), _logits(seed)
    words = [[1], [0, 2], [2, 2], [1, 0, 1], [4, 4, 4, 4, 4]]  # the last never matches; eos-only words are dropped
    eos = [2]
    rules = LogitRules(SamplingConfig(bad_words_ids=[*words, [2]]), eos, V, 0, torch.device("cpu"))
    expected = _per_row(lp.NoBadWordsLogitsProcessor([*words, [2]], eos), h, logits)
    got = process_logits(logits, h, SamplingConfig(bad_words_ids=words), rules)
    assert torch.equal(got, expected)
    assert not rules.bad_single[2] and rules.bad_single[1], "[2] is the EOS id alone: transformers does not ban it"


@pytest.mark.parametrize("min_new, min_len, width", [(3, 0, 5), (0, 9, 5), (4, 12, 5), (2, 0, 0)])
def test_min_length_processors_match_transformers(min_new, min_len, width):
    """Rows with 0..n new tokens (the history's start marks the prompt); the prompt is ``width`` wide."""
    logits = _logits()
    tokens = torch.randint(0, 6, (B, 16), generator=torch.Generator().manual_seed(3))
    cfg = SamplingConfig(min_new_tokens=min_new, min_length=min_len)
    eos = [4, 9]
    rules = LogitRules(cfg, eos, V, width, torch.device("cpu"))
    for new in range(6):
        h = TokenHistory(tokens, torch.full((B,), width + new), torch.full((B,), width))
        ids = tokens[:, : width + new]
        expected = lp.MinNewTokensLengthLogitsProcessor(width, min_new, eos)(ids, logits.clone())
        expected = lp.MinLengthLogitsProcessor(min_len, eos)(ids, expected)
        assert torch.equal(process_logits(logits, h, cfg, rules), expected), new


def test_new_processors_have_no_host_sync():
    meta = torch.device("meta")
    h = TokenHistory(torch.empty(B, 16, dtype=torch.long, device=meta), torch.empty(B, dtype=torch.long, device=meta))
    cfg = SamplingConfig(do_sample=True, min_p=0.1, typical_p=0.8, bad_words_ids=[[1], [2, 3]], min_new_tokens=3)
    rules = LogitRules(cfg, [4], V, 3, meta)
    assert process_logits(torch.empty(B, V, device=meta), h, cfg, rules).shape == (B, V)


# ---- greedy generation against transformers -----------------------------------------------------------------
def _free(model, ids, n=14):
    return model.generate(ids, max_new_tokens=n)[:, ids.shape[1] :]


@pytest.mark.parametrize(
    "case",
    ["min_new_tokens", "min_length", "eos_list", "bad_words", "warpers_ignored_in_greedy", "all_at_once"],
)
def test_greedy_matches_transformers(case):
    hf, model = pair("h1_v64")
    ids = random_ids(64, (3, 4), seed=5)
    free = _free(model, ids)
    eos_early = int(free[0, 1])  # prompt 0 emits it at its 2nd step
    kw = dict(max_new_tokens=14, pad_token_id=0)
    if case == "min_new_tokens":
        kw.update(eos_token_id=eos_early, min_new_tokens=5)
    elif case == "min_length":
        kw.update(eos_token_id=eos_early, min_length=ids.shape[1] + 6)
    elif case == "eos_list":
        kw.update(eos_token_id=[int(free[1, 3]), eos_early, int(free[2, 0])])
    elif case == "bad_words":
        kw.update(bad_words_ids=[[int(free[0, 0])], [int(free[1, 2]), int(free[1, 3])], [int(free[2, 4])]])
    elif case == "warpers_ignored_in_greedy":
        kw.update(min_p=0.9, typical_p=0.1)
    else:
        kw.update(eos_token_id=[eos_early, 3], min_new_tokens=3, bad_words_ids=[[int(free[1, 0])]],
                  repetition_penalty=1.3, no_repeat_ngram_size=3)  # fmt: skip
    out = model.generate(ids, **kw)
    assert torch.equal(out, _hf_generate(hf, ids, **kw))
    if case != "warpers_ignored_in_greedy":
        assert not torch.equal(out[:, ids.shape[1] :], free[:, : out.shape[1] - ids.shape[1]]), "the knob mattered"


def test_generation_config_is_read_and_keywords_win():
    hf, model = pair("h1_v64")
    ids = random_ids(64, (2, 4), seed=5)
    eos = int(_free(model, ids)[0, 1])
    cfg = transformers.GenerationConfig(max_new_tokens=11, eos_token_id=eos, pad_token_id=1, min_new_tokens=4,
                                        num_beams=2, bos_token_id=0, use_cache=True)  # fmt: skip
    out = model.generate(ids, generation_config=cfg)
    ref = hf.generate(ids, attention_mask=torch.ones_like(ids), generation_config=cfg)
    assert torch.equal(out, ref)
    assert torch.equal(model.generate(ids, generation_config=cfg, num_beams=1), _hf_generate(
        hf, ids, max_new_tokens=11, eos_token_id=eos, pad_token_id=1, min_new_tokens=4))  # fmt: skip
    loaded = transformers.GenerationConfig.from_dict(json.loads(hf.generation_config.to_json_string()))
    # a model's own config sets no length: gpt2fast's default of 20 new tokens applies
    assert model.generate(ids, generation_config=loaded).shape == (2, 4 + 20)


@pytest.mark.parametrize(
    "kw, err, match",
    [
        (dict(num_beam_groups=2), ValueError, r"num_beam_groups=2 is not supported"),
        (dict(diversity_penalty=0.5), ValueError, r"diversity_penalty=0\.5 is not supported"),
        (dict(output_scores=True), ValueError, r"output_scores=True is not supported \(per-step scores"),
        (dict(suppress_tokens=[1]), ValueError, r"suppress_tokens=\[1\] is not supported"),
        (dict(streamer=object()), ValueError, r"streamer=.* is not supported"),
        (dict(epsilon_cutoff=0.1), ValueError, r"epsilon_cutoff=0\.1 is not supported"),
        (dict(bogus_knob=1), TypeError, r"unexpected keyword argument 'bogus_knob'"),
        (dict(num_return_sequences=2), ValueError, r"num_return_sequences=2 needs do_sample=True"),
        (dict(stop_strings=["x"]), ValueError, r"stop_strings needs tokenizer="),
        (dict(stop_strings=[""], tokenizer=object()), ValueError, r"stop_strings must be a non-empty str"),
        (dict(min_p=1.5, do_sample=True), ValueError, r"min_p must be None or a number in \[0, 1\]"),
        (dict(typical_p=0.0), ValueError, r"typical_p must lie in \(0, 1\]"),
        (dict(min_new_tokens=-1), ValueError, r"min_new_tokens must be >= 0"),
        (dict(bad_words_ids=[[]]), ValueError, r"bad_words_ids must be a non-empty list of non-empty lists"),
        (dict(bad_words_ids=[[1, 64]]), ValueError, r"bad_words_ids must be in \[0, 64\), got 64"),
        (dict(max_length=4), ValueError, r"max_length=4 leaves no room after the prompt's 4 tokens"),
        (dict(return_dict_in_generate=1), TypeError, r"return_dict_in_generate must be a bool"),
        (dict(generation_config={"num_beams": 2}), TypeError, r"generation_config must be a transformers"),
    ],
)
def test_refused_and_bad_knobs_are_named(kw, err, match):
    _, model = pair("h1_v64")
    ids = random_ids(64, (2, 4))
    with pytest.raises(err, match=match):
        model.generate(ids, **kw)


def test_refused_knobs_of_a_generation_config_are_named_and_inert_values_pass():
    _, model = pair("h1_v64")
    ids = random_ids(64, (1, 4))
    with pytest.raises(ValueError, match=r"generation_config\.forced_eos_token_id=3 is not supported"):
        model.generate(ids, generation_config=transformers.GenerationConfig(forced_eos_token_id=3))
    inert = transformers.GenerationConfig(num_beam_groups=1, diversity_penalty=0.0, output_scores=False,
                                          renormalize_logits=False, max_new_tokens=3)  # fmt: skip
    assert model.generate(ids, generation_config=inert).shape == (1, 7)


def test_max_length_counts_the_prompt_and_max_new_tokens_wins():
    _, model = pair("h1_v64")
    ids = random_ids(64, (2, 4))
    assert model.generate(ids, max_length=10).shape == (2, 10)
    assert model.generate(ids, max_length=10, max_new_tokens=3).shape == (2, 7)


def test_sampling_returns_several_sequences_per_prompt():
    _, model = pair("h3_v101")
    ids = random_ids(101, (2, 4))
    kw = dict(max_new_tokens=12, do_sample=True, num_return_sequences=3)
    out = model.generate(ids, generator=torch.Generator().manual_seed(3), **kw)
    assert out.shape == (6, 16) and torch.equal(out[:, :4], ids.repeat_interleave(3, 0))
    assert len({tuple(r) for r in out[:3, 4:].tolist()}) > 1, "three draws of one prompt should differ"
    assert torch.equal(out, model.generate(ids, generator=torch.Generator().manual_seed(3), **kw))


# ---- stop strings ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def gpt2_vocab():
    """A random model over GPT-2's vocabulary, gpt2fast's tokenizer and the same one built by transformers."""
    from gpt2fast.tokenizer import default_data_dir

    d = default_data_dir()
    vocab = json.loads((d / "encoder.json").read_text())
    merges = [tuple(line.split()) for line in (d / "vocab.bpe").read_text().splitlines()[1:] if line]
    hf_tok = transformers.GPT2Tokenizer(vocab=vocab, merges=merges)
    cfg = transformers.GPT2Config(vocab_size=50257, n_positions=64, n_embd=32, n_layer=1, n_head=1,
                                  attn_implementation="eager")  # fmt: skip
    torch.manual_seed(0)
    hf = transformers.GPT2LMHeadModel(cfg).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(torch.randn_like(p) * 0.5)
    hf.generation_config.eos_token_id = None
    return hf, GPT2.from_hf(hf, backend="reference"), Tokenizer.default(), hf_tok


def test_stop_strings_match_transformers(gpt2_vocab):
    hf, model, tok, hf_tok = gpt2_vocab
    ids = torch.tensor([tok.encode("Hello world, this"), tok.encode("The cat sat on")])
    free = model.generate(ids, max_new_tokens=12)[:, 4:]
    pieces = [[tok.decode([t]) for t in row] for row in free.tolist()]
    # a string straddling two tokens of row 1, one inside a single token (not at its start: no match), one spanning
    # the prompt and the first new token of row 0
    straddle = pieces[1][0][-3:] + pieces[1][1][:2]
    inside = pieces[1][3][2:5]
    from_prompt = "this" + pieces[0][0][:3]
    for stops, eos in [([straddle], None), ([inside, straddle], 50256), ([from_prompt], 50256), ([inside], None)]:
        for num_beams in (1, 2):
            kw = dict(max_new_tokens=12, stop_strings=stops, eos_token_id=eos, num_beams=num_beams, pad_token_id=0)
            out = model.generate(ids, tokenizer=tok, **kw)
            with torch.no_grad():
                ref = hf.generate(ids, attention_mask=torch.ones_like(ids), tokenizer=hf_tok, do_sample=False, **kw)
            if eos is None and num_beams > 1:  # transformers pads a beam that a stop string ended with -1 here
                ref = torch.where(ref == -1, 0, ref)
            assert torch.equal(out, ref), (stops, eos, num_beams)
            if stops == [inside] and num_beams == 1:
                assert out.shape[1] == 16  # never matched
        assert model.generate(ids, tokenizer=hf_tok, max_new_tokens=12, stop_strings=stops, eos_token_id=eos).equal(
            model.generate(ids, tokenizer=tok, max_new_tokens=12, stop_strings=stops, eos_token_id=eos))  # fmt: skip


def test_stop_string_windows_on_a_toy_vocab():
    """["las", "topper"] and a last token "xstopx" stop on "stop", ["stop", "at"] does not, the prompt's bytes
    count (as transformers' StopStringCriteria decides, checked below)."""

    class Toy:
        pieces = (b"las", b"topper", b"stop", b"at", b"s", b"to", b"pped", b"x", b"xstopx")

        def token_bytes(self, i):
            return self.pieces[i]

    prompts = torch.tensor([[7, 0], [7, 2], [4, 5], [7, 7]])
    stop = StopStrings(["stop"], Toy(), 9, prompts, torch.tensor([2, 2, 2, 1]))
    assert stop.push(torch.tensor([1, 3, 6, 8])).tolist() == [True, False, True, True]
    assert stop.push(torch.tensor([7, 7, 7, 7])).tolist() == [False, False, False, False]
