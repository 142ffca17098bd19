"""GPT-2 tokenizer: published ids, round trips, engine agreement, file formats, hashes and errors."""

from __future__ import annotations

import base64
import json
import shutil

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from gpt2fast.tokenizer import (
    EOS_TOKEN,
    GPT2_SHA256,
    Tokenizer,
    TokenizerFileError,
    bytes_to_unicode,
    default_data_dir,
    sha256_file,
)

ENGINES = ["tiktoken", "tokenizers"]

# Ids published by others (not computed here):
#  - transformers' GPT2Tokenizer docstring: "Hello world" -> [15496, 995], " Hello world" -> [18435, 995]
#  - tiktoken's tests/test_encoding.py::test_simple for the "gpt2" encoding
PUBLISHED = [
    ("Hello world", [15496, 995]),
    (" Hello world", [18435, 995]),
    ("hello world", [31373, 995]),
    ("hello <|endoftext|>", [31373, 220, 50256]),
]

TEXTS = [
    "",
    " ",
    "\n",
    "Hello world",
    "  leading and trailing spaces  ",
    "tabs\tand\r\nnewlines\n\n\nx",
    "Ünïcödé ñ ß ø œ — “quotes” ‘single’ …",
    "日本語のテキスト、中文文本。한국어",
    "emoji 🎉👍🏽 👨‍👩‍👧‍👦 flags 🇫🇷🇯🇵",
    "math ∑∫√∞ ≤ ≥ ≠ and arrows → ⇒",
    "code: def f(x):\n    return x**2  # comment\n",
    "numbers 1234567890 3.14159 1e-5 -42",
    "contractions: don't won't I'm you're we've they'll he'd",
    "<|endoftext|>two docs<|endoftext|>",
    "\x00\x01\x7f control bytes \u200b zero width",
    "a" * 300,
]


@pytest.fixture(scope="module", params=ENGINES)
def tok(request) -> Tokenizer:
    return Tokenizer.default(engine=request.param)


@pytest.fixture(scope="module")
def both() -> tuple[Tokenizer, Tokenizer]:
    return Tokenizer.default(engine="tiktoken"), Tokenizer.default(engine="tokenizers")


@pytest.mark.parametrize(("text", "ids"), PUBLISHED)
def test_published_ids(tok, text, ids):
    assert tok.encode(text) == ids
    assert tok.decode(ids) == text


def test_gpt2_constants(tok):
    assert tok.eos_token_id == 50256
    assert tok.vocab_size == 50257
    assert tok.decode([tok.eos_token_id]) == EOS_TOKEN
    assert tok.engine in ENGINES


def test_installed_files_match_published_hashes():
    d = default_data_dir()
    for name, digest in GPT2_SHA256.items():
        assert sha256_file(d / name) == digest, name


@pytest.mark.parametrize("text", TEXTS)
def test_round_trip_and_engines_agree(both, text):
    a, b = both
    ids = a.encode(text)
    assert b.encode(text) == ids
    assert all(0 <= i < 50257 for i in ids)
    assert a.decode(ids) == text
    assert b.decode(ids) == text


@given(st.text(max_size=200))
def test_random_text_round_trip_and_engines_agree(both, text):
    a, b = both
    ids = a.encode(text)
    assert b.encode(text) == ids
    assert a.decode(ids) == text == b.decode(ids)


@given(st.lists(st.integers(0, 50256), max_size=40))
def test_decode_any_ids_agrees(both, ids):
    a, b = both
    assert a.decode(ids) == b.decode(ids)


def test_lone_surrogate_is_replaced_consistently(both):
    a, b = both
    text = "a\ud800b"
    assert a.encode(text) == b.encode(text) == a.encode("a\ufffdb")


def test_encode_many_matches_encode(tok):
    assert tok.encode_many(TEXTS) == [tok.encode(t) for t in TEXTS]
    assert tok.encode_many([]) == []
    with pytest.raises(TypeError, match=r"texts\[1\]"):
        tok.encode_many(["ok", 3])


def test_encode_rejects_non_str(tok):
    with pytest.raises(TypeError, match="text must be a str"):
        tok.encode(b"bytes")  # type: ignore[arg-type]


def test_decode_accepts_tensor_and_validates_ids(tok):
    assert tok.decode(torch.tensor([15496, 995])) == "Hello world"
    for bad in ([50257], [-1], [1.5], [True]):
        with pytest.raises(ValueError, match=r"ids must be ints in \[0, 50257\)"):
            tok.decode(bad)
    with pytest.raises(ValueError, match="1-D"):
        tok.decode(torch.zeros(2, 2, dtype=torch.long))


def test_token_bytes_spell_the_text_and_engines_agree(both):
    tt, hf = both
    text = "Ünïcödé 🎉 and <|endoftext|>"
    for tok in both:
        ids = tok.encode(text)
        pieces = [tok.token_bytes(i) for i in ids]
        assert b"".join(pieces) == text.encode("utf-8")
        assert any(len(p) and not _is_utf8(p) for p in pieces), "the emoji's bytes should span tokens"
        assert tok.token_bytes(15496) == b"Hello" and tok.token_bytes(995) == b" world"
        assert tok.token_bytes(tok.eos_token_id) == EOS_TOKEN.encode()
    assert all(tt.token_bytes(i) == hf.token_bytes(i) for i in range(tt.vocab_size))


def _is_utf8(b: bytes) -> bool:
    try:
        b.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def test_token_bytes_rejects_bad_ids(tok):
    for bad in (50257, -1, 10**9):
        with pytest.raises(ValueError, match=r"token_id must be in \[0, 50257\), got"):
            tok.token_bytes(bad)
    for bad in (1.5, True, "7", None):
        with pytest.raises(TypeError, match="token_id must be an int"):
            tok.token_bytes(bad)  # type: ignore[arg-type]


# ---- batches for generate ---------------------------------------------------------------
def test_encode_batch_left_padding(tok):
    texts = ["Hello world", "hi", "a much longer prompt than the others"]
    rows = [tok.encode(t) for t in texts]
    batch = tok.encode_batch(texts)
    T = max(map(len, rows))
    assert batch.input_ids.shape == batch.attention_mask.shape == (3, T)
    assert batch.input_ids.dtype == torch.long
    assert batch.lengths.tolist() == [len(r) for r in rows]
    for b, r in enumerate(rows):
        assert batch.input_ids[b, T - len(r) :].tolist() == r
        assert batch.attention_mask[b].tolist() == [0] * (T - len(r)) + [1] * len(r)
        assert (batch.input_ids[b, : T - len(r)] == tok.eos_token_id).all()


def test_encode_batch_right_padding_and_pad_id(tok):
    batch = tok.encode_batch(["Hello world", "hi"], padding_side="right", pad_token_id=0)
    assert batch.input_ids.tolist() == [[15496, 995], [tok.encode("hi")[0], 0]]
    assert batch.attention_mask.tolist() == [[1, 1], [1, 0]]
    assert batch.padding_side == "right"


def test_encode_batch_errors(tok):
    with pytest.raises(ValueError, match="at least one prompt"):
        tok.encode_batch([])
    with pytest.raises(ValueError, match=r"texts\[1\] encodes to no tokens"):
        tok.encode_batch(["ok", ""])
    with pytest.raises(TypeError, match="single str"):
        tok.encode_batch("Hello")
    with pytest.raises(ValueError, match="padding_side"):
        tok.encode_batch(["x"], padding_side="middle")


# ---- streaming ---------------------------------------------------------------------------
@pytest.mark.parametrize("text", [t for t in TEXTS if t])
def test_stream_decoder_token_by_token(tok, text):
    ids = tok.encode(text)
    dec = tok.stream_decoder()
    pieces = [dec.push([i]) for i in ids]
    pieces.append(dec.flush())
    assert "".join(pieces) == text
    assert not any("\ufffd" in p for p in pieces)  # never releases half a character


def test_stream_decoder_flushes_incomplete_character(tok):
    ids = tok.encode("🎉")
    assert len(ids) > 1  # a multi-token character, or this test proves nothing
    dec = tok.stream_decoder()
    assert dec.push(torch.tensor(ids[:1])) == ""
    assert dec.flush() == tok.decode(ids[:1])


# ---- other file layouts ------------------------------------------------------------------
def _write_hf_layout(tmp_path):
    d = default_data_dir()
    shutil.copy(d / "encoder.json", tmp_path / "vocab.json")
    shutil.copy(d / "vocab.bpe", tmp_path / "merges.txt")
    return tmp_path


@pytest.mark.parametrize("engine", ["auto", *ENGINES])
def test_from_pretrained_vocab_merges(tmp_path, both, engine):
    t = Tokenizer.from_pretrained(_write_hf_layout(tmp_path), engine=engine)
    ref = both[0]
    assert t.eos_token_id == 50256
    for text in TEXTS:
        assert t.encode(text) == ref.encode(text)


@pytest.mark.parametrize("engine", ["auto", *ENGINES])
def test_from_pretrained_tokenizer_json(tmp_path, both, engine):
    both[1]._engine.tok.save(str(tmp_path / "tokenizer.json"))
    t = Tokenizer.from_pretrained(tmp_path, engine=engine)
    assert t.eos_token_id == 50256
    for text in TEXTS:
        assert t.encode(text) == both[0].encode(text)
        assert t.decode(t.encode(text)) == text


def test_from_tiktoken(tmp_path, both):
    """A tiktoken BPE file written from GPT-2's vocab gives the same ids."""
    inverse = {c: b for b, c in bytes_to_unicode().items()}
    vocab = json.loads((default_data_dir() / "encoder.json").read_text(encoding="utf-8"))
    lines = [
        base64.b64encode(bytes(inverse[c] for c in token)).decode() + f" {i}"
        for token, i in sorted(vocab.items(), key=lambda kv: kv[1])
        if token != EOS_TOKEN
    ]
    path = tmp_path / "r50k_base.tiktoken"
    path.write_text("\n".join(lines) + "\n")
    t = Tokenizer.from_tiktoken(path)
    assert t.eos_token_id == 50256 and t.vocab_size == 50257 and t.engine == "tiktoken"
    for text in TEXTS:
        assert t.encode(text) == both[0].encode(text)


def test_from_tiktoken_rejects_garbage(tmp_path):
    path = tmp_path / "bad.tiktoken"
    path.write_text("not-base64!! x\n")
    with pytest.raises(TokenizerFileError, match=r"bad.tiktoken:1"):
        Tokenizer.from_tiktoken(path)


def _toy_vocab() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Byte tokens 0..255, merges ("a","b") then ("b","c"), but "ab" gets the larger id."""
    b2u = bytes_to_unicode()
    vocab = {b2u[b]: i for i, b in enumerate(range(256))}
    vocab.update({"ab": 257, "bc": 256, EOS_TOKEN: 258})
    return vocab, [("a", "b"), ("b", "c")]


def test_out_of_order_merges_use_tokenizers_engine(tmp_path):
    vocab, merges = _toy_vocab()
    (tmp_path / "vocab.json").write_text(json.dumps(vocab))
    (tmp_path / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
    with pytest.raises(TokenizerFileError, match="merge order"):
        Tokenizer.from_pretrained(tmp_path, engine="tiktoken")
    t = Tokenizer.from_pretrained(tmp_path)  # auto falls back to tokenizers, which honours merge priority
    assert t.engine == "tokenizers"
    assert t.encode("abc") == [257, vocab["c"]]
    assert t.eos_token_id == 258


# ---- hashes and missing files ------------------------------------------------------------
def test_default_from_intact_copy(tmp_path):
    d = default_data_dir()
    for name in GPT2_SHA256:
        shutil.copy(d / name, tmp_path / name)
    assert Tokenizer.default(data_dir=tmp_path).encode("Hello world") == [15496, 995]


@pytest.mark.parametrize("name", sorted(GPT2_SHA256))
def test_default_rejects_corrupt_copy(tmp_path, name):
    d = default_data_dir()
    for n in GPT2_SHA256:
        shutil.copy(d / n, tmp_path / n)
    data = bytearray((tmp_path / name).read_bytes())
    data[len(data) // 2] ^= 0x01  # one flipped bit
    (tmp_path / name).write_bytes(bytes(data))
    with pytest.raises(TokenizerFileError, match=rf"sha256 mismatch for tokenizer file .*{name}"):
        Tokenizer.default(data_dir=tmp_path)


@pytest.mark.parametrize("name", sorted(GPT2_SHA256))
def test_default_missing_file(tmp_path, name):
    d = default_data_dir()
    for n in GPT2_SHA256:
        if n != name:
            shutil.copy(d / n, tmp_path / n)
    with pytest.raises(FileNotFoundError, match=rf"tokenizer file not found: .*{name}"):
        Tokenizer.default(data_dir=tmp_path)


def test_from_pretrained_missing(tmp_path):
    with pytest.raises(FileNotFoundError, match="tokenizer directory not found"):
        Tokenizer.from_pretrained(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match=r"tokenizer.json, or vocab.json \+ merges.txt.*vocab.json, merges.txt"):
        Tokenizer.from_pretrained(tmp_path)
    (tmp_path / "vocab.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match=r"missing merges.txt\)"):
        Tokenizer.from_pretrained(tmp_path)


def test_from_tiktoken_missing(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"tokenizer file not found: .*gpt2.tiktoken"):
        Tokenizer.from_tiktoken(tmp_path / "gpt2.tiktoken")


def test_bad_engine():
    with pytest.raises(ValueError, match="engine must be one of"):
        Tokenizer.default(engine="sentencepiece")


def test_invalid_json(tmp_path):
    (tmp_path / "vocab.json").write_text("{not json")
    (tmp_path / "merges.txt").write_text("#version: 0.2\n")
    with pytest.raises(TokenizerFileError, match=r"vocab\.json is not valid JSON"):
        Tokenizer.from_pretrained(tmp_path)
