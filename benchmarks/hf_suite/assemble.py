"""Assemble a transformers ``tests/`` tree for ``run.py`` outside the repository (no transformers code is committed).

    python benchmarks/hf_suite/assemble.py DEST

1. Downloads the sdist of the installed transformers with pip and extracts its ``tests/`` (the common mixins:
   ``test_modeling_common.py``, ``test_configuration_common.py``, ``test_pipeline_mixin.py``...).
2. Writes what the sdist lacks and no test here needs (empty mixins, package markers, an empty tiny-model
   summary) and links ``DEST/src/transformers`` to the installed package (``test_pipeline_mixin`` imports it).
3. Lists the files that must still be fetched from huggingface/transformers (README.md says from where and
   what was adapted); ``run.py`` refuses to start until the GPT-2 test file is there.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

#: Files the sdist lacks that the GPT-2 tests import; fetched by hand (see README.md).
TO_FETCH = (
    "tests/models/gpt2/test_modeling_gpt2.py",
    "tests/causal_lm_tester.py",
    "tests/generation/test_utils.py",
    "tests/utils/test_configuration_utils.py",
)

_PLACEHOLDERS = {
    "tests/exporters/test_export.py": "class ExportTesterMixin:  # placeholder: contributes no tests\n    pass\n",
    "tests/distributed_testing_utils.py": (
        "# placeholder: only the multi-process mixins use these, and they do not run on one CPU\n"
        "def _unavailable(*args, **kwargs):\n    raise NotImplementedError('distributed tests are not run')\n\n\n"
        "run_distributed = _init_distributed = _get_distributed_backend = _get_distributed_device_type = "
        "_get_rank_device = _set_rank_device = _start_rank_processes = _unavailable\n"
    ),
    "tests/utils/tiny_model_summary.json": "{}\n",
}
_PACKAGES = ("tests", "tests/models", "tests/models/gpt2", "tests/generation", "tests/exporters", "tests/utils")


def main(argv: list[str] | None = None) -> int:
    """Build DEST; print what is left to fetch."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("dest", type=Path)
    args = p.parse_args(argv)
    import transformers

    version = transformers.__version__
    dest = args.dest.resolve()
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pip", "download", f"transformers=={version}", "--no-binary", ":all:"]
        subprocess.run([*cmd, "--no-deps", "-d", tmp], check=True)
        (sdist,) = Path(tmp).glob("transformers-*.tar.gz")
        prefix = f"transformers-{version}/"
        with tarfile.open(sdist) as tar:
            members = [m for m in tar.getmembers() if m.name.startswith(prefix + "tests/") and m.isfile()]
            for m in members:
                m.name = m.name[len(prefix) :]
            tar.extractall(dest, members=members, filter="data")
    for pkg in _PACKAGES:
        (dest / pkg).mkdir(parents=True, exist_ok=True)
        (dest / pkg / "__init__.py").touch()
    for rel, text in _PLACEHOLDERS.items():
        if not (dest / rel).exists():
            (dest / rel).write_text(text)
    link = dest / "src" / "transformers"
    link.parent.mkdir(exist_ok=True)
    if not link.exists():
        link.symlink_to(Path(transformers.__file__).parent, target_is_directory=True)
    missing = [rel for rel in TO_FETCH if not (dest / rel).exists()]
    print(f"{dest}: tests/ of transformers {version} ({len(members)} files from the sdist)")
    for rel in missing:
        print(f"  still to fetch: {rel}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
