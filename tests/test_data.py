"""gpt2fast.data: the token cache, the held-out split, the windows and the resumable sampler."""

from __future__ import annotations

import json

import numpy as np
import pytest

from gpt2fast import data
from gpt2fast.tokenizer import Tokenizer


def _write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_single_file_tail_split_and_cache_reuse(tmp_path):
    text = "".join(f"Line {i}: to be, or not to be, that is the question.\n" for i in range(200))
    f = _write(tmp_path / "a.txt", text)
    tok = Tokenizer.default()
    td = data.prepare(f, tmp_path / "cache", 16, val_fraction=0.1, tokenizer=tok)
    ids = [*tok.encode(text), tok.eos_token_id]
    assert td.train.dtype == np.uint16 and td.meta["split"] == "tail:0.1"
    assert td.train.tolist() + td.val.tolist() == ids  # nothing lost, nothing reordered
    assert len(td.val) == round(0.1 * len(ids))
    mtime = (td.directory / "train.npy").stat().st_mtime_ns
    again = data.prepare(f, tmp_path / "cache", 16, val_fraction=0.1, tokenizer=tok)
    assert again.directory == td.directory and (td.directory / "train.npy").stat().st_mtime_ns == mtime
    f.write_text(text + "More.\n")  # other contents: another cache
    assert data.prepare(f, tmp_path / "cache", 16, val_fraction=0.1, tokenizer=tok).directory != td.directory


def test_folder_holds_out_whole_files(tmp_path):
    for i in range(10):
        _write(tmp_path / "d" / f"work{i}.txt", f"Work {i}. " * 300)
    _write(tmp_path / "d" / ".hidden" / "x.txt", "never read " * 100)
    _write(tmp_path / "d" / "notes.md", "not a .txt file " * 100)
    td = data.prepare(tmp_path / "d", tmp_path / "cache", 32, val_fraction=0.2, seed=3)
    train, val = td.meta["train_files"], td.meta["val_files"]
    assert len(train) + len(val) == 10 and not set(train) & set(val)
    assert len(val) == 2  # equal sizes: two files reach 20%
    assert not any(".hidden" in f or f.endswith(".md") for f in train + val)
    assert json.loads((td.directory / "meta.json").read_text())["n_val"] == len(td.val)


def test_explicit_val_data(tmp_path):
    a = _write(tmp_path / "train.txt", "Thou art more lovely and more temperate. " * 40)
    b = _write(tmp_path / "val.txt", "Rough winds do shake the darling buds of May. " * 20)
    td = data.prepare(a, tmp_path / "cache", 16, val_data=b)
    tok = Tokenizer.default()
    assert td.val.tolist() == [*tok.encode(b.read_text()), tok.eos_token_id]


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda p: (p.mkdir(), p)[1], r"holds no \.txt files"),
        (lambda p: _write(p / "a.txt", "").parent, "every file of the folder is empty"),
        (lambda p: p / "missing", "no such file or folder"),
        (lambda p: _write(p / "short.txt", "Too short."), "shorter than one block"),
    ],
)
def test_bad_data_is_refused_before_tokenizing(tmp_path, make, match):
    path = make(tmp_path / "data")
    with pytest.raises(data.DataError, match=match):
        data.prepare(path, tmp_path / "cache", 64)
    assert not (tmp_path / "cache").exists()


def test_a_held_out_split_shorter_than_a_block_is_refused(tmp_path):
    f = _write(tmp_path / "a.txt", "word " * 300)  # 300 tokens: a 10% tail of 30 is short of a 64-token block
    with pytest.raises(data.DataError, match=r"held-out split has 30 tokens.*--val-fraction"):
        data.prepare(f, tmp_path / "cache", 64)


def test_windows_overlap_by_one_token_and_cover_every_target():
    starts = data.window_starts(100, 10)
    assert starts.tolist() == list(range(0, 91, 9))
    tokens = np.arange(100, dtype=np.uint16)
    w = data.gather_windows(tokens, starts, 10)
    targets = sorted(int(t) for row in w for t in row[1:])  # labels = ids: every position but the first
    assert targets == list(range(1, 100))[: len(targets)] and len(set(targets)) == len(targets)
    assert data.eval_starts(100, 10, 30).tolist() == [0, 45, 90]  # 3 windows spread over the split


def test_sampler_epochs_and_state():
    s = data.WindowSampler(1000, 10, seed=1)
    n = s.windows_per_epoch
    first_epoch = np.concatenate([s.next_batch(7) for _ in range(n // 7)] + [s.next_batch(n % 7)])
    assert sorted(first_epoch.tolist()) == s.starts.tolist() and s.state_dict()["epoch"] == 1
    s.next_batch(5)
    state = s.state_dict()
    expected = [s.next_batch(9).tolist() for _ in range(30)]  # runs across epoch boundaries
    t = data.WindowSampler(1000, 10, seed=1)
    t.load_state_dict(state)
    assert [t.next_batch(9).tolist() for _ in range(30)] == expected
    with pytest.raises(ValueError, match="other data"):
        data.WindowSampler(2000, 10, seed=1).load_state_dict(state)
