# One-command set-up on a fresh machine.  `make test` is what CI runs.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: venv test test-triton36 test-ray lint docs demo gpu-check clean

# A venv that sees the system's packages, so a GPU machine keeps its own torch.
# Without torch, install the CPU build 2.13.0 (a bare `torch` would pull a multi-GB CUDA build).
$(BIN)/activate:
	$(PY) -m venv --system-site-packages $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e ".[dev,triton,hf,bench,serve]"

venv: $(BIN)/activate

lint: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# CI: lint, build csrc (sm_80 + sm_90a) and report registers/smem/spills, the CPU test suite (Triton under its
# interpreter, GPU tests skipped), the Triton sm_80/sm_90 compile check, and the one-shot GPU script's dry run.
test: venv lint
	$(BIN)/python setup.py -q build_ext --inplace
	$(BIN)/python benchmarks/ptxas_check.py --json out/ptxas.json
	$(BIN)/python -m pytest -q -n 2 tests
	$(BIN)/python benchmarks/compile_check.py --json out/compile_check.json
	$(MAKE) test-triton36
	bash benchmarks/gpu_check.sh --dry-run

# The lent GPU machine runs triton 3.6 while CI gets the newest triton: run the Triton tests (the backend's
# internals, which run every custom op through opcheck, and the model on it) and the compile check under 3.6 too (its
# interpreter needs numpy < 2.4), so an API drift shows up here first; that machine is an H200, so 3.6 compiles
# for sm_90 only (3.9 compiles for sm_80 and sm_90 above).  The suites run on 2 xdist workers (CI's 15 minutes).
TRITON36 ?= .triton36
$(TRITON36)/triton:
	$(BIN)/python -m pip install -q --no-deps --target $(TRITON36) triton==3.6.0 "numpy<2.4"

test-triton36: venv $(TRITON36)/triton
	PYTHONPATH=$(TRITON36) $(BIN)/python -m pytest -q -n 2 tests/test_triton_internals.py tests/test_triton_model.py
	PYTHONPATH=$(TRITON36) $(BIN)/python benchmarks/compile_check.py --targets 90 --json out/compile_check_triton36.json

# The Ray Serve deployment on a local Ray cluster on loopback (opt-in: Ray is ~350 MB with its dependencies, so it
# is installed beside the venv, not into it, and CI does not run this).
RAYDIR ?= .ray
$(RAYDIR)/ray:
	$(BIN)/python -m pip install -q --target $(RAYDIR) "ray[serve]>=2.9"

test-ray: venv $(RAYDIR)/ray
	PYTHONPATH=$(RAYDIR) $(BIN)/python -m pytest -q tests/test_serve_ray.py

# Regenerate docs/bad_inputs.md from the op specs and the runtime catalogue (a test fails when it is stale).
docs: venv
	GPT2FAST_UPDATE_DOCS=1 $(BIN)/python -m pytest -q tests/test_bad_input_catalogue.py -k doc_is_current

# The shipped default model (a small GPT-2 trained on Shakespeare, gpt2fast/assets/default), then a benchmark.
demo: venv
	$(BIN)/gpt2fast generate --model default --prompt "ROMEO." --max-new-tokens 80 --do-sample --top-k 40 \
		--temperature 0.8 --seed 1 --ignore-eos
	$(BIN)/gpt2fast bench e2e --size gpt2 --batch 1 --prompt 32 --new 16

# On a lent GPU machine (no network): the script builds the extension in place itself.
gpu-check:
	bash benchmarks/gpu_check.sh out/gpu

clean:
	rm -rf $(VENV) $(TRITON36) $(RAYDIR) build out *.egg-info gpt2fast/_C*.so
