"""Build a :class:`~gpt2fast.model.GPT2` from Hugging Face GPT-2 weights, random weights, or save one.

Hugging Face's GPT-2 stores its linear layers as ``Conv1D`` with weights ``[in, out]``;
gpt2fast uses ``nn.Linear`` (``[out, in]``), so those four weights per block are
transposed on the way in and out.  Tensor names are the same up to the
``transformer.`` prefix.  The LM head is tied to ``wte``.

Loading builds the model on the meta device and fills it one tensor at a time from
a memory-mapped file, converting dtype/device per tensor, so a checkpoint never
needs twice its size in RAM.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from gpt2fast.config import GPT2Config

if TYPE_CHECKING:
    from gpt2fast.model import GPT2

#: The name :func:`load_pretrained` (``GPT2.from_pretrained``) and every ``--model`` option read as the model shipped
#: inside the package (a path that happens to be called "default" is spelled ``./default``).
DEFAULT_MODEL = "default"

_CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
_PREFIX = "transformer."
_SAFETENSORS, _TORCH_BIN = "model.safetensors", "pytorch_model.bin"


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded: missing/unreadable files, or tensors that do not fit the model."""


def default_model_dir() -> Path:
    """Where the shipped default model lives: ``gpt2fast/assets/default`` (package data; see its README.md)."""
    return Path(__file__).resolve().parent / "assets" / "default"


def resolve_checkpoint(path: str | Path) -> Path:
    """``path``, or for the name :data:`DEFAULT_MODEL` (a ``str``) the shipped model's folder; raises
    :class:`CheckpointError` when the package was installed without it."""
    if isinstance(path, str) and path == DEFAULT_MODEL:
        directory = default_model_dir()
        if not (directory / "config.json").is_file():
            raise CheckpointError(
                f"the default model is not installed ({directory} is missing); reinstall gpt2fast, or rebuild it "
                "with scripts/train_default_model.py"
            )
        return directory
    return Path(path)


def _fmt(shape: Iterable[int]) -> str:
    return "[" + ", ".join(str(s) for s in shape) + "]"


def _is_conv1d(name: str) -> bool:
    return name.endswith(_CONV1D)


def _is_ignored(name: str) -> bool:
    """HF's non-persistent causal-mask buffers, which older checkpoints still carry."""
    return name.split(".")[-2:] in (["attn", "bias"], ["attn", "masked_bias"])


def _build_empty(config: GPT2Config, dtype: torch.dtype, backend: str | None) -> GPT2:
    """The model on the meta device in ``dtype``, on ``backend``."""
    from gpt2fast.model import GPT2

    if dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"dtype must be torch.float32, torch.float16 or torch.bfloat16, got {dtype!r}")
    with torch.device("meta"):
        model = GPT2(config).to(dtype)
    model.backend = backend  # checked against the model's shapes and dtype
    return model


class _Source:
    """A flat set of named tensors: ``names``; ``shape(name)`` and ``dtype(name)`` without reading data;
    ``get(name)`` reads one tensor.  ``borrowed``: the tensors belong to a live model, so the loaded
    model must never share their memory."""

    def __init__(
        self,
        names: list[str],
        shape: Callable[[str], tuple],
        dtype: Callable[[str], torch.dtype],
        get: Callable[[str], torch.Tensor],
        borrowed: bool = False,
    ) -> None:
        self.names, self.shape, self.dtype, self.get = names, shape, dtype, get
        self.borrowed = borrowed

    @classmethod
    def from_dict(cls, sd: dict[str, torch.Tensor], borrowed: bool = False) -> _Source:
        """A source over an in-memory (or mmapped) state dict."""
        return cls(list(sd), lambda n: tuple(sd[n].shape), lambda n: sd[n].dtype, sd.__getitem__, borrowed)


_ST_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64}


def _open_safetensors(path: Path) -> _Source:
    from safetensors import safe_open

    try:
        handle = safe_open(str(path), framework="pt", device="cpu")
        names = list(handle.keys())
    except Exception as exc:
        raise CheckpointError(f"{path} is not a readable safetensors file (truncated or corrupt?): {exc}") from None

    def get(name: str) -> torch.Tensor:
        try:
            return handle.get_tensor(name)
        except Exception as exc:
            raise CheckpointError(f"cannot read tensor {name!r} from {path} (truncated or corrupt?): {exc}") from None

    def dtype(name: str) -> torch.dtype:
        return _ST_DTYPES.get(handle.get_slice(name).get_dtype(), torch.float32)

    return _Source(names, lambda n: tuple(handle.get_slice(n).get_shape()), dtype, get)


def _open_torch_bin(path: Path) -> _Source:
    try:
        try:  # memory-mapped: tensors are paged in as they are converted
            sd = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as exc:
            if "mmap" not in str(exc):
                raise
            sd = torch.load(str(path), map_location="cpu", weights_only=True)  # pre-1.6 (non-zip) format
    except Exception as exc:
        raise CheckpointError(f"{path} is not a readable PyTorch checkpoint (truncated or corrupt?): {exc}") from None
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise CheckpointError(f"{path} does not hold a flat state dict of tensors")
    return _Source.from_dict(sd)


def _match(model, source: _Source) -> tuple[dict[str, str], str | None]:
    """Map each model parameter to its checkpoint name; check names and shapes before reading any data.

    Returns ``(param -> checkpoint name, checkpoint name of lm_head.weight or None)``.
    """
    expected = {n: tuple(p.shape) for n, p in model.named_parameters()}
    found: dict[str, str] = {}
    lm_head = None
    extra = []
    for ck_name in source.names:
        name = ck_name.removeprefix(_PREFIX)
        if _is_ignored(name):
            continue
        if name == "lm_head.weight":
            lm_head = ck_name
            continue
        if name not in expected:
            extra.append(ck_name)
            continue
        if name in found:
            raise CheckpointError(f"tensor {name!r} appears twice in the checkpoint ({found[name]!r}, {ck_name!r})")
        found[name] = ck_name
    if extra:
        shapes = ", ".join(f"{n!r} {_fmt(source.shape(n))}" for n in extra[:5])
        raise CheckpointError(f"checkpoint has tensors the model does not: {shapes} (expected shape: none)")
    missing = [n for n in expected if n not in found]
    if missing:
        shapes = ", ".join(f"{n!r} (expected {_fmt(_hf_shape(n, expected[n]))}, found: none)" for n in missing[:5])
        raise CheckpointError(f"checkpoint is missing {len(missing)} tensor(s): {shapes}")
    for name, ck_name in found.items():
        want, got = _hf_shape(name, expected[name]), source.shape(ck_name)
        if tuple(got) != want:
            raise CheckpointError(f"tensor {ck_name!r} has shape {_fmt(got)} in the checkpoint, expected {_fmt(want)}")
    if lm_head is not None and tuple(source.shape(lm_head)) != expected["wte.weight"]:
        raise CheckpointError(
            f"tensor {lm_head!r} has shape {_fmt(source.shape(lm_head))}, expected {_fmt(expected['wte.weight'])} "
            "(the LM head is tied to wte)"
        )
    return found, lm_head


def _hf_shape(name: str, shape: tuple) -> tuple:
    """Shape of parameter ``name`` in the HF layout (Conv1D weights are [in, out])."""
    return tuple(reversed(shape)) if _is_conv1d(name) else tuple(shape)


def _fill(model, source: _Source, dtype: torch.dtype, device: torch.device, quiet: bool, label: str):
    """Check ``source`` against ``model`` (on meta), then load it tensor by tensor; returns the model."""
    from tqdm.auto import tqdm

    found, lm_head = _match(model, source)
    state = {}
    for name, ck_name in tqdm(found.items(), desc=f"loading {label}", unit="tensor", disable=quiet, leave=False):
        t = source.get(ck_name)
        if _is_conv1d(name):
            t = t.t()
        out = t.to(device=device, dtype=dtype).contiguous()
        if source.borrowed and out.untyped_storage().data_ptr() == t.untyped_storage().data_ptr():
            out = out.clone()  # same dtype/device/layout: .to() returned the live model's own tensor
        state[name] = out
        del t, out
    if lm_head is not None:
        head = source.get(lm_head).to(device=device, dtype=dtype)
        if not torch.equal(head, state["wte.weight"]):
            raise CheckpointError(
                f"tensor {lm_head!r} differs from the token embedding; gpt2fast supports tied LM heads only"
            )
    model.load_state_dict(state, strict=True, assign=True)
    return model.eval().requires_grad_(False)


def _stored_dtype(source: _Source) -> torch.dtype:
    """The floating dtype the checkpoint stores its weights in (read from the header, not the data)."""
    for n in source.names:
        if not _is_ignored(n.removeprefix(_PREFIX)) and source.dtype(n).is_floating_point:
            return source.dtype(n)
    return torch.float32


def load_pretrained(
    path: str | Path,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
    backend: str | None = None,
    quiet: bool = False,
) -> GPT2:
    """Load a Hugging Face GPT-2 checkpoint: a directory with ``config.json`` and ``model.safetensors``
    (preferred) or ``pytorch_model.bin``, or the path of one of those weight files.

    ``dtype=None`` keeps the checkpoint's dtype; ``device=None`` means CPU.  ``quiet`` hides the progress bar.
    The name ``"default"`` loads the model shipped in the package (:func:`resolve_checkpoint`).
    """
    path = resolve_checkpoint(path)
    if path.is_dir():
        directory = path
        weights = next((path / f for f in (_SAFETENSORS, _TORCH_BIN) if (path / f).is_file()), None)
        if weights is None:
            raise CheckpointError(f"{path} holds neither {_SAFETENSORS} nor {_TORCH_BIN}")
    elif path.is_file():
        directory, weights = path.parent, path
    else:
        raise FileNotFoundError(f"no checkpoint at {path}")
    config = GPT2Config.from_json(directory / "config.json")
    is_safetensors = weights.suffix == ".safetensors"
    source = _open_safetensors(weights) if is_safetensors else _open_torch_bin(weights)
    dtype = _stored_dtype(source) if dtype is None else dtype
    device = torch.device("cpu" if device is None else device)
    return _fill(_build_empty(config, dtype, backend), source, dtype, device, quiet, weights.name)


def from_hf(
    hf_model: torch.nn.Module,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
    backend: str | None = None,
) -> GPT2:
    """Copy a transformers ``GPT2LMHeadModel`` (or ``GPT2Model``); dtype/device default to the HF model's."""
    config = GPT2Config.from_hf(hf_model.config)
    sd = hf_model.state_dict()
    p = next(iter(hf_model.parameters()))
    dtype = p.dtype if dtype is None else dtype
    device = p.device if device is None else torch.device(device)
    source = _Source.from_dict(sd, borrowed=True)
    return _fill(_build_empty(config, dtype, backend), source, dtype, device, True, "hf model")


def random_init(
    config: GPT2Config | str,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    backend: str | None = None,
) -> GPT2:
    """GPT-2 with GPT-2's initialisation, made directly in ``dtype`` on ``device`` (for benchmarks and tests).

    Linear and embedding weights ~ N(0, 0.02), the residual projections (``c_proj``) scaled by
    ``1/sqrt(2 * n_layer)``, biases 0, LayerNorm weight 1.
    """
    config = GPT2Config.from_name(config) if isinstance(config, str) else config
    device = torch.device(device)
    model = _build_empty(config, dtype, backend).to_empty(device=device)
    gen = torch.Generator(device=device).manual_seed(seed)
    proj_std = 0.02 / math.sqrt(2 * config.n_layer)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".ln_" in f".{name}":
                p.fill_(1.0 if name.endswith("weight") else 0.0)
            elif name.endswith("bias"):
                p.zero_()
            else:
                p.normal_(0.0, proj_std if name.endswith("c_proj.weight") else 0.02, generator=gen)
    return model.eval().requires_grad_(False)


def save_pretrained(model: GPT2, directory: str | Path) -> None:
    """Write ``config.json`` and ``model.safetensors`` in Hugging Face's GPT-2 layout
    (``transformer.`` names, Conv1D ``[in, out]`` weights, tied head omitted) so that
    ``transformers.GPT2LMHeadModel.from_pretrained(directory)`` loads it."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for name, p in model.named_parameters():
        t = p.detach().t() if _is_conv1d(name) else p.detach()
        tensors[_PREFIX + name] = t.to("cpu").contiguous()
    cfg = model.config.to_hf_dict()
    cfg["dtype"] = str(model.wte.weight.dtype).removeprefix("torch.")
    (directory / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    save_file(tensors, str(directory / _SAFETENSORS), metadata={"format": "pt"})
