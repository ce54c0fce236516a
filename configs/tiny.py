"""Tiny GPT-2 (2 layers, n_embd 64) for tests and smoke runs: trains on the bundled Shakespeare in seconds.

    python -m gpt2_jax.train --config configs/tiny.py --workdir /tmp/tiny

The recipe is gpt2_jax/configs/tiny.py, shipped with the package (`--config tiny` runs it
from any directory); this file re-exports it. To make your own config, copy that file.
"""

from gpt2_jax.configs.tiny import get_config  # noqa: F401
