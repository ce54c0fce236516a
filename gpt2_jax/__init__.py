"""gpt2_jax: train GPT-2 in JAX/Flax and convert it to and from Hugging Face, exactly.

Public names are imported lazily so that `import gpt2_jax` has no side effects and stays fast.
"""

import importlib

__version__ = "0.1.0"
__all__ = ["GPT2Config", "GPT2", "load_hf", "save_hf", "get_tokenizer"]

_HOME = {
    "GPT2Config": "gpt2_jax.model",
    "GPT2": "gpt2_jax.model",
    "load_hf": "gpt2_jax.interop.hf",
    "save_hf": "gpt2_jax.interop.hf",
    "get_tokenizer": "gpt2_jax.interop.tokenizer",
}


def __getattr__(name):
    if name in _HOME:
        return getattr(importlib.import_module(_HOME[name]), name)
    raise AttributeError(f"module 'gpt2_jax' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + __all__)
