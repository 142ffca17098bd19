"""Benchmarks of gpt2fast: per-kernel sweeps against the strongest baselines, and end-to-end generation.

* :mod:`gpt2fast.bench.kernels` -- every registered op (cases, inputs, traffic, check slice and baselines from
  its spec) on each backend vs its baselines and torch.compile
* :mod:`gpt2fast.bench.e2e` -- generation vs transformers (eager, static cache + compile, patched)
* :mod:`gpt2fast.bench.serve` -- a bounded load test of ``gpt2fast serve`` against one transformers ``generate``
  per request behind the same HTTP layer (its own parser: ``gpt2fast bench serve``)
* :mod:`gpt2fast.bench.timing` -- do_bench / do_bench_cudagraph on GPU, a perf_counter timer on CPU
* :mod:`gpt2fast.bench.roofline` -- model-level byte counts and the peaks measured in the same run
* :mod:`gpt2fast.bench.results` -- the JSON document (schema, metadata, validation)
* :mod:`gpt2fast.bench.report` / :mod:`gpt2fast.bench.plots` -- markdown tables and PNG plots

The command line (``gpt2fast bench kernels`` / ``gpt2fast bench e2e``) is :mod:`gpt2fast.cli.bench`.
"""
