"""The results document: run metadata, schema version, validation and writing.

One JSON document per run (``kind`` is ``"kernels"``, ``"e2e"``, ``"train"`` or ``"serve"``)::

    {"schema": "gpt2fast.bench", "schema_version": 1, "kind": "kernels",
     "meta": {...run metadata...}, "peaks": {...measured peaks...}, "records": [...]}

The record fields of each kind are listed in :data:`RECORD_FIELDS` and documented
in ``benchmarks/README.md``.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import socket
import subprocess
from pathlib import Path

import torch

SCHEMA = "gpt2fast.bench"
SCHEMA_VERSION = 1

#: Required fields of a record, per document kind (a failed record still has them all; values may be null).
RECORD_FIELDS: dict[str, tuple[str, ...]] = {
    "kernels": (
        "op",
        "provider",
        "dtype",
        "shape",
        "sweep",
        "group",
        "error",
        "time",
        "bytes",
        "flops",
        "gbps",
        "tflops",
        "pct_copy_bw",
        "pct_matmul_peak",
        "speedup",
        "check",
    ),
    "e2e": (
        "size",
        "provider",
        "dtype",
        "batch",
        "prompt",
        "new",
        "error",
        "prefill_ms",
        "decode_ms_per_token",
        "decode_tokens_per_s",
        "e2e_tokens_per_s",
        "step_bytes",
        "roofline_fraction",
        "launches_per_step",
        "speedup",
    ),
    "train": (  # gpt2fast/bench/train.py: "step" records (a training step) and its component records
        "case",
        "provider",
        "size",
        "shape",
        "autocast",
        "dropout",
        "error",
        "time",
        "step_ms",
        "tokens_per_s",
        "peak_mem_bytes",
        "loss",
        "ratios",
        "ops_dispatched",
    ),
    # gpt2fast.bench.serve: one record per engine and concurrency level (a failed engine: concurrency null)
    "serve": ("engine", "concurrency", "error"),
}

TIME_FIELDS = ("median_ms", "p20_ms", "p80_ms", "timer")
META_FIELDS = ("device", "device_name", "torch", "triton", "transformers", "cuda", "git_commit", "date", "host")


def _version(module: str) -> str | None:
    try:
        mod = __import__(module)
    except Exception:
        return None
    return getattr(mod, "__version__", None)


def git_commit() -> str | None:
    """The repository's HEAD commit (with ``-dirty`` if the tree has changes), or None."""
    root = Path(__file__).resolve().parents[2]
    try:
        head = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
    except Exception:
        return None
    return head + ("-dirty" if dirty else "")


def run_metadata(device: torch.device) -> dict:
    """Who/where/when of a run: device, library versions, git commit, UTC date, host."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        props = torch.cuda.get_device_properties(device)
        extra = {"capability": f"{props.major}.{props.minor}", "sm_count": props.multi_processor_count}
    else:
        name = platform.processor() or platform.machine()
        extra = {"threads": torch.get_num_threads()}
    return {
        "device": str(device),
        "device_name": name,
        "torch": torch.__version__,
        "triton": _version("triton"),
        "transformers": _version("transformers"),
        "cuda": torch.version.cuda,
        "git_commit": git_commit(),
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "host": socket.gethostname(),
        "python": platform.python_version(),
        "triton_interpret": os.environ.get("TRITON_INTERPRET") == "1",
        **extra,
    }


def new_document(kind: str, meta: dict, peaks: dict | None) -> dict:
    """An empty results document of ``kind`` ("kernels", "e2e" or "train")."""
    if kind not in RECORD_FIELDS:
        raise ValueError(f"kind must be one of {sorted(RECORD_FIELDS)}, got {kind!r}")
    return {
        "schema": SCHEMA,
        "schema_version": SCHEMA_VERSION,
        "kind": kind,
        "meta": meta,
        "peaks": peaks,
        "records": [],
    }


def validate(doc: dict) -> None:
    """Raise ``ValueError`` naming the first field that breaks the schema."""
    if not isinstance(doc, dict):
        raise ValueError(f"a results document must be a JSON object, got {type(doc).__name__}")
    if doc.get("schema") != SCHEMA:
        raise ValueError(f"schema must be {SCHEMA!r}, got {doc.get('schema')!r}")
    if doc.get("schema_version") != SCHEMA_VERSION:
        raise ValueError(f"schema_version must be {SCHEMA_VERSION}, got {doc.get('schema_version')!r}")
    kind = doc.get("kind")
    if kind not in RECORD_FIELDS:
        raise ValueError(f"kind must be one of {sorted(RECORD_FIELDS)}, got {kind!r}")
    meta = doc.get("meta")
    if not isinstance(meta, dict):
        raise ValueError("meta must be an object")
    for key in META_FIELDS:
        if key not in meta:
            raise ValueError(f"meta.{key} is missing")
    records = doc.get("records")
    if not isinstance(records, list):
        raise ValueError("records must be a list")
    for i, rec in enumerate(records):
        for key in RECORD_FIELDS[kind]:
            if key not in rec:
                raise ValueError(f"records[{i}].{key} is missing")
        if rec["error"] is not None and not isinstance(rec["error"], str):
            raise ValueError(f"records[{i}].error must be null or a string")
        if kind == "kernels" and rec["error"] is None:
            t = rec["time"]
            if not isinstance(t, dict) or any(k not in t for k in TIME_FIELDS):
                raise ValueError(f"records[{i}].time must hold {TIME_FIELDS}")
            if not (t["p20_ms"] <= t["median_ms"] <= t["p80_ms"]):
                raise ValueError(f"records[{i}].time quantiles are out of order: {t}")


def write_json(doc: dict, path: str | Path) -> None:
    """Write ``doc`` atomically (a partial run still leaves a valid file behind)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(doc, indent=1, default=str))
    tmp.replace(path)


def load_json(path: str | Path) -> dict:
    """Read and validate a results document."""
    doc = json.loads(Path(path).read_text())
    validate(doc)
    return doc
