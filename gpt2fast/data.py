"""Training data: text files tokenized once into uint16 memmaps, and the windows a training run reads.

In the spirit of nanoGPT's ``prepare.py``: every document (a text file) is encoded with the GPT-2 tokenizer, an
``<|endoftext|>`` id is appended after it, and the ids of each split are written once as a flat ``uint16`` array
(``train.npy``, ``val.npy``, opened as memmaps) next to a ``meta.json`` that records what they were made
from.  A second run on the same inputs (same file contents, split and tokenizer) opens the cache instead of
tokenizing again.

The held-out split is, in order of preference:

* ``val_data``: its own file or folder;
* whole files: with a folder of two or more files, files drawn by a seeded shuffle are held out until they hold
  ``val_fraction`` of the bytes (at least one file stays in training);
* the tail: with a single file, its last ``val_fraction`` of tokens.

A run reads **windows** of ``block_size`` tokens.  Consecutive windows overlap by one token, so with the model's
shifted labels (``labels = input_ids``) every token but the very first is a target exactly once per epoch.
:class:`WindowSampler` draws the training windows: each epoch is a seeded permutation of all of them, each optimizer
step takes the next ``batch_size`` of the permutation (running on into the next epoch), and its state is two
integers (epoch, cursor), so a resumed run reads exactly the windows the uninterrupted one would have.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

#: Suffixes of the files a data folder contributes (searched recursively; hidden files and folders are skipped).
TEXT_SUFFIXES = (".txt",)

#: Bump when the cache layout or the tokenization recipe changes: old caches are then rebuilt, not reused.
CACHE_VERSION = 1


class DataError(ValueError):
    """Training data that cannot be used: missing, empty, or too short for one block."""


# ---- files -------------------------------------------------------------------------------------------------------
def find_text_files(path: str | Path, arg: str = "--data") -> list[Path]:
    """The text files of ``path``: the file itself, or every ``*.txt`` under a folder (sorted, recursive, hidden
    entries skipped).  Raises :class:`DataError` naming ``arg`` for a missing path, a folder without text files, or
    only empty files."""
    path = Path(path)
    if path.is_file():
        files = [path]
    elif path.is_dir():
        files = sorted(
            p
            for p in path.rglob("*")
            if p.is_file()
            and p.suffix.lower() in TEXT_SUFFIXES
            and not any(part.startswith(".") for part in p.relative_to(path).parts)
        )
        if not files:
            raise DataError(f"{arg} {path}: the folder holds no {'/'.join(TEXT_SUFFIXES)} files")
    else:
        raise DataError(f"{arg} {path}: no such file or folder")
    if all(p.stat().st_size == 0 for p in files):
        raise DataError(f"{arg} {path}: {'every file of the folder' if path.is_dir() else 'the file'} is empty")
    return files


def read_text(path: Path) -> str:
    """A text file's contents as UTF-8 (undecodable bytes replaced), with Windows line ends normalised."""
    return path.read_bytes().decode("utf-8", errors="replace").replace("\r\n", "\n")


def split_files(files: Sequence[Path], val_fraction: float, seed: int) -> tuple[list[Path], list[Path]]:
    """Hold out whole files: a seeded shuffle of ``files`` (two or more) is taken from the end until the held-out
    files hold at least ``val_fraction`` of the bytes, keeping at least one file for training.  Both lists keep the
    input order."""
    if len(files) < 2:
        raise ValueError("split_files needs at least two files")
    order = list(range(len(files)))
    random.Random(seed).shuffle(order)
    sizes = [f.stat().st_size for f in files]
    want, held, val = val_fraction * sum(sizes), 0, set()
    for i in reversed(order[1:]):  # order[0] always stays in training
        if held >= want:
            break
        val.add(i)
        held += sizes[i]
    return [f for i, f in enumerate(files) if i not in val], [f for i, f in enumerate(files) if i in val]


def _fingerprint(parts: Sequence[object], files: Sequence[Path]) -> str:
    """sha256 over ``parts`` and each file's name and contents."""
    h = hashlib.sha256(json.dumps([str(p) for p in parts]).encode())
    for f in files:
        h.update(f.name.encode() + b"\0")
        h.update(hashlib.sha256(f.read_bytes()).digest())
    return h.hexdigest()


# ---- the token cache ---------------------------------------------------------------------------------------------
@dataclass
class TokenData:
    """The two splits of a prepared data set, as read-only ``uint16`` memmaps, with the cache's metadata."""

    train: np.ndarray
    val: np.ndarray
    meta: dict
    directory: Path

    @property
    def fingerprint(self) -> str:
        """Identifies the inputs (file contents, split rule, tokenizer) the cache was made from."""
        return self.meta["fingerprint"]


def _write_split(path: Path, docs: list[list[int]]) -> int:
    """Write the concatenated ids of ``docs`` to ``path`` as ``uint16``; returns the token count."""
    n = sum(len(d) for d in docs)
    tmp = path.with_suffix(f".{os.getpid()}.tmp.npy")  # per process: ranks that do not see rank 0's cache write theirs
    arr = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint16, shape=(n,))
    pos = 0
    for d in docs:
        arr[pos : pos + len(d)] = d
        pos += len(d)
    arr.flush()
    del arr
    tmp.replace(path)
    return n


def encode_files(tokenizer, files: Sequence[Path], progress: Callable[[str], None] | None = None) -> list[list[int]]:
    """Each file's ids with ``<|endoftext|>`` appended (one document per file), as training reads them."""
    eos = tokenizer.eos_token_id
    docs = []
    for f in files:
        if progress is not None:
            progress(f"tokenizing {f.name}")
        docs.append([*tokenizer.encode(read_text(f)), eos])
    return docs


def prepare(
    data: str | Path,
    cache_dir: str | Path,
    block_size: int,
    val_data: str | Path | None = None,
    val_fraction: float = 0.1,
    seed: int = 0,
    tokenizer=None,
    progress: Callable[[str], None] | None = None,
) -> TokenData:
    """Tokenize ``data`` (a file or a folder) once into ``cache_dir`` and return both splits as memmaps.

    The held-out split is ``val_data``, else whole files of a folder, else the tail of a single file (see the module
    docstring).  Both splits must hold more than ``block_size`` tokens: a :class:`DataError` says which one is short
    (and files too small to hold a block are refused by their size before anything is tokenized, since a token is at
    least one byte).  ``tokenizer`` defaults to :meth:`gpt2fast.tokenizer.Tokenizer.default`; its vocabulary must fit
    in ``uint16``.  ``progress(message)`` is called as files are tokenized.
    """
    from gpt2fast.tokenizer import Tokenizer

    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must lie in (0, 1), got {val_fraction}")
    files = find_text_files(data, "--data")
    val_files = find_text_files(val_data, "--val-data") if val_data is not None else None
    need = block_size + 1
    for arg, group in (("--data", files), ("--val-data", val_files)):
        if group is None:
            continue
        size = sum(f.stat().st_size for f in group)
        if size < need:
            raise DataError(f"{arg}: {size} bytes of text is shorter than one block of {block_size} tokens")
    tokenizer = Tokenizer.default() if tokenizer is None else tokenizer
    if tokenizer.vocab_size > np.iinfo(np.uint16).max + 1:
        raise ValueError(f"a vocabulary of {tokenizer.vocab_size} ids does not fit the uint16 token cache")
    if val_files is not None:
        rule = "val_data"
    elif len(files) >= 2:
        rule = f"files:{val_fraction}:{seed}"
    else:
        rule = f"tail:{val_fraction}"
    fingerprint = _fingerprint(
        [CACHE_VERSION, rule, tokenizer.vocab_size, tokenizer.encode("Fingerprint, thou art"), "val"],
        [*files, *(val_files or [])],
    )
    directory = Path(cache_dir) / fingerprint[:16]
    meta_path = directory / "meta.json"
    if not meta_path.is_file():
        directory.mkdir(parents=True, exist_ok=True)
        train_files = files
        if val_files is None and len(files) >= 2:
            train_files, val_files = split_files(files, val_fraction, seed)
        if val_files is not None:
            train_docs = encode_files(tokenizer, train_files, progress)
            val_docs = encode_files(tokenizer, val_files, progress)
        else:  # one file: its tail is held out
            ids = encode_files(tokenizer, files, progress)[0]
            cut = len(ids) - max(1, round(val_fraction * len(ids)))
            train_docs, val_docs = [ids[:cut]], [ids[cut:]]
        meta = {
            "version": CACHE_VERSION,
            "fingerprint": fingerprint,
            "split": rule,
            "vocab_size": tokenizer.vocab_size,
            "eos_token_id": tokenizer.eos_token_id,
            "train_files": [str(f) for f in train_files],
            "val_files": [str(f) for f in val_files] if val_files is not None else [f"tail of {files[0]}"],
            "n_train": _write_split(directory / "train.npy", train_docs),
            "n_val": _write_split(directory / "val.npy", val_docs),
        }
        tmp = meta_path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(meta, indent=2) + "\n")
        tmp.replace(meta_path)  # the cache counts as written only once meta.json is there
    return open_cache(directory, block_size)


def open_cache(directory: str | Path, block_size: int) -> TokenData:
    """Open a cache written by :func:`prepare`; both splits must hold more than ``block_size`` tokens."""
    directory = Path(directory)
    meta = json.loads((directory / "meta.json").read_text())
    train = np.load(directory / "train.npy", mmap_mode="r")
    val = np.load(directory / "val.npy", mmap_mode="r")
    for name, arr in (("training", train), ("held-out", val)):
        if len(arr) < block_size + 1:
            hint = " (give more text, a larger --val-fraction or --val-data)" if name == "held-out" else ""
            raise DataError(f"the {name} split has {len(arr)} tokens, shorter than one block of {block_size} + 1{hint}")
    return TokenData(train, val, meta, directory)


# ---- windows -----------------------------------------------------------------------------------------------------
def window_starts(n_tokens: int, block_size: int) -> np.ndarray:
    """Start offsets of the windows of ``block_size`` tokens that overlap by one token and fit in ``n_tokens``."""
    step = block_size - 1
    return np.arange(0, n_tokens - block_size + 1, step, dtype=np.int64)


def gather_windows(tokens: np.ndarray, starts: Sequence[int] | np.ndarray, block_size: int) -> torch.Tensor:
    """The windows at ``starts`` as an int64 tensor ``[len(starts), block_size]``."""
    rows = [np.asarray(tokens[s : s + block_size], dtype=np.int64) for s in starts]
    return torch.from_numpy(np.stack(rows)) if rows else torch.empty(0, block_size, dtype=torch.int64)


def eval_starts(n_tokens: int, block_size: int, max_tokens: int | None) -> np.ndarray:
    """The held-out windows an evaluation reads: all of them, or ``ceil(max_tokens / block_size)`` spread evenly
    over the split (the same ones at every evaluation, so the curve compares like with like)."""
    starts = window_starts(n_tokens, block_size)
    if max_tokens is None or max_tokens <= 0:
        return starts
    k = min(len(starts), math.ceil(max_tokens / block_size))
    return starts[np.linspace(0, len(starts) - 1, k).round().astype(np.int64)]


class WindowSampler:
    """Training windows in epochs: each epoch is a permutation of all windows seeded by ``(seed, epoch)``; a global
    batch is the next ``batch_size`` windows, running on into the next epoch.  The state is ``(epoch, cursor)``."""

    def __init__(self, n_tokens: int, block_size: int, seed: int) -> None:
        self.starts = window_starts(n_tokens, block_size)
        if len(self.starts) == 0:
            raise DataError(f"{n_tokens} training tokens hold no window of {block_size}")
        self.seed, self.epoch, self.cursor = seed, 0, 0
        self._perm: np.ndarray | None = None

    def _permutation(self) -> np.ndarray:
        if self._perm is None:
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
            self._perm = torch.randperm(len(self.starts), generator=gen).numpy()
        return self._perm

    def next_batch(self, batch_size: int) -> np.ndarray:
        """The start offsets of the next global batch of ``batch_size`` windows."""
        out = []
        while len(out) < batch_size:
            perm = self._permutation()
            take = min(batch_size - len(out), len(perm) - self.cursor)
            out.extend(self.starts[perm[self.cursor : self.cursor + take]])
            self.cursor += take
            if self.cursor == len(perm):
                self.epoch, self.cursor, self._perm = self.epoch + 1, 0, None
        return np.asarray(out, dtype=np.int64)

    @property
    def windows_per_epoch(self) -> int:
        """How many windows one epoch holds."""
        return len(self.starts)

    def state_dict(self) -> dict:
        """``{"epoch", "cursor", "seed", "windows"}``: where the next batch starts."""
        return {"epoch": self.epoch, "cursor": self.cursor, "seed": self.seed, "windows": len(self.starts)}

    def load_state_dict(self, state: dict) -> None:
        """Continue from a :meth:`state_dict` of a sampler over the same data and block size."""
        if state["windows"] != len(self.starts) or state["seed"] != self.seed:
            raise ValueError("the data position was saved for other data, block size or seed")
        self.epoch, self.cursor, self._perm = int(state["epoch"]), int(state["cursor"]), None
