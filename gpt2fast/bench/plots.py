"""PNG plots of a kernel results document, in the style of ``triton.testing.perf_report``.

One figure per (op, dtype, group): x is the swept dimension on a log axis, one
line per provider, y is GB/s for memory-bound ops and TFLOP/s for compute-bound ones
(:func:`gpt2fast.bench.roofline.compute_bound`: prefill attention).  A dashed line marks
the measured copy bandwidth (or matmul peak).
"""

from __future__ import annotations

import re
import sys
from collections import defaultdict
from pathlib import Path


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "_", text).strip("_")


def plot_kernels(doc: dict, out_dir: str | Path) -> list[Path]:
    """Write one PNG per (op, dtype, group) into ``out_dir``; returns the paths written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from gpt2fast.bench.roofline import compute_bound

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    peaks = doc.get("peaks") or {}
    groups: dict[tuple[str, str, str, str], list[dict]] = defaultdict(list)
    by_op: dict[str, list[dict]] = defaultdict(list)
    for r in doc["records"]:
        by_op[r["op"]].append(r)
        if r["time"] is not None:
            groups[(r["op"], r["dtype"], r["group"], r["sweep"])].append(r)
    flops_ops = {op for op, recs in by_op.items() if compute_bound(recs)}
    written = []
    for (op, dtype, group, sweep), recs in sorted(groups.items()):
        flops = op in flops_ops
        metric, label = ("tflops", "TFLOP/s") if flops else ("gbps", "GB/s")
        fig, ax = plt.subplots(figsize=(6.4, 4.2))
        by_prov: dict[str, list[tuple[float, float]]] = defaultdict(list)
        for r in recs:
            by_prov[r["provider"]].append((r["shape"][sweep], r[metric]))
        for prov, pts in by_prov.items():
            pts.sort()
            wrong = any(not (r.get("check") or {}).get("ok", True) for r in recs if r["provider"] == prov)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=prov + (" (WRONG)" if wrong else ""))
        peak = peaks.get("matmul_tflops" if flops else "copy_gbps")
        if peak:
            ax.axhline(peak, linestyle="--", color="grey", label=f"measured {'matmul' if flops else 'copy'} peak")
        if all(x > 0 for pts in by_prov.values() for x, _ in pts):
            ax.set_xscale("log", base=2)
        ax.set_xlabel(sweep)
        ax.set_ylabel(label)
        ax.set_title(f"{op} {dtype} {group}")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize="small")
        fig.tight_layout()
        path = out_dir / f"{_slug(f'{op}-{dtype}-{group}')}.png"
        fig.savefig(path, dpi=90)
        plt.close(fig)
        written.append(path)
    return written


def main(argv: list[str] | None = None) -> int:
    """``python -m gpt2fast.bench.plots kernels.json OUT_DIR``: write the plots of a kernels document."""
    import argparse

    from gpt2fast.bench.results import load_json

    ap = argparse.ArgumentParser(prog="python -m gpt2fast.bench.plots", description=main.__doc__)
    ap.add_argument("path", type=Path, help="a kernels results JSON")
    ap.add_argument("out_dir", type=Path, help="directory for the PNGs")
    args = ap.parse_args(argv)
    try:
        doc = load_json(args.path)
    except (OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if doc["kind"] != "kernels":
        print(f"error: {args.path} is a {doc['kind']!r} document; plots are made from kernel results", file=sys.stderr)
        return 2
    for p in plot_kernels(doc, args.out_dir):
        print(p)
    return 0


if __name__ == "__main__":
    sys.exit(main())
