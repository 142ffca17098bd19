"""Fast CPU tests of the benchmark harness: byte/FLOP counting, JSON schema, parity flags, reports, CLI codes.

Speed is never asserted; these check that the figures are computed from the right counts
and that a wrong or failing provider is visible in the results.
"""

from __future__ import annotations

import json

import pytest
import torch

from gpt2fast import GPT2, GPT2Config, cli, ops
from gpt2fast.bench import kernels, report, roofline, timing
from gpt2fast.bench.results import load_json, new_document, run_metadata, validate
from gpt2fast.bench.timing import rotating_copies, summarize
from gpt2fast.ops import reference
from gpt2fast.ops._spec import BenchCase
from gpt2fast.ops.specs.decode_attention import seqlens_of

CPU = torch.device("cpu")
TINY = GPT2Config.from_name("tiny")
BUILTIN_OPS = ("layer_norm", "bias_gelu", "attention", "decode_attention", "reorder_cache")
#: The training ops whose benchmark sweeps have target shapes too.
TRAINING_OPS = ("linear_cross_entropy", "layer_norm_backward", "bias_gelu_backward", "attention_backward")
#: The fused decode path's ops (their targets: GPT-2 small's decode GEMVs).
DECODE_OPS = ("fused_linear", "fused_mlp")


def bench(*argv: str) -> int:
    """``gpt2fast bench ARGV...`` in-process; returns its exit status."""
    return cli.main(["bench", *argv])


# ---- counting ----------------------------------------------------------------------------
def _traffic(op: str, shape: dict, dtype: torch.dtype):
    return ops.get_spec(op).traffic(shape, dtype)


def test_byte_and_flop_counts_match_hand_computation():
    # LayerNorm 3x5 fp16 with residual: x, residual, y, h (4 * 15 elements) + weight, bias (2 * 5), 2 bytes each.
    assert _traffic("layer_norm", dict(rows=3, n=5, residual=True), torch.float16).bytes == 2 * (60 + 10)
    assert _traffic("layer_norm", dict(rows=3, n=5, residual=False), torch.float16).bytes == 2 * (30 + 10)
    assert _traffic("layer_norm", dict(rows=(3, 2), n=5, residual=False), torch.float16).bytes == 2 * (60 + 10)
    assert _traffic("layer_norm", dict(rows=3, n=5, residual=False), torch.float16).flops is None
    # bias+GELU 3x5 fp32: x, y (30) + bias (5), 4 bytes each.
    assert _traffic("bias_gelu", dict(rows=3, n=5), torch.float32).bytes == 4 * 35
    # Attention B=1, H=2, T=4, D=8: q, k, v, o = 4 * 64 elements; FLOPs 4*B*H*T*T*D = 1024, causal (default) half.
    attn = dict(batch=1, heads=2, seq=4, head_dim=8)
    assert _traffic("attention", attn, torch.bfloat16).bytes == 2 * 4 * 64
    assert _traffic("attention", attn | {"causal": False}, torch.bfloat16).flops == 1024
    assert _traffic("attention", attn, torch.bfloat16).flops == 512
    # Decode H=2, D=4, lengths [3, 0], fp16: K+V of 3 positions (2*2*4*3 = 48 elements), q and out (2 x 16),
    # k_new/v_new read and written (4 x 16) -> (48 + 32 + 64) elements.
    dec = dict(batch=2, heads=2, head_dim=4, t_max=8, seqlens=(3, 0))
    plain = _traffic("decode_attention", dec | {"append": False}, torch.float16)
    appending = _traffic("decode_attention", dec | {"append": True}, torch.float16)
    assert plain.extra["kv_bytes"] == appending.extra["kv_bytes"] == 2 * 48
    assert plain.bytes == 2 * (48 + 32)
    assert appending.bytes == 2 * (48 + 32 + 64)
    # attended positions (3 + 1) + (0 + 1) = 5 when appending, 3 + 0 otherwise; 4 * H * D FLOPs each.
    assert appending.flops == 4 * 2 * 4 * 5
    assert plain.flops == 4 * 2 * 4 * 3


def test_compute_bound_ops_are_read_in_tflops():
    # Prefill attention does T / (2 * itemsize) FLOPs per byte: TFLOP/s from T = 64 in fp32 (the CPU sweep's).
    attn = [dict(flops=_traffic("attention", dict(batch=1, heads=2, seq=t, head_dim=64), torch.float32).flops,
                 bytes=_traffic("attention", dict(batch=1, heads=2, seq=t, head_dim=64), torch.float32).bytes)
            for t in (1, 17, 64)]  # fmt: skip
    assert roofline.compute_bound(attn) and not roofline.compute_bound(attn[:2])
    dec = _traffic("decode_attention", dict(batch=8, heads=12, head_dim=64, cache_len=8192), torch.float16)
    assert not roofline.compute_bound([dict(flops=dec.flops, bytes=dec.bytes)])  # ~1 FLOP per byte
    assert not roofline.compute_bound([dict(flops=None, bytes=100), dict(flops=10.0, bytes=0)])


def test_decode_weight_bytes_equal_the_model_parameters():
    cfg = TINY
    model = GPT2(cfg)
    params = sum(p.numel() for p in model.parameters())
    batch = 3  # wpe: only one row per sequence is read
    expected = (params - model.wpe.weight.numel() + batch * cfg.n_embd) * 2
    assert roofline.weight_bytes_per_decode_step(cfg, batch, torch.float16) == expected
    kv = roofline.kv_bytes_per_decode_step(cfg, batch, 10, torch.float32)
    assert kv == 2 * cfg.n_layer * batch * cfg.n_head * cfg.head_dim * 10 * 4


def test_traffic_of_a_ragged_decode_case_uses_its_lengths():
    shape = {"batch": 5, "heads": 2, "cache_len": 40, "head_dim": 64, "ragged": True}
    case = BenchCase("decode_attention", shape, "batch", "g")
    lens = seqlens_of(shape)
    assert len(lens) == 5 and all(0 <= n < 40 for n in lens) and len(set(lens)) > 1
    cost = kernels.traffic(case, torch.float16)
    assert cost.extra["kv_bytes"] == 2 * 2 * 64 * sum(lens) * 2
    # q, out (2 x 5*2*64) and k_new/v_new read and written (4 x 5*2*64) besides the cached K/V.
    assert cost.bytes == cost.extra["kv_bytes"] + 6 * 5 * 2 * 64 * 2
    inp = kernels.make_inputs(case, torch.float16, CPU)
    assert inp["cache_seqlens"].tolist() == lens and inp["k_cache"].shape == (5, 2, 41, 64)


def test_sweeps():
    quick = kernels.cases("quick")
    flags = [c.target for c in quick]
    assert any(flags) and flags == sorted(flags, reverse=True)  # target cases first
    assert {c.op for c in quick if c.target} == set(BUILTIN_OPS + TRAINING_OPS + DECODE_OPS)
    assert {c.op for c in kernels.cases("cpu")} == {s.name for s in ops.specs()}
    assert {c.op for c in kernels.cases("cpu", ["attention"])} == {"attention"}
    full = kernels.cases("full")
    for case in quick + full + kernels.cases("cpu"):  # the plots' x-axis is shape[sweep]
        assert case.sweep in case.shape, (case.op, case.sweep, sorted(case.shape))
    assert {c.shape["n"] for c in full if c.op == "bias_gelu"} == {3072, 4096, 5120, 6400}
    assert max(c.shape["rows"] for c in full if c.op == "layer_norm") == 65536
    assert max(c.shape["seq"] for c in full if c.op == "attention") == 8192
    assert max(c.shape["batch"] for c in full if c.op == "decode_attention") == 256
    with pytest.raises(ValueError, match="sweep must be"):
        kernels.cases("huge")


def test_summarize_quantiles():
    t = summarize([5.0, 1.0, 3.0, 2.0, 4.0], "perf_counter")
    assert (t.median_ms, t.p20_ms, t.p80_ms) == (3.0, pytest.approx(1.8), pytest.approx(4.2))
    assert rotating_copies(1 << 20, CPU) == 1
    with pytest.raises(ValueError, match="times_ms"):
        summarize([], "perf_counter")


class _FakeTritonTesting:
    """Stands in for ``triton.testing`` (no GPU here): records calls, returns fixed quantiles."""

    def __init__(self, eager_ms: float, graph_fails: bool = False) -> None:
        self.eager_ms, self.graph_fails, self.graph_calls = eager_ms, graph_fails, 0

    def do_bench(self, fn, warmup=25, rep=100, grad_to_none=None, quantiles=None, return_mode="mean"):
        fn()
        return [self.eager_ms, 0.9 * self.eager_ms, 1.2 * self.eager_ms]

    def do_bench_cudagraph(self, fn, rep=20, grad_to_none=None, quantiles=None, return_mode="mean"):
        if self.graph_fails:
            raise RuntimeError("capture failed")
        for _ in range(5):
            fn()
            self.graph_calls += 1
        return [0.004, 0.003, 0.005]


def test_time_gpu_switches_to_a_cuda_graph_with_rotating_inputs_for_short_calls(monkeypatch):
    calls = []
    fns = [lambda i=i: calls.append(i) for i in range(3)]
    fake = _FakeTritonTesting(eager_ms=0.01)
    monkeypatch.setattr(timing, "_triton_testing", lambda: fake)
    t = timing.time_gpu(fns[0], lambda: fns)
    assert (t.timer, t.median_ms, t.p20_ms, t.p80_ms) == ("do_bench_cudagraph", 0.004, 0.003, 0.005)
    assert t.eager_median_ms == 0.01
    assert calls == [0, 0, 1, 2, 0, 1]  # one eager call, then the graph cycles through the copies
    slow = _FakeTritonTesting(eager_ms=2 * timing.CUDAGRAPH_BELOW_MS)
    monkeypatch.setattr(timing, "_triton_testing", lambda: slow)
    assert timing.time_gpu(fns[0], lambda: fns).timer == "do_bench" and slow.graph_calls == 0
    broken = _FakeTritonTesting(eager_ms=0.01, graph_fails=True)
    monkeypatch.setattr(timing, "_triton_testing", lambda: broken)
    t = timing.time_gpu(fns[0], lambda: fns)
    assert (t.timer, t.median_ms, t.p20_ms) == ("do_bench", 0.01, pytest.approx(0.009))


def test_call_bench_without_quantiles_reports_the_median():
    def old_do_bench(fn, warmup=25, rep=100, return_mode="mean"):
        assert return_mode == "median"
        return 2.5

    assert timing._call_bench(old_do_bench, lambda: None, warmup=1, rep=2, nonsense=3) == (2.5, 2.5, 2.5)


# ---- kernels -----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def kernels_doc(tmp_path_factory):
    path = tmp_path_factory.mktemp("bench") / "k.json"
    code = bench(
        "kernels", "--device", "cpu", "--op", ",".join(BUILTIN_OPS),
        "--provider", "gpt2fast:reference,torch,torch.sdpa", "--json", str(path),
    )  # fmt: skip
    assert code == 0
    return load_json(path)


def test_kernels_json_is_schema_valid_and_figures_follow_the_counts(kernels_doc):
    validate(kernels_doc)
    assert kernels_doc["kind"] == "kernels" and kernels_doc["meta"]["device"] == "cpu"
    peaks = kernels_doc["peaks"]
    assert peaks["copy_gbps"] > 0 and peaks["matmul_tflops"] > 0
    recs = kernels_doc["records"]
    expected = {(c.op, str(c.shape)) for c in kernels.cases("cpu", BUILTIN_OPS)}
    assert {(r["op"], str(r["shape"])) for r in recs} == expected
    assert {r["provider"] for r in recs} == {"gpt2fast:reference", "torch", "torch.sdpa"}
    for r in recs:
        assert r["error"] is None, r
        assert r["check"]["ok"], r
        cost = kernels.traffic(BenchCase(r["op"], r["shape"], r["sweep"], r["group"]), torch.float32)
        assert (r["bytes"], r["flops"]) == (cost.bytes, cost.flops)
        sec = r["time"]["median_ms"] * 1e-3
        assert r["gbps"] == pytest.approx(r["bytes"] / sec / 1e9)
        assert r["pct_copy_bw"] == pytest.approx(100 * r["gbps"] / peaks["copy_gbps"])
        if r["flops"]:
            assert r["tflops"] == pytest.approx(r["flops"] / sec / 1e12)
            assert r["pct_matmul_peak"] == pytest.approx(100 * r["tflops"] / peaks["matmul_tflops"])
        if r["op"] == "decode_attention":  # the spec's extra kv_bytes get their own GB/s and % of copy bandwidth
            assert r["kv_bytes"] == cost.extra["kv_bytes"]
            assert r["kv_gbps"] == pytest.approx(r["kv_bytes"] / sec / 1e9)
            assert r["pct_copy_bw_kv"] == pytest.approx(100 * r["kv_gbps"] / peaks["copy_gbps"])
    assert any(r["op"] == "attention" and r["tflops"] for r in recs)
    own = [r for r in recs if r["provider"] == "gpt2fast:reference"]
    assert all(
        set(r["speedup"]) == ({"torch"} if r["op"] in ("layer_norm", "bias_gelu", "reorder_cache") else {"torch.sdpa"})
        for r in own
    )


def _bias_gelu_case() -> BenchCase:
    return BenchCase("bias_gelu", {"rows": 5, "n": 24}, "rows", "N=24")


def test_wrong_and_failing_providers_are_recorded():
    def wrong(inp):
        return lambda: reference.bias_gelu(inp["x"], inp["bias"]) + 0.01

    def boom(inp):
        raise RuntimeError("kernel exploded")

    right = kernels._own(ops.get_spec("bias_gelu"), "reference")
    provs = {"right": right, "wrong": wrong, "boom": boom, "missing": "unavailable: x"}
    opts = kernels.Options(log=lambda _: None)
    recs = {r["provider"]: r for r in kernels.run_case(_bias_gelu_case(), torch.float32, CPU, opts, None, provs)}
    assert recs["right"]["check"]["ok"] and recs["right"]["error"] is None
    assert not recs["wrong"]["check"]["ok"] and recs["wrong"]["check"]["err"] == pytest.approx(0.01, rel=1e-3)
    assert recs["boom"]["error"] == "RuntimeError: kernel exploded" and recs["boom"]["time"] is None
    assert recs["missing"]["error"] == "unavailable: x"
    doc = new_document("kernels", run_metadata(CPU), None)
    doc["records"] = list(recs.values())
    validate(doc)
    md = report.markdown(doc)
    assert "**WRONG**" in md and "kernel exploded" in md and "| right | wrong | boom | missing |" in md


@pytest.fixture
def declining_backend():
    """A backend implementing only bias_gelu, declining rows of 24 through its ``supports`` (below reference)."""
    ops.register_backend("declining", priority=-5, is_available=lambda device: None)

    def supports(x, bias):
        return "rows of 24 are too narrow" if x.shape[-1] == 24 else None

    ops.register_impl("bias_gelu", "declining", supports=supports)(lambda x, bias: reference.bias_gelu(x, bias))
    yield "declining"
    ops.unregister_backend("declining")


def test_every_implementing_backend_is_a_provider_and_a_declined_case_is_skipped(declining_backend):
    provs = kernels.providers("bias_gelu", CPU, compile_baseline=False)
    assert [p for p in provs if p.startswith(kernels.OWN)][-2:] == ["gpt2fast:reference", "gpt2fast:declining"]
    assert provs["torch.compile"].startswith("skipped:")
    assert "gpt2fast:declining" not in kernels.providers("layer_norm", CPU, compile_baseline=False)
    opts = kernels.Options(providers=("gpt2fast:declining", "gpt2fast:reference"), log=lambda _: None)
    recs = {r["provider"]: r for r in kernels.run_case(_bias_gelu_case(), torch.float32, CPU, opts, None, provs)}
    declined = recs["gpt2fast:declining"]
    assert declined["error"] == "skipped: declining does not support this input: rows of 24 are too narrow"
    assert declined["time"] is None and declined["check"] is None
    assert recs["gpt2fast:reference"]["check"]["ok"] and recs["gpt2fast:reference"]["speedup"] == {}
    wide = BenchCase("bias_gelu", {"rows": 5, "n": 32}, "rows", "N=32")
    ran = kernels.run_case(wide, torch.float32, CPU, opts, None, provs)
    assert all(r["error"] is None and r["check"]["ok"] for r in ran)


def test_kernels_cli_returns_1_on_a_wrong_result(monkeypatch, tmp_path):
    real = kernels.providers

    def with_wrong(op, device, compile_baseline=True):
        out = real(op, device, compile_baseline)
        out["wrong"] = lambda inp: lambda: reference.bias_gelu(inp["x"], inp["bias"]) * 1.1
        return out

    monkeypatch.setattr(kernels, "providers", with_wrong)
    code = bench("kernels", "--device", "cpu", "--op", "bias_gelu", "--provider", "gpt2fast:reference,wrong",
                 "--json", str(tmp_path / "k.json"), "--plots", str(tmp_path / "plots"))  # fmt: skip
    assert code == 1
    doc = load_json(tmp_path / "k.json")
    assert {r["provider"] for r in doc["records"] if not r["check"]["ok"]} == {"wrong"}
    pngs = sorted(p.name for p in (tmp_path / "plots").iterdir())
    assert pngs == ["bias_gelu_float32_N_192.png", "bias_gelu_float32_N_400.png"]


def test_plots_draw_every_group_of_the_kernels_json(kernels_doc, tmp_path):
    from gpt2fast.bench import plots

    written = plots.plot_kernels(kernels_doc, tmp_path)
    for op in BUILTIN_OPS:
        assert any(p.name.startswith(op + "_") for p in written), (op, [p.name for p in written])
    assert all(p.stat().st_size > 0 for p in written)


def test_report_markdown_from_json(kernels_doc, tmp_path, capsys):
    path = tmp_path / "k.json"
    path.write_text(json.dumps(kernels_doc))
    assert report.main([str(path)]) == 0
    md = capsys.readouterr().out
    for op in BUILTIN_OPS:
        assert f"### {op}" in md
    assert "| shape | dtype | gpt2fast:reference |" in md
    assert "Measured peaks: copy" in md
    first = kernels_doc["records"][0]
    assert f"{first['time']['median_ms']:.3g} ms" in md
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({**kernels_doc, "schema_version": 99}))
    assert report.main([str(bad)]) == 2


def test_validate_names_the_broken_field(kernels_doc):
    doc = json.loads(json.dumps(kernels_doc))
    del doc["records"][0]["check"]
    with pytest.raises(ValueError, match=r"records\[0\]\.check"):
        validate(doc)
    doc = json.loads(json.dumps(kernels_doc))
    doc["records"][1]["time"]["p20_ms"] = doc["records"][1]["time"]["median_ms"] + 1
    with pytest.raises(ValueError, match="out of order"):
        validate(doc)
    with pytest.raises(ValueError, match=r"meta\.git_commit"):
        validate({**kernels_doc, "meta": {k: v for k, v in kernels_doc["meta"].items() if k != "git_commit"}})


# ---- e2e ---------------------------------------------------------------------------------
def test_e2e_on_a_tiny_config(tmp_path):
    path = tmp_path / "e.json"
    code = bench("e2e", "--device", "cpu", "--size", "tiny", "--batch", "1,2", "--prompt", "4", "--new", "8",
                 "--reps", "2", "--provider", "transformers,gpt2fast:reference", "--json", str(path))  # fmt: skip
    assert code == 0
    doc = load_json(path)
    recs = doc["records"]
    assert [(r["batch"], r["provider"]) for r in recs] == [
        (b, p) for b in (1, 2) for p in ("transformers", "gpt2fast:reference")
    ]
    for r in recs:
        assert r["error"] is None, r
        assert r["prefill_ms"] > 0
        assert r["e2e_tokens_per_s"] == pytest.approx(r["batch"] * 8 * 1e3 / r["time_total"]["median_ms"])
        step = roofline.weight_bytes_per_decode_step(TINY, r["batch"], torch.float32)
        step += roofline.kv_bytes_per_decode_step(TINY, r["batch"], 4 + 3.5, torch.float32)
        assert r["step_bytes"] == pytest.approx(step)
        if r["decode_ms_per_token"] is None:  # a busy CPU's noise can exceed a tiny model's decode time
            assert "not resolved" in r["note"] and r["roofline_fraction"] is None
            continue
        dec = (r["time_total"]["median_ms"] - r["time_prefill"]["median_ms"]) / 7
        assert r["decode_ms_per_token"] == pytest.approx(dec)
        assert r["decode_tokens_per_s"] == pytest.approx(r["batch"] * 1e3 / dec)
        floor_ms = step / (doc["peaks"]["copy_gbps"] * 1e9) * 1e3
        assert r["roofline_fraction"] == pytest.approx(floor_ms / dec)
    assert any(r["decode_ms_per_token"] is not None for r in recs)
    own = [r for r in recs if r["provider"] == "gpt2fast:reference"]
    assert all("transformers e2e" in r["speedup"] for r in own)
    md = report.markdown(doc)
    assert "| tiny | 2 | gpt2fast:reference |" in md


# ---- CLI return codes ----------------------------------------------------------------------
def test_cli_bad_arguments_return_2(capsys):
    assert bench("kernels", "--device", "cpu", "--op", "softmax") == 2
    assert "--op: unknown ['softmax']" in capsys.readouterr().err
    # tiny is GPT2Config.from_name("tiny"): 128 positions.
    assert bench("e2e", "--device", "cpu", "--size", "tiny", "--prompt", "120", "--new", "10") == 2
    assert "exceeds tiny's n_positions=128" in capsys.readouterr().err
    assert bench("e2e", "--device", "cpu", "--size", "gpt5") == 2
    assert "unknown GPT-2 size 'gpt5'" in capsys.readouterr().err
    assert bench("e2e", "--device", "cpu", "--size", "tiny", "--new", "1") == 2
    assert "--new must be >= 2" in capsys.readouterr().err
    assert bench("kernels", "--dtype", "fp8") == 2
    assert "--dtype: unknown ['fp8']" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert bench("kernels", "--device", "cuda") == 2
        assert "CUDA is not available" in capsys.readouterr().err
