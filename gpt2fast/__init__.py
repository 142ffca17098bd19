"""gpt2fast: custom Triton and CUDA kernels for GPT-2, in a minimal runtime checked against PyTorch."""

from gpt2fast.config import GPT2Config
from gpt2fast.hf_patch import auto_patch, hf_patch_stats, is_patched, patch_hf, unpatch_hf
from gpt2fast.model import GPT2, KVCache
from gpt2fast.ops import available_backends, get_backend, set_backend
from gpt2fast.tokenizer import Tokenizer

__version__ = "0.1.0"

__all__ = [
    "GPT2",
    "GPT2Config",
    "KVCache",
    "Tokenizer",
    "__version__",
    "auto_patch",
    "available_backends",
    "get_backend",
    "hf_patch_stats",
    "is_patched",
    "patch_hf",
    "set_backend",
    "unpatch_hf",
]
