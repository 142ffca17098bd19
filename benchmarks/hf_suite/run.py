"""Run transformers' GPT-2 model tests unpatched and patched by gpt2fast, and compare them test by test.

    python benchmarks/hf_suite/run.py TESTS_ROOT [--backends reference,triton] [--out results.json] [-- PYTEST_ARGS]

``TESTS_ROOT`` is a directory holding a transformers ``tests/`` tree (``tests/models/gpt2/test_modeling_gpt2.py``
and the common mixins it imports); see README.md for how to assemble one.  Each run is a separate pytest process
with ``gpt2fast_hf_plugin`` loaded.  The report lists, per backend, the pass/fail/skip counts next to the
unpatched run's and every test that fails patched but not unpatched (the "done when" of issue 16 is that this
list is empty), plus the gpt2fast ops the patched run reached.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET
from collections import Counter
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
TEST_FILE = "tests/models/gpt2/test_modeling_gpt2.py"


def outcomes(junit: Path) -> dict[str, str]:
    """``{test id: passed | failed | error | skipped}`` from a JUnit XML report."""
    out = {}
    for case in ET.parse(junit).getroot().iter("testcase"):
        name = f"{case.get('classname')}::{case.get('name')}"
        kinds = {child.tag for child in case}
        out[name] = next((k for k in ("failure", "error", "skipped") if k in kinds), "passed")
        out[name] = {"failure": "failed"}.get(out[name], out[name])
    return out


def run_suite(root: Path, backend: str, timeout: int, extra: list[str], workdir: Path) -> tuple[dict, dict]:
    """One pytest run of the GPT-2 tests with ``--gpt2fast-backend backend``: (outcomes, plugin stats)."""
    junit, stats = workdir / f"{backend}.xml", workdir / f"{backend}.json"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(HERE), str(REPO), os.environ.get("PYTHONPATH", "")]))
    cmd = [
        sys.executable, "-m", "pytest", TEST_FILE, "-q", "-p", "no:cacheprovider", "-p", "gpt2fast_hf_plugin",
        f"--gpt2fast-backend={backend}", f"--gpt2fast-stats={stats}", f"--junitxml={junit}",
        f"--timeout={timeout}", *extra,
    ]  # fmt: skip
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, cwd=root, env=env, check=False)
    if not junit.exists():
        raise SystemExit(f"the {backend} run wrote no report ({junit}); see its output above")
    return outcomes(junit), (json.loads(stats.read_text()) if stats.exists() else {})


def reached_ops(stats: dict) -> dict[str, int]:
    """How many tests reached each gpt2fast route (``site:gpt2fast.<op>``)."""
    tests: Counter = Counter()
    for routes in stats.get("per_test", {}).values():
        for route in routes:
            if ":gpt2fast." in route:
                tests[route] += 1
    return dict(sorted(tests.items()))


def main(argv: list[str] | None = None) -> int:
    """Run the unpatched suite and each patched one; print and (``--out``) save the comparison."""
    argv = sys.argv[1:] if argv is None else argv
    extra = argv[argv.index("--") + 1 :] if "--" in argv else []
    argv = argv[: argv.index("--")] if "--" in argv else argv
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("root", type=Path, help="directory holding transformers' tests/ tree")
    p.add_argument("--backends", default="reference,triton", help="patched runs, comma-separated")
    p.add_argument("--timeout", type=int, default=300, help="per-test timeout, seconds (pytest-timeout)")
    p.add_argument("--out", type=Path, help="write the comparison as JSON")
    p.add_argument("--workdir", type=Path, help="keep each run's JUnit XML and call counts here (default: a temp dir)")
    args = p.parse_args(argv)
    if not (args.root / TEST_FILE).exists():
        p.error(f"{args.root / TEST_FILE} does not exist; see benchmarks/hf_suite/README.md")
    with tempfile.TemporaryDirectory() as tmp:
        work = args.workdir or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        base, _ = run_suite(args.root, "none", args.timeout, extra, work)
        report = {"unpatched": dict(Counter(base.values())), "patched": {}}
        for backend in args.backends.split(","):
            got, stats = run_suite(args.root, backend, args.timeout, extra, work)
            new = sorted(t for t, o in got.items() if o in ("failed", "error") and base.get(t) == "passed")
            fixed = sorted(t for t, o in got.items() if o == "passed" and base.get(t) in ("failed", "error"))
            report["patched"][backend] = {
                "counts": dict(Counter(got.values())),
                "new_failures": new,
                "passing_only_patched": fixed,
                "tests_reaching": reached_ops(stats),
                "calls": stats.get("totals", {}),
                "implementations": stats.get("implementations", {}),
            }
    print(json.dumps(report, indent=1))
    if args.out:
        args.out.write_text(json.dumps(report, indent=1) + "\n")
    return 1 if any(r["new_failures"] for r in report["patched"].values()) else 0


if __name__ == "__main__":
    raise SystemExit(main())
