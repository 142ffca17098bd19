"""Fast CPU tests of the benchmark harness: byte/FLOP counting, JSON schema, parity flags, reports, CLI codes.

Speed is never asserted; these check that the figures are computed from the right counts
and that a wrong or failing provider is visible in the results.
"""

from __future__ import annotations

import argparse
import json

import pytest
import torch

from gpt2fast import GPT2
from gpt2fast.bench import e2e, kernels, report, roofline, timing
from gpt2fast.bench.cli import add_bench_parser
from gpt2fast.bench.results import load_json, new_document, run_metadata, validate
from gpt2fast.bench.timing import rotating_copies, summarize
from gpt2fast.ops import reference

CPU = torch.device("cpu")


def _parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_bench_parser(parser.add_subparsers(dest="cmd"))
    return parser.parse_args(["bench", *argv])


# ---- counting ----------------------------------------------------------------------------
def test_byte_and_flop_counts_match_hand_computation():
    # LayerNorm 3x5 fp16 with residual: x, residual, y, h (4 * 15 elements) + weight, bias (2 * 5), 2 bytes each.
    assert roofline.layer_norm_bytes(3, 5, torch.float16, residual=True) == 2 * (60 + 10)
    assert roofline.layer_norm_bytes(3, 5, torch.float16, residual=False) == 2 * (30 + 10)
    # bias+GELU 3x5 fp32: x, y (30) + bias (5), 4 bytes each.
    assert roofline.bias_gelu_bytes(3, 5, torch.float32) == 4 * 35
    # Attention B=1, H=2, T=4, D=8: q, k, v, o = 4 * 64 elements; FLOPs 4*B*H*T*T*D = 1024, causal half.
    assert roofline.attention_bytes(1, 2, 4, 8, torch.bfloat16) == 2 * 4 * 64
    assert roofline.attention_flops(1, 2, 4, 8, causal=False) == 1024
    assert roofline.attention_flops(1, 2, 4, 8, causal=True) == 512
    # Decode H=2, D=4, lengths [3, 0], fp16: K+V of 3 positions (2*2*4*3 = 48 elements), q and out (2 x 16),
    # k_new/v_new read and written (4 x 16) -> (48 + 32 + 64) elements.
    assert roofline.decode_kv_bytes(2, 4, [3, 0], torch.float16) == 2 * 48
    assert roofline.decode_attention_bytes(2, 4, [3, 0], torch.float16, append=False) == 2 * (48 + 32)
    assert roofline.decode_attention_bytes(2, 4, [3, 0], torch.float16, append=True) == 2 * (48 + 32 + 64)
    # attended positions (3 + 1) + (0 + 1) = 5, 4 * H * D FLOPs each.
    assert roofline.decode_attention_flops(2, 4, [3, 0], append=True) == 4 * 2 * 4 * 5


def test_decode_weight_bytes_equal_the_model_parameters():
    cfg = e2e.TINY
    model = GPT2(cfg)
    params = sum(p.numel() for p in model.parameters())
    batch = 3  # wpe: only one row per sequence is read
    expected = (params - model.wpe.weight.numel() + batch * cfg.n_embd) * 2
    assert roofline.weight_bytes_per_decode_step(cfg, batch, torch.float16) == expected
    kv = roofline.kv_bytes_per_decode_step(cfg, batch, 10, torch.float32)
    assert kv == 2 * cfg.n_layer * batch * cfg.n_head * cfg.head_dim * 10 * 4


def test_traffic_of_a_ragged_decode_case_uses_its_lengths():
    case = kernels.Case(
        "decode_attention", {"batch": 5, "heads": 2, "cache_len": 40, "head_dim": 64, "ragged": True}, "batch", "g"
    )
    lens = kernels.decode_seqlens(case)
    assert len(lens) == 5 and all(0 <= n < 40 for n in lens) and len(set(lens)) > 1
    nbytes, _, extra = kernels.traffic(case, torch.float16)
    assert extra["kv_bytes"] == 2 * 2 * 64 * sum(lens) * 2
    assert nbytes == roofline.decode_attention_bytes(2, 64, lens, torch.float16, append=True)
    inp = kernels.make_inputs(case, torch.float16, CPU)
    assert inp["cache_seqlens"].tolist() == lens and inp["k_cache"].shape == (5, 2, 41, 64)


def test_sweeps():
    quick = kernels.cases("quick")
    flags = [kernels.is_target(c) for c in quick]
    assert any(flags) and flags == sorted(flags, reverse=True)  # target cases first
    assert {c.op for c in quick if kernels.is_target(c)} == set(kernels.OPS)
    full = kernels.cases("full")
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
    args = _parse(
        "kernels", "--device", "cpu", "--op", "layer_norm,bias_gelu,attention,decode_attention",
        "--provider", "gpt2fast:reference,torch,torch.sdpa", "--json", str(path),
    )  # fmt: skip
    assert args.func(args) == 0
    return load_json(path)


def test_kernels_json_is_schema_valid_and_figures_follow_the_counts(kernels_doc):
    validate(kernels_doc)
    assert kernels_doc["kind"] == "kernels" and kernels_doc["meta"]["device"] == "cpu"
    peaks = kernels_doc["peaks"]
    assert peaks["copy_gbps"] > 0 and peaks["matmul_tflops"] > 0
    recs = kernels_doc["records"]
    expected = {(c.op, str(c.shape)) for c in kernels.cases("cpu")}
    assert {(r["op"], str(r["shape"])) for r in recs} == expected
    assert {r["provider"] for r in recs} == {"gpt2fast:reference", "torch", "torch.sdpa"}
    for r in recs:
        assert r["error"] is None, r
        assert r["check"]["ok"], r
        case = kernels.Case(r["op"], r["shape"], r["sweep"], r["group"])
        assert r["bytes"] == kernels.traffic(case, torch.float32)[0]
        sec = r["time"]["median_ms"] * 1e-3
        assert r["gbps"] == pytest.approx(r["bytes"] / sec / 1e9)
        assert r["pct_copy_bw"] == pytest.approx(100 * r["gbps"] / peaks["copy_gbps"])
        if r["op"] == "attention":
            assert r["tflops"] == pytest.approx(r["flops"] / sec / 1e12)
    own = [r for r in recs if r["provider"] == "gpt2fast:reference"]
    assert all(
        set(r["speedup"]) == ({"torch"} if r["op"] in ("layer_norm", "bias_gelu") else {"torch.sdpa"}) for r in own
    )


def _bias_gelu_case() -> kernels.Case:
    return kernels.Case("bias_gelu", {"rows": 5, "n": 24}, "rows", "N=24")


def test_wrong_and_failing_providers_are_recorded():
    def wrong(inp):
        return lambda: reference.bias_gelu(inp["x"], inp["bias"]) + 0.01

    def boom(inp):
        raise RuntimeError("kernel exploded")

    provs = {"right": kernels._own("bias_gelu", "reference"), "wrong": wrong, "boom": boom, "missing": "unavailable: x"}
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


def test_kernels_cli_returns_1_on_a_wrong_result(monkeypatch, tmp_path):
    real = kernels.providers

    def with_wrong(op, device, compile_baseline=True):
        out = real(op, device, compile_baseline)
        out["wrong"] = lambda inp: lambda: reference.bias_gelu(inp["x"], inp["bias"]) * 1.1
        return out

    monkeypatch.setattr(kernels, "providers", with_wrong)
    args = _parse("kernels", "--device", "cpu", "--op", "bias_gelu", "--provider", "gpt2fast:reference,wrong",
                  "--json", str(tmp_path / "k.json"), "--plots", str(tmp_path / "plots"))  # fmt: skip
    assert args.func(args) == 1
    doc = load_json(tmp_path / "k.json")
    assert {r["provider"] for r in doc["records"] if not r["check"]["ok"]} == {"wrong"}
    pngs = sorted(p.name for p in (tmp_path / "plots").iterdir())
    assert pngs == ["bias_gelu_float32_N_192.png", "bias_gelu_float32_N_400.png"]


def test_report_markdown_from_json(kernels_doc, tmp_path, capsys):
    path = tmp_path / "k.json"
    path.write_text(json.dumps(kernels_doc))
    assert report.main([str(path)]) == 0
    md = capsys.readouterr().out
    for op in kernels.OPS:
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
    args = _parse("e2e", "--device", "cpu", "--size", "tiny", "--batch", "1,2", "--prompt", "4", "--new", "8",
                  "--reps", "2", "--provider", "transformers,gpt2fast:reference", "--json", str(path))  # fmt: skip
    assert args.func(args) == 0
    doc = load_json(path)
    recs = doc["records"]
    assert [(r["batch"], r["provider"]) for r in recs] == [
        (b, p) for b in (1, 2) for p in ("transformers", "gpt2fast:reference")
    ]
    for r in recs:
        assert r["error"] is None, r
        assert r["prefill_ms"] > 0
        assert r["e2e_tokens_per_s"] == pytest.approx(r["batch"] * 8 * 1e3 / r["time_total"]["median_ms"])
        step = roofline.weight_bytes_per_decode_step(e2e.TINY, r["batch"], torch.float32)
        step += roofline.kv_bytes_per_decode_step(e2e.TINY, r["batch"], 4 + 3.5, torch.float32)
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
    args = _parse("kernels", "--device", "cpu", "--op", "softmax")
    assert args.func(args) == 2
    assert "--op: unknown ['softmax']" in capsys.readouterr().err
    args = _parse("e2e", "--device", "cpu", "--size", "tiny", "--prompt", "250", "--new", "10")
    assert args.func(args) == 2
    assert "exceeds tiny's n_positions=256" in capsys.readouterr().err
    args = _parse("e2e", "--device", "cpu", "--size", "gpt5")
    assert args.func(args) == 2
    args = _parse("e2e", "--device", "cpu", "--size", "tiny", "--new", "1")
    assert args.func(args) == 2
    with pytest.raises(SystemExit) as exc:
        _parse("kernels", "--dtype", "fp8")
    assert exc.value.code == 2
    if not torch.cuda.is_available():
        args = _parse("kernels", "--device", "cuda")
        assert args.func(args) == 2
