"""Per-kernel register / shared memory / spill report of the CUDA kernels, from ``ptxas -v``.

Compiles every ``csrc/*.cu`` with the same nvcc flags as ``setup.py``, once per SM target
(default sm_80 and sm_90a), prints a table and optionally writes it as JSON.  Exits non-zero
when a kernel spills (``--no-fail-on-spill`` to only report) or when a compile fails; exits 0
with a note when nvcc is missing (``--require-nvcc`` makes that a failure).

    python benchmarks/ptxas_check.py [--arch 80 --arch 90a] [--json out/ptxas.json]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import re
import shutil
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

_ENTRY = re.compile(r"Compiling entry function '([^']+)' for '(sm_\w+)'")
_SPILL = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_USED = re.compile(r"Used (\d+) registers(?:.*?, (\d+) bytes smem)?")


def load_setup():
    """Import setup.py as a module (its setup() call only runs as __main__)."""
    spec = importlib.util.spec_from_file_location("gpt2fast_setup", ROOT / "setup.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def parse_ptxas(text: str, source: str) -> list[dict]:
    """Parse ``ptxas -v`` output into one record per (kernel, arch)."""
    rows: list[dict] = []
    cur: dict | None = None
    for line in text.splitlines():
        if m := _ENTRY.search(line):
            cur = {"source": source, "kernel": m.group(1), "arch": m.group(2), "registers": 0, "smem": 0}
            cur.update(stack=0, spill_stores=0, spill_loads=0)
            rows.append(cur)
        elif cur is not None and (m := _SPILL.search(line)):
            cur.update(stack=int(m.group(1)), spill_stores=int(m.group(2)), spill_loads=int(m.group(3)))
        elif cur is not None and (m := _USED.search(line)):
            cur.update(registers=int(m.group(1)), smem=int(m.group(2) or 0))
    return rows


def demangle(names: list[str]) -> dict[str, str]:
    """Mangled -> readable names via c++filt when present (else identity)."""
    tool = shutil.which("c++filt")
    if not tool or not names:
        return {n: n for n in names}
    out = subprocess.run([tool], input="\n".join(names), capture_output=True, text=True, check=True).stdout
    return dict(zip(names, out.splitlines()))


def compile_one(cmd: list[str]) -> tuple[int, str]:
    """Run one nvcc compile; (returncode, stderr+stdout)."""
    proc = subprocess.run(cmd, capture_output=True, text=True)
    return proc.returncode, proc.stdout + proc.stderr


def main(argv: list[str] | None = None) -> int:
    """Compile, report, and return the exit status."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", action="append", help="SM target, repeatable (default: 80 and 90a)")
    ap.add_argument("--json", type=Path, help="write the table as JSON here")
    ap.add_argument("--fail-on-spill", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--require-nvcc", action="store_true", help="fail (instead of skipping) without nvcc")
    ap.add_argument("--jobs", type=int, default=2)
    args = ap.parse_args(argv)

    setup_mod = load_setup()
    nvcc = setup_mod.find_nvcc()
    if nvcc is None:
        print("ptxas_check: nvcc not found (or GPT2FAST_NO_CUDA set); nothing checked")
        return 1 if args.require_nvcc else 0
    archs = setup_mod.parse_archs(";".join(args.arch or ["80", "90a"]))

    jobs = []
    with tempfile.TemporaryDirectory() as tmp:
        for arch in archs:
            base = setup_mod.nvcc_compile_command(nvcc, [arch])
            # Only the SASS target: drop the PTX-only gencode (ptxas does not run on it).
            base = [a for a in base if not a.endswith(f"code=compute_{arch}")]
            for src in setup_mod.cuda_sources():
                obj = Path(tmp) / f"{src.stem}.sm_{arch}.o"
                jobs.append((src.name, [*base, "-Xptxas", "-v", "-c", str(src), "-o", str(obj)]))
        with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
            results = list(pool.map(lambda job: compile_one(job[1]), jobs))

    rows: list[dict] = []
    failed = False
    for (name, cmd), (rc, text) in zip(jobs, results):
        if rc != 0:
            failed = True
            print(f"ptxas_check: compile failed: {' '.join(cmd)}\n{text}", file=sys.stderr)
        rows.extend(parse_ptxas(text, name))
    names = demangle(sorted({r["kernel"] for r in rows}))
    for r in rows:
        r["name"] = names.get(r["kernel"], r["kernel"])
    rows.sort(key=lambda r: (r["arch"], r["source"], r["name"]))

    print(f"{'arch':<8} {'regs':>4} {'smem':>6} {'stack':>5} {'spill st/ld':>11}  kernel")
    for r in rows:
        spill = f"{r['spill_stores']}/{r['spill_loads']}"
        print(f"{r['arch']:<8} {r['registers']:>4} {r['smem']:>6} {r['stack']:>5} {spill:>11}  {r['name']}")
    spilling = [r for r in rows if r["spill_stores"] or r["spill_loads"]]
    print(f"{len(rows)} kernels for {', '.join('sm_' + a for a in archs)}; {len(spilling)} spill")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"archs": archs, "kernels": rows}, indent=1))
    if failed:
        return 1
    if not rows:
        print("ptxas_check: no kernel reported by ptxas", file=sys.stderr)
        return 1
    if spilling and args.fail_on_spill:
        print("ptxas_check: register spills (see table); fix them or pass --no-fail-on-spill", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
