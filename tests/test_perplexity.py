"""gpt2fast.perplexity and ``gpt2fast eval perplexity``: transformers' sliding-window recipe, on our model and on
transformers' own, agree within 1e-4 relative in fp32; the unigram baseline; the command line."""

from __future__ import annotations

import json
import math
import re

import numpy as np
import pytest
import torch

from gpt2fast import cli
from gpt2fast.config import GPT2Config
from gpt2fast.model import GPT2
from gpt2fast.perplexity import (
    sliding_window_perplexity,
    transformers_perplexity,
    unigram_perplexity,
    window_plan,
)
from gpt2fast.tokenizer import Tokenizer

TEXT = (
    "Shall I compare thee to a summer's day? Thou art more lovely and more temperate: rough winds do shake the "
    "darling buds of May, and summer's lease hath all too short a date. "
) * 6


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A small random GPT-2 (2 layers, width 48, 40 positions) saved in HF format, and the text's ids."""
    d = tmp_path_factory.mktemp("ppl") / "model"
    GPT2.random(GPT2Config(n_layer=2, n_head=2, n_embd=48, n_positions=40), seed=1).save_pretrained(d)
    (d.parent / "text.txt").write_text(TEXT)
    return d, torch.tensor(Tokenizer.default().encode(TEXT))


@pytest.mark.parametrize("max_length, stride", [(40, 20), (40, 40), (40, 7), (16, 3), (40, 39)])
def test_equals_the_transformers_recipe(checkpoint, max_length, stride):
    transformers = pytest.importorskip("transformers")
    d, ids = checkpoint
    hf = transformers.GPT2LMHeadModel.from_pretrained(str(d), dtype=torch.float32).eval()
    ours = sliding_window_perplexity(GPT2.from_pretrained(d), ids, max_length, stride)
    ref = transformers_perplexity(hf, ids, max_length, stride)
    assert (ours.tokens, ours.windows) == (ref.tokens, ref.windows)
    assert abs(ours.perplexity - ref.perplexity) <= 1e-4 * ref.perplexity, (ours, ref)
    assert 1000 < ours.perplexity < 200_000  # a random model: roughly the vocabulary size


def test_a_text_within_one_window_is_the_plain_loss(checkpoint):
    transformers = pytest.importorskip("transformers")
    d, ids = checkpoint
    short = ids[:30]
    hf = transformers.GPT2LMHeadModel.from_pretrained(str(d), dtype=torch.float32).eval()
    with torch.no_grad():
        plain = float(hf(short[None], labels=short[None]).loss)
    res = sliding_window_perplexity(GPT2.from_pretrained(d), short)
    assert res.windows == 1 and res.tokens == 29
    assert res.nll == pytest.approx(plain, rel=1e-5)


def test_window_plan():
    assert window_plan(10, 4, 2) == [(0, 4, 4), (2, 6, 2), (4, 8, 2), (6, 10, 2)]
    assert window_plan(9, 4, 4) == [(0, 4, 4), (4, 8, 4), (8, 9, 1)]
    assert window_plan(3, 8, 4) == [(0, 3, 3)]
    with pytest.raises(ValueError, match=r"stride must be in \[1, 5\)"):
        window_plan(10, 4, 5)
    with pytest.raises(ValueError, match=r"stride must be in \[1, 5\)"):
        window_plan(10, 4, 0)
    with pytest.raises(ValueError, match="at least 2"):
        window_plan(1, 4, 2)


def test_max_length_past_the_context_is_refused(checkpoint):
    d, ids = checkpoint
    with pytest.raises(ValueError, match="exceeds the model's n_positions=40"):
        sliding_window_perplexity(GPT2.from_pretrained(d), ids, max_length=41)


def test_unigram_add_one():
    train, held = np.array([0, 0, 1, 2]), np.array([3, 0, 1])  # scored: 0 and 1 (the first token has no context)
    p0, p1 = (2 + 1) / (4 + 5), (1 + 1) / (4 + 5)  # vocabulary of 5 ids
    assert unigram_perplexity(train, held, 5) == pytest.approx(math.exp(-(math.log(p0) + math.log(p1)) / 2))
    with pytest.raises(ValueError, match="alpha"):
        unigram_perplexity(train, held, 5, alpha=0)


# ---- the command line ----------------------------------------------------------------------------------------
def test_cli_reports_and_writes_json(checkpoint, tmp_path, capsys):
    d, ids = checkpoint
    out = tmp_path / "p.json"
    argv = ["eval", "perplexity", "--model", str(d), "--data", str(d.parent / "text.txt"), "--max-length", "40"]
    code = cli.main([*argv, "--stride", "20", "--unigram", str(d.parent / "text.txt"), "--json", str(out)])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    doc = json.loads(out.read_text())
    expected = sliding_window_perplexity(GPT2.from_pretrained(d), ids, 40, 20)
    assert doc["perplexity"] == pytest.approx(expected.perplexity, rel=1e-6)
    assert f"perplexity {expected.perplexity:.4f}" in captured.out
    counts = [*ids.tolist(), Tokenizer.default().eos_token_id]  # the --unigram text, one document
    assert doc["unigram"]["perplexity"] == pytest.approx(unigram_perplexity(counts, ids.numpy(), 50257))
    assert (doc["max_length"], doc["stride"], doc["tokens"]) == (40, 20, len(ids))


def test_cli_compare_backends(checkpoint, capsys):
    pytest.importorskip("transformers")
    d, _ = checkpoint
    argv = ["eval", "perplexity", "--model", str(d), "--data", str(d.parent / "text.txt"), "--compare-backends"]
    code = cli.main([*argv, "--backend", "reference", "--max-length", "40", "--stride", "40"])
    out = capsys.readouterr().out
    assert code == 0
    rows = [line for line in out.splitlines() if line.startswith("│")]
    assert [r.split("│")[1:3] for r in rows] == [
        [" transformers ", " fp32  "],
        [" reference    ", " fp32  "],
        [" reference    ", " fp16  "],
        [" reference    ", " bf16  "],
    ]


@pytest.mark.parametrize(
    "extra, match",
    [
        (["--stride", "50", "--max-length", "40"], r"--stride must lie in \[1, --max-length=40\]"),
        (["--max-length", "41"], r"--max-length must lie in \[2, n_positions=40\]"),
        (["--data", "/no/such/file.txt"], "no such file or folder"),
    ],
)
def test_cli_bad_input_exits_2(checkpoint, capsys, extra, match):
    d, _ = checkpoint
    code = cli.main(["eval", "perplexity", "--model", str(d), "--data", str(d.parent / "text.txt"), *extra])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert re.search(match, " ".join(err.split()))
