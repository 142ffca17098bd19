"""GPT-2 hyperparameters: the published sizes, ``tiny`` (tests, CPU runs), or a transformers ``config.json``."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

#: Every named size of :meth:`GPT2Config.from_name`: ``tiny`` (2 layers, width 64, GPT-2's full vocab so the real
#: tokenizer's ids fit, 128 positions: the one small model of the CLI, the benchmarks and the tests), then the four
#: published GPT-2 sizes.
SIZES: dict[str, dict[str, int]] = {
    "tiny": dict(n_layer=2, n_head=2, n_embd=64, n_positions=128),
    "gpt2": dict(n_layer=12, n_head=12, n_embd=768),
    "gpt2-medium": dict(n_layer=24, n_head=16, n_embd=1024),
    "gpt2-large": dict(n_layer=36, n_head=20, n_embd=1280),
    "gpt2-xl": dict(n_layer=48, n_head=25, n_embd=1600),
}


@dataclass
class GPT2Config:
    """GPT-2 shape.  Field names follow transformers' ``GPT2Config``."""

    vocab_size: int = 50257
    n_positions: int = 1024
    n_embd: int = 768
    n_layer: int = 12
    n_head: int = 12
    n_inner: int | None = None  # MLP width; None means 4 * n_embd
    layer_norm_epsilon: float = 1e-5
    bos_token_id: int = 50256
    eos_token_id: int = 50256
    # Dropout probabilities, transformers' names and defaults; active only in train() mode.
    embd_pdrop: float = 0.1  # on the token + position embeddings
    resid_pdrop: float = 0.1  # on each attention and MLP output, before it joins the residual stream
    attn_pdrop: float = 0.1  # on the attention probabilities

    def __post_init__(self) -> None:
        for name in ("vocab_size", "n_positions", "n_embd", "n_layer", "n_head"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"GPT2Config.{name} must be a positive int, got {value!r}")
        for name in ("embd_pdrop", "resid_pdrop", "attn_pdrop"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
                raise ValueError(f"GPT2Config.{name} must be a probability in [0, 1], got {value!r}")
        if self.n_embd % self.n_head:
            raise ValueError(f"GPT2Config.n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")

    @property
    def head_dim(self) -> int:
        """Per-head width, n_embd // n_head."""
        return self.n_embd // self.n_head

    @property
    def mlp_dim(self) -> int:
        """Hidden width of the MLP."""
        return self.n_inner or 4 * self.n_embd

    @classmethod
    def from_name(cls, name: str) -> GPT2Config:
        """A named size (:data:`SIZES`): "tiny", or a published one: "gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl"."""
        if name not in SIZES:
            raise ValueError(f"unknown GPT-2 size {name!r}; choose one of {sorted(SIZES)}")
        return cls(**SIZES[name])

    @classmethod
    def from_hf(cls, hf_config) -> GPT2Config:
        """From a transformers ``GPT2Config`` object or its ``to_dict()``."""
        d = hf_config if isinstance(hf_config, dict) else hf_config.to_dict()
        mt = d.get("model_type", "gpt2")
        if mt != "gpt2":
            raise ValueError(f"config has model_type {mt!r}; gpt2fast supports 'gpt2' only")
        act = d.get("activation_function", "gelu_new")
        if act not in ("gelu_new", "gelu_pytorch_tanh"):
            raise ValueError(f"activation_function {act!r} is not supported; GPT-2 uses 'gelu_new'")
        fields = cls.__dataclass_fields__
        kwargs = {k: d[k] for k in fields if k in d and (d[k] is not None or k == "n_inner")}
        return cls(**kwargs)

    @classmethod
    def from_json(cls, path: str | Path) -> GPT2Config:
        """From a transformers ``config.json`` file (or the directory holding one)."""
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        if not path.is_file():
            raise FileNotFoundError(f"no config.json at {path}")
        try:
            d = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path} is not valid JSON: {exc}") from None
        return cls.from_hf(d)

    def to_hf_dict(self) -> dict:
        """A dict that transformers' ``GPT2Config(**d)`` accepts (written as config.json)."""
        d = asdict(self)
        d.update(model_type="gpt2", architectures=["GPT2LMHeadModel"], activation_function="gelu_new")
        return d
