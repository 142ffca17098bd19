"""Markdown summary of a results JSON: ``python -m gpt2fast.bench.report results.json [more.json ...]``.

Kernel documents give one table per op (a row per shape and dtype, a column per
provider: median time, the op's figure of merit and the parity verdict); e2e
documents give one table of prefill/decode figures per provider; train documents, one row per training-step or
component record (``gpt2fast.bench.train.markdown``).
"""

from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from pathlib import Path

from gpt2fast.bench.results import load_json
from gpt2fast.bench.roofline import compute_bound

OWN = "gpt2fast:"


def _fmt(x: float | None, digits: int = 3) -> str:
    if x is None or isinstance(x, str):
        return "–"
    if abs(x) >= 100:
        return f"{x:.0f}"
    return f"{x:.{digits}g}"


def _shape_text(shape: dict) -> str:
    return " ".join(f"{k}={v}" for k, v in shape.items())


def _cell(rec: dict, flops: bool) -> str:
    """One provider's cell: time, TFLOP/s (``flops``: a compute-bound op) or GB/s with % of the measured peak,
    and the check verdict."""
    if rec["error"] is not None:
        return "error" if not rec["error"].startswith(("unavailable", "skipped")) else "n/a"
    t = rec["time"]["median_ms"]
    if flops:
        fig = f"{_fmt(rec['tflops'])} TF/s ({_fmt(rec['pct_matmul_peak'])}%)"
    else:
        fig = f"{_fmt(rec['gbps'])} GB/s ({_fmt(rec['pct_copy_bw'])}%)"
    check = rec.get("check") or {}
    verdict = "" if check.get("ok", True) else " **WRONG**"
    return f"{_fmt(t)} ms, {fig}{verdict}"


def kernels_markdown(doc: dict) -> str:
    """Markdown for a ``kind == "kernels"`` document."""
    lines = [_header(doc)]
    by_op: dict[str, list[dict]] = defaultdict(list)
    for rec in doc["records"]:
        by_op[rec["op"]].append(rec)
    for op, recs in by_op.items():
        provs = list(dict.fromkeys(r["provider"] for r in recs if r["provider"] != "(case)"))
        flops = compute_bound(recs)
        rows: dict[tuple[str, str], dict[str, dict]] = defaultdict(dict)
        for r in recs:
            rows[(_shape_text(r["shape"]), r["dtype"])][r["provider"]] = r
        best_base = "best baseline speedup"
        lines += ["", f"### {op}", "", "| shape | dtype | " + " | ".join(provs) + f" | {best_base} |"]
        lines.append("|" + "---|" * (len(provs) + 3))
        for (shape, dtype), per in rows.items():
            cells = [_cell(per[p], flops) if p in per else "–" for p in provs]
            lines.append(f"| {shape} | {dtype} | " + " | ".join(cells) + f" | {_best_speedup(per)} |")
    failures = [r for r in doc["records"] if r["error"] and not r["error"].startswith(("unavailable", "skipped"))]
    wrong = [r for r in doc["records"] if r.get("check") and not r["check"]["ok"]]
    lines += ["", f"Failed provider runs: {len(failures)}; outputs failing the parity check: {len(wrong)}."]
    for r in wrong:
        lines.append(f"- WRONG: {r['op']} {r['provider']} {r['dtype']} {_shape_text(r['shape'])}: {r['check']}")
    seen = set()
    for r in failures:
        key = (r["op"], r["provider"], r["error"])
        if key not in seen:
            seen.add(key)
            lines.append(f"- error: {r['op']} {r['provider']}: {r['error']}")
    return "\n".join(lines) + "\n"


def _best_speedup(per: dict[str, dict]) -> str:
    """The fastest gpt2fast backend's speedup over the fastest baseline of a row."""
    own = [r for p, r in per.items() if p.startswith(OWN) and p != OWN + "reference" and r["time"]]
    base = [r for p, r in per.items() if (not p.startswith(OWN) or p == OWN + "reference") and r["time"]]
    if not own or not base:
        return "–"
    fast = min(own, key=lambda r: r["time"]["median_ms"])
    best = min(base, key=lambda r: r["time"]["median_ms"])
    ratio = best["time"]["median_ms"] / fast["time"]["median_ms"]
    return f"{ratio:.2f}x ({fast['provider'][len(OWN) :]} vs {best['provider']})"


def e2e_markdown(doc: dict) -> str:
    """Markdown for a ``kind == "e2e"`` document."""
    lines = [_header(doc), ""]
    cols = ["size", "batch", "provider", "prefill ms", "decode ms/tok", "decode tok/s", "e2e tok/s"]
    cols += ["roofline", "launches"]
    lines += ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in doc["records"]:
        if r["error"] is not None:
            lines.append(f"| {r['size']} | {r['batch']} | {r['provider']} | error: {r['error'][:80]} |" + " |" * 5)
            continue
        roof = r["roofline_fraction"]
        vals = [
            r["size"],
            r["batch"],
            r["provider"],
            _fmt(r["prefill_ms"]),
            _fmt(r["decode_ms_per_token"]),
            _fmt(r["decode_tokens_per_s"]),
            _fmt(r["e2e_tokens_per_s"]),
            "–" if roof is None else f"{100 * roof:.1f}%",
            _fmt(r["launches_per_step"]),
        ]
        lines.append("| " + " | ".join(str(v) for v in vals) + " |")
    return "\n".join(lines) + "\n"


def _header(doc: dict) -> str:
    m, p = doc["meta"], doc.get("peaks") or {}
    head = f"## gpt2fast {doc['kind']} benchmark — {m['device_name']} ({m['device']})\n\n"
    head += (
        f"torch {m['torch']}, triton {m['triton']}, transformers {m['transformers']}, CUDA {m['cuda']}, "
        f"commit {m['git_commit']}, {m['date']}, host {m['host']}"
    )
    if p:
        head += (
            f"\n\nMeasured peaks: copy {_fmt(p['copy_gbps'])} GB/s, "
            f"{p['matmul_dtype']} matmul {_fmt(p['matmul_tflops'])} TFLOP/s."
        )
    if m.get("triton_interpret"):
        head += "\n\nTRITON_INTERPRET=1: Triton timings are of the interpreter and mean nothing."
    return head


def markdown(doc: dict) -> str:
    """Markdown summary of any results document."""
    if doc["kind"] == "train":
        from gpt2fast.bench.train import markdown as train_markdown

        return train_markdown(doc)
    return kernels_markdown(doc) if doc["kind"] == "kernels" else e2e_markdown(doc)


def main(argv: list[str] | None = None) -> int:
    """Print (or write with ``-o``) the markdown summary of one or more results files."""
    ap = argparse.ArgumentParser(prog="python -m gpt2fast.bench.report", description=__doc__.splitlines()[0])
    ap.add_argument("paths", nargs="+", type=Path, help="results JSON files")
    ap.add_argument("-o", "--output", type=Path, help="write the markdown here instead of stdout")
    args = ap.parse_args(argv)
    try:
        text = "\n".join(markdown(load_json(p)) for p in args.paths)
    except (OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.output:
        args.output.write_text(text)
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
