"""Benchmarks of gpt2fast: per-kernel sweeps against the strongest baselines, and end-to-end generation.

* :mod:`gpt2fast.bench.kernels` -- each op on each backend vs torch eager, torch.compile, SDPA, flash_attn
* :mod:`gpt2fast.bench.e2e` -- generation vs transformers (eager, static cache + compile, patched)
* :mod:`gpt2fast.bench.timing` -- do_bench / do_bench_cudagraph on GPU, a perf_counter timer on CPU
* :mod:`gpt2fast.bench.roofline` -- exact byte/FLOP counts and the peaks measured in the same run
* :mod:`gpt2fast.bench.results` -- the JSON document (schema, metadata, validation)
* :mod:`gpt2fast.bench.report` / :mod:`gpt2fast.bench.plots` -- markdown tables and PNG plots
* :mod:`gpt2fast.bench.cli` -- ``gpt2fast bench kernels`` / ``gpt2fast bench e2e``
"""
