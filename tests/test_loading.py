"""Checkpoint loading/saving in Hugging Face's GPT-2 layout, random initialisation, and loading errors."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file
from test_model_parity import hf_model, pair, random_ids

from gpt2fast import GPT2, GPT2Config
from gpt2fast.loading import CheckpointError

transformers = pytest.importorskip("transformers")


def _logits(model, ids):
    with torch.no_grad():
        out = model(ids)
    return out.logits if hasattr(out, "logits") else out


def _write_checkpoint(directory, hf, tensors: dict[str, torch.Tensor], fmt: str = "safetensors"):
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(hf.config.to_dict()))
    if fmt == "safetensors":
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(directory / "model.safetensors"))
    else:
        torch.save(tensors, directory / "pytorch_model.bin", _use_new_zipfile_serialization=fmt == "bin")
    return directory


def _hf_tensors(hf) -> dict[str, torch.Tensor]:
    """HF's full state dict with the tied head and the legacy causal-mask buffers, as old .bin files have."""
    sd = {k: v.clone() for k, v in hf.state_dict().items()}
    sd["lm_head.weight"] = sd["transformer.wte.weight"]
    n_pos = hf.config.n_positions
    for i in range(hf.config.n_layer):
        sd[f"transformer.h.{i}.attn.bias"] = torch.ones(1, 1, n_pos, n_pos).tril()
        sd[f"transformer.h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    return sd


def test_save_pretrained_loads_in_transformers_with_same_logits(tmp_path):
    hf, model = pair("h4_v257_inner")
    model.save_pretrained(tmp_path)
    reloaded = transformers.GPT2LMHeadModel.from_pretrained(tmp_path, attn_implementation="eager").eval()
    ids = random_ids(257, (2, 9))
    assert (_logits(reloaded, ids) - _logits(model, ids)).abs().max().item() <= 1e-4
    assert (_logits(reloaded, ids) - _logits(hf, ids)).abs().max().item() <= 1e-4


def test_round_trip_is_exact(tmp_path):
    _, model = pair("h3_v101")
    model.save_pretrained(tmp_path)
    again = GPT2.from_pretrained(tmp_path, backend="reference", quiet=True)
    assert again.config == model.config
    for (n1, p1), (n2, p2) in zip(model.named_parameters(), again.named_parameters()):
        assert n1 == n2 and torch.equal(p1, p2), n1


def test_loads_transformers_save_pretrained(tmp_path):
    hf = hf_model("h3_v101")
    hf.save_pretrained(tmp_path)
    model = GPT2.from_pretrained(tmp_path, backend="reference", quiet=True)
    ids = random_ids(101, (2, 8))
    assert (_logits(model, ids) - _logits(hf, ids)).abs().max().item() <= 1e-4


@pytest.mark.parametrize("fmt", ["safetensors", "bin", "legacy-bin"])
@pytest.mark.parametrize("prefix", [True, False])
def test_loads_both_formats_with_or_without_prefix(tmp_path, fmt, prefix):
    hf = hf_model("h1_v64")
    sd = _hf_tensors(hf)
    if not prefix:
        sd = {k.removeprefix("transformer."): v for k, v in sd.items()}
    if fmt == "safetensors":
        sd["lm_head.weight"] = sd["lm_head.weight"].clone()  # safetensors refuses shared storage
    _write_checkpoint(tmp_path, hf, sd, fmt)
    model = GPT2.from_pretrained(tmp_path, backend="reference", quiet=True)
    ids = random_ids(64, (1, 10))
    assert (_logits(model, ids) - _logits(hf, ids)).abs().max().item() <= 1e-4


def test_weight_file_path_dtype_and_device(tmp_path):
    _, model = pair("h3_v101")
    model.save_pretrained(tmp_path)
    half = GPT2.from_pretrained(tmp_path / "model.safetensors", dtype=torch.bfloat16, device="cpu", quiet=True)
    assert {p.dtype for p in half.parameters()} == {torch.bfloat16}
    assert {p.device.type for p in half.parameters()} == {"cpu"}
    assert torch.equal(half.h[0].attn.c_attn.weight, model.h[0].attn.c_attn.weight.bfloat16())
    assert not any(p.requires_grad for p in half.parameters())


def test_unsupported_dtype(tmp_path):
    _, model = pair("h1_v64")
    model.save_pretrained(tmp_path)
    with pytest.raises(TypeError, match="dtype must be"):
        GPT2.from_pretrained(tmp_path, dtype=torch.int8, quiet=True)
    with pytest.raises(TypeError, match="dtype must be"):
        GPT2.random("gpt2", dtype=torch.float64)


def test_from_hf_defaults_to_the_models_dtype():
    hf = hf_model("h1_v64").to(torch.bfloat16)
    model = GPT2.from_hf(hf, backend="reference")
    assert model.wte.weight.dtype == torch.bfloat16
    assert torch.equal(model.h[0].mlp.c_fc.weight, hf.transformer.h[0].mlp.c_fc.weight.t())


def test_from_hf_copies_and_never_shares_the_hf_models_memory():
    """Same device and dtype: every tensor is still a copy (an in-place update of the HF model, e.g. its
    load_state_dict, must not reach the gpt2fast model's embeddings and LayerNorms but not its matmuls)."""
    hf = hf_model("h1_v64")
    model = GPT2.from_hf(hf, backend="reference")
    ours = {p.untyped_storage().data_ptr() for p in model.parameters()}
    theirs = {p.untyped_storage().data_ptr() for p in hf.parameters()}
    assert not ours & theirs
    before = model.wte.weight.clone()
    with torch.no_grad():
        hf.transformer.wte.weight.add_(1.0)
    assert torch.equal(model.wte.weight, before)


def _sd_with(hf, change):
    sd = {k: v.clone() for k, v in hf.state_dict().items() if k != "lm_head.weight"}
    change(sd)
    return sd


@pytest.mark.parametrize(
    "change, match",
    [
        (lambda sd: sd.pop("transformer.h.0.mlp.c_fc.bias"), r"missing .*'h\.0\.mlp\.c_fc\.bias' \(expected \[192\]"),
        (
            lambda sd: sd.update({"transformer.h.9.ln_1.weight": torch.ones(48)}),
            r"'transformer\.h\.9\.ln_1\.weight' \[48\]",
        ),
        (
            lambda sd: sd.update({"transformer.h.1.attn.c_attn.weight": torch.zeros(144, 48)}),
            r"'transformer\.h\.1\.attn\.c_attn\.weight' has shape \[144, 48\] .*expected \[48, 144\]",
        ),
        (lambda sd: sd.update({"lm_head.weight": torch.zeros(101, 48)}), "differs from the token embedding"),
        (lambda sd: sd.update({"lm_head.weight": torch.zeros(100, 48)}), r"'lm_head\.weight' has shape \[100, 48\]"),
        (lambda sd: sd.update({"h.0.ln_1.bias": torch.zeros(48)}), "appears twice"),
    ],
)
def test_mismatched_tensors_are_named(tmp_path, change, match):
    hf = hf_model("h3_v101")
    _write_checkpoint(tmp_path, hf, _sd_with(hf, change))
    with pytest.raises(CheckpointError, match=match):
        GPT2.from_pretrained(tmp_path, quiet=True)


def test_truncated_and_corrupt_files_raise_clearly(tmp_path):
    _, model = pair("h1_v64")
    model.save_pretrained(tmp_path)
    st = tmp_path / "model.safetensors"
    data = st.read_bytes()
    st.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="safetensors"):
        GPT2.from_pretrained(tmp_path, quiet=True)
    st.write_bytes(b"\x00" * 7)
    with pytest.raises(CheckpointError, match="safetensors"):
        GPT2.from_pretrained(tmp_path, quiet=True)
    st.unlink()
    (tmp_path / "pytorch_model.bin").write_bytes(b"not a zip file at all")
    with pytest.raises(CheckpointError, match="PyTorch checkpoint"):
        GPT2.from_pretrained(tmp_path, quiet=True)


def test_missing_files(tmp_path):
    with pytest.raises(FileNotFoundError):
        GPT2.from_pretrained(tmp_path / "nope")
    with pytest.raises(CheckpointError, match="neither"):
        GPT2.from_pretrained(tmp_path)
    save_file({"wte.weight": torch.zeros(2, 2)}, str(tmp_path / "model.safetensors"))
    with pytest.raises(FileNotFoundError, match=r"config\.json"):
        GPT2.from_pretrained(tmp_path)


def test_random_init_statistics_and_determinism():
    cfg = GPT2Config(vocab_size=300, n_positions=64, n_embd=64, n_layer=4, n_head=4)
    a = GPT2.random(cfg, seed=3, backend="reference")
    b = GPT2.random(cfg, seed=3, backend="reference")
    c = GPT2.random(cfg, seed=4, backend="reference")
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    assert not torch.equal(a.wte.weight, c.wte.weight)
    assert abs(a.wte.weight.std().item() - 0.02) < 0.002
    assert abs(a.h[0].mlp.c_fc.weight.std().item() - 0.02) < 0.002
    proj = torch.cat([blk.attn.c_proj.weight.flatten() for blk in a.h])
    assert abs(proj.std().item() - 0.02 / (2 * 4) ** 0.5) < 0.001
    assert torch.equal(a.h[1].ln_2.weight, torch.ones(64)) and not a.h[1].mlp.c_proj.bias.any()


def test_random_init_by_name_in_low_precision():
    model = GPT2.random("gpt2", dtype=torch.bfloat16, backend="reference")
    assert model.config == GPT2Config.from_name("gpt2")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert torch.isfinite(model(random_ids(50257, (1, 3)))).all()


_PEAK_RSS_SCRIPT = """
import os, resource, sys
from gpt2fast import GPT2
path = sys.argv[1]
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
model = GPT2.from_pretrained(path, quiet=True)
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(after - before)
"""


def test_from_pretrained_peak_memory_stays_below_twice_the_checkpoint(tmp_path):
    """Meta-device init + per-tensor loads from the safetensors mmap: loading a ~155 MB checkpoint in a fresh
    process raises the peak RSS by less than twice the file's size (a load-everything-then-copy path needs
    at least 2x: the state dict plus the initialised model)."""
    import subprocess
    import sys

    GPT2.random(GPT2Config(n_layer=4, n_embd=512, n_head=8), seed=0).save_pretrained(tmp_path)
    size = (tmp_path / "model.safetensors").stat().st_size
    out = subprocess.run(
        [sys.executable, "-c", _PEAK_RSS_SCRIPT, str(tmp_path)], capture_output=True, text=True, check=True
    ).stdout
    peak = int(out.strip().splitlines()[-1])
    assert peak < 2 * size, f"loading raised peak RSS by {peak / size:.2f}x the checkpoint size ({size} bytes)"
