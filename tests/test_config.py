"""GPT2Config: published sizes, transformers round trips, and bad values."""

from __future__ import annotations

import json

import pytest

from gpt2fast import GPT2Config
from gpt2fast.config import SIZES

transformers = pytest.importorskip("transformers")


@pytest.mark.parametrize(
    "name, layers, heads, width", [("gpt2", 12, 12, 768), ("gpt2-medium", 24, 16, 1024), ("gpt2-xl", 48, 25, 1600)]
)
def test_published_sizes(name, layers, heads, width):
    c = GPT2Config.from_name(name)
    assert (c.n_layer, c.n_head, c.n_embd, c.vocab_size, c.n_positions) == (layers, heads, width, 50257, 1024)
    assert c.head_dim == width // heads and c.mlp_dim == 4 * width


def test_tiny_is_the_one_small_config():
    c = GPT2Config.from_name("tiny")
    # GPT-2's full vocab (the real tokenizer's ids fit), everything else minimal.
    assert (c.vocab_size, c.n_positions, c.n_embd, c.n_layer, c.n_head) == (50257, 128, 64, 2, 2)
    assert (c.bos_token_id, c.eos_token_id) == (50256, 50256)
    assert list(SIZES) == ["tiny", "gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl"]
    assert GPT2Config.from_name("tiny") == c and GPT2Config.from_name("tiny") is not c  # a fresh object each call


def test_unknown_size():
    with pytest.raises(ValueError, match=r"unknown GPT-2 size 'gpt3'; choose one of \['gpt2', .*'tiny'\]"):
        GPT2Config.from_name("gpt3")


def test_round_trip_through_transformers_config(tmp_path):
    c = GPT2Config(vocab_size=101, n_positions=48, n_embd=48, n_layer=2, n_head=3, n_inner=80)
    hf = transformers.GPT2Config(**c.to_hf_dict())
    assert (hf.vocab_size, hf.n_head, hf.n_inner, hf.activation_function) == (101, 3, 80, "gelu_new")
    assert GPT2Config.from_hf(hf) == c
    hf.save_pretrained(tmp_path)
    assert GPT2Config.from_json(tmp_path) == c
    assert GPT2Config.from_json(tmp_path / "config.json").mlp_dim == 80


def test_dropout_fields_follow_transformers():
    """Names and defaults as transformers' GPT2Config; read from and written to config.json."""
    hf_default = transformers.GPT2Config()
    c = GPT2Config()
    assert (c.embd_pdrop, c.resid_pdrop, c.attn_pdrop) == (
        hf_default.embd_pdrop,
        hf_default.resid_pdrop,
        hf_default.attn_pdrop,
    )
    c = GPT2Config(n_embd=48, n_head=3, n_layer=1, embd_pdrop=0.0, resid_pdrop=0.25, attn_pdrop=0.5)
    hf = transformers.GPT2Config(**c.to_hf_dict())
    assert (hf.embd_pdrop, hf.resid_pdrop, hf.attn_pdrop) == (0.0, 0.25, 0.5)
    assert GPT2Config.from_hf(hf) == c


def test_from_hf_defaults_inner_width():
    c = GPT2Config.from_hf(transformers.GPT2Config(n_embd=64, n_head=4, n_layer=1))
    assert c.n_inner is None and c.mlp_dim == 256


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(n_head=5), "divisible"),
        (dict(vocab_size=0), "vocab_size"),
        (dict(n_layer=-1), "n_layer"),
        (dict(n_embd=76.8), "n_embd"),
        (dict(attn_pdrop=1.5), r"attn_pdrop must be a probability in \[0, 1\], got 1\.5"),
        (dict(embd_pdrop=-0.1), "embd_pdrop"),
        (dict(resid_pdrop=True), "resid_pdrop"),
    ],
)
def test_bad_values(kwargs, match):
    with pytest.raises(ValueError, match=match):
        GPT2Config(**kwargs)


@pytest.mark.parametrize(
    "d, match",
    [
        ({"model_type": "llama"}, "model_type 'llama'"),
        ({"activation_function": "relu"}, "activation_function 'relu'"),
    ],
)
def test_unsupported_hf_configs(d, match):
    with pytest.raises(ValueError, match=match):
        GPT2Config.from_hf(d)


def test_bad_json(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"config\.json"):
        GPT2Config.from_json(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        GPT2Config.from_json(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"n_embd": 10, "n_head": 3}))
    with pytest.raises(ValueError, match="divisible"):
        GPT2Config.from_json(tmp_path)
