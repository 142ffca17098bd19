"""Each sampling knob against transformers' logits processors, the token history, and sampling itself."""

from __future__ import annotations

import pytest
import torch

from gpt2fast.sampling import (
    SamplingConfig,
    TokenHistory,
    apply_no_repeat_ngram,
    apply_repetition_penalty,
    apply_top_k,
    apply_top_p,
    process_logits,
    sample,
)

lp = pytest.importorskip("transformers.generation.logits_process")

B, V, CAP = 4, 37, 16
LENGTHS = [1, 5, 9, 16]  # ragged, incl. a single token and a full buffer


def _history(vocab: int = 6, seed: int = 0) -> TokenHistory:
    """Histories over a small alphabet, so tokens and n-grams repeat."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, vocab, (B, CAP), generator=g)
    return TokenHistory(tokens, torch.tensor(LENGTHS))


def _logits(seed: int = 0) -> torch.Tensor:
    return torch.randn(B, V, generator=torch.Generator().manual_seed(seed)) * 3


def _per_row(processor, history: TokenHistory, logits: torch.Tensor) -> torch.Tensor:
    """transformers' processor applied to each row with that row's own history."""
    rows = [
        processor(history.tokens[b : b + 1, : int(history.lengths[b])], logits[b : b + 1].clone())
        for b in range(logits.shape[0])
    ]
    return torch.cat(rows)


@pytest.mark.parametrize("penalty", [0.5, 1.3, 2.0])
def test_repetition_penalty_matches_transformers(penalty):
    h, logits = _history(), _logits()
    expected = _per_row(lp.RepetitionPenaltyLogitsProcessor(penalty), h, logits)
    assert torch.equal(apply_repetition_penalty(logits, h, penalty), expected)


@pytest.mark.parametrize("n", [1, 2, 3, 5])
@pytest.mark.parametrize("seed", [0, 1])
def test_no_repeat_ngram_matches_transformers(n, seed):
    h, logits = _history(vocab=3, seed=seed), _logits(seed)
    expected = _per_row(lp.NoRepeatNGramLogitsProcessor(n), h, logits)
    got = apply_no_repeat_ngram(logits, h, n)
    assert torch.equal(got, expected)
    if n == 2:
        assert torch.isinf(got).any()  # the small alphabet makes some bans certain


@pytest.mark.parametrize("k", [1, 3, V, V + 5])
def test_top_k_matches_transformers(k):
    logits = _logits()
    logits[0, :4] = 2.5  # ties at the threshold are kept by both
    expected = lp.TopKLogitsWarper(k)(None, logits.clone())
    assert torch.equal(apply_top_k(logits, k), expected)


@pytest.mark.parametrize("p", [1e-6, 0.3, 0.9, 0.999])
def test_top_p_matches_transformers(p):
    logits = _logits()
    expected = lp.TopPLogitsWarper(p)(None, logits.clone())
    got = apply_top_p(logits, p)
    assert torch.equal(got, expected)
    assert torch.isfinite(got).sum(-1).min() >= 1


def test_temperature_and_the_full_chain_match_transformers():
    h, logits = _history(vocab=4), _logits()
    cfg = SamplingConfig(
        do_sample=True, temperature=0.7, top_k=9, top_p=0.8, repetition_penalty=1.4, no_repeat_ngram_size=2
    )
    chain = lp.LogitsProcessorList(
        [
            lp.RepetitionPenaltyLogitsProcessor(1.4),
            lp.NoRepeatNGramLogitsProcessor(2),
            lp.TemperatureLogitsWarper(0.7),
            lp.TopKLogitsWarper(9),
            lp.TopPLogitsWarper(0.8),
        ]
    )
    expected = torch.cat([chain(h.tokens[b : b + 1, : LENGTHS[b]], logits[b : b + 1].clone()) for b in range(B)])
    assert torch.allclose(process_logits(logits, h, cfg), expected, rtol=0, atol=1e-6)


def test_greedy_ignores_the_sampling_warpers():
    h, logits = _history(), _logits()
    cfg = SamplingConfig(temperature=0.1, top_k=1, top_p=0.1)
    assert torch.equal(process_logits(logits, h, cfg), logits)
    assert torch.equal(sample(logits, cfg), logits.argmax(-1))


def test_low_precision_logits_are_processed_in_fp32():
    h, logits = _history(), _logits().bfloat16()
    out = process_logits(logits, h, SamplingConfig(repetition_penalty=1.2))
    assert out.dtype == torch.float32


def test_token_history_append_and_overflow():
    h = TokenHistory.from_prompts(torch.tensor([[5, 6, 0], [7, 0, 0]]), torch.tensor([2, 1]), max_len=3)
    h.append(torch.tensor([8, 9]))
    assert h.tokens.tolist() == [[5, 6, 8], [7, 9, 0]] and h.lengths.tolist() == [3, 2]
    h.append(torch.tensor([10, 11]))  # row 0 is full: keeps its tokens, drops the new one
    assert h.tokens.tolist() == [[5, 6, 8], [7, 9, 11]] and h.lengths.tolist() == [3, 3]


def test_sampling_is_seeded_and_follows_the_distribution():
    logits = torch.tensor([[0.0, 1.0, 2.0, -1.0]]).expand(4000, 4).contiguous()
    cfg = SamplingConfig(do_sample=True)
    a = sample(logits, cfg, torch.Generator().manual_seed(1))
    b = sample(logits, cfg, torch.Generator().manual_seed(1))
    c = sample(logits, cfg, torch.Generator().manual_seed(2))
    assert torch.equal(a, b) and not torch.equal(a, c)
    freq = torch.bincount(a, minlength=4).float() / a.numel()
    assert (freq - torch.softmax(logits[0], -1)).abs().max() < 0.03  # ~4 sigma at n=4000


def test_sampling_never_picks_a_filtered_token():
    logits = _logits().repeat(50, 1)
    cfg = SamplingConfig(do_sample=True, top_k=3)
    picked = sample(process_logits(logits, TokenHistory(*_repeat_history(50)), cfg), cfg)
    allowed = torch.topk(logits, 3).indices
    assert (picked[:, None] == allowed).any(-1).all()


def _repeat_history(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    h = _history()
    return h.tokens.repeat(n, 1), h.lengths.repeat(n)


def test_per_token_path_has_no_host_sync():
    """On the meta device any data-dependent branch or ``.item()`` would raise: the whole per-token path
    (processing every knob, sampling, recording) runs on shapes alone, as CUDA-graph capture needs."""
    meta = torch.device("meta")
    h = TokenHistory(torch.empty(B, CAP, dtype=torch.long, device=meta), torch.empty(B, dtype=torch.long, device=meta))
    cfg = SamplingConfig(True, 0.7, 5, 0.9, 1.3, 3)
    tokens = sample(process_logits(torch.empty(B, V, device=meta), h, cfg), cfg)
    h.append(tokens)
    assert tokens.shape == (B,) and tokens.device == meta


@pytest.mark.parametrize(
    "kwargs, err, match",
    [
        (dict(do_sample=True, temperature=0.0), ValueError, "temperature"),
        (dict(do_sample=True, temperature=-1.0), ValueError, "temperature"),
        (dict(top_p=0.0), ValueError, "top_p"),
        (dict(top_p=1.5), ValueError, "top_p"),
        (dict(top_k=-1), ValueError, "top_k"),
        (dict(top_k=2.5), TypeError, "top_k"),
        (dict(repetition_penalty=0.0), ValueError, "repetition_penalty"),
        (dict(no_repeat_ngram_size=-2), ValueError, "no_repeat_ngram_size"),
        (dict(temperature=float("nan")), TypeError, "temperature"),
        (dict(do_sample=1), TypeError, "do_sample"),
    ],
)
def test_config_rejects_bad_knobs(kwargs, err, match):
    with pytest.raises(err, match=match):
        SamplingConfig(**kwargs)


def test_greedy_allows_any_temperature():
    SamplingConfig(do_sample=False, temperature=0.0)  # ignored without sampling, as in transformers
