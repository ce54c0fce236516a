"""GPT-2 small (124M) from scratch: the llm.c / nanoGPT recipe, 10B tokens in 19,073 steps of 0.5M tokens.

    python -m gpt2_jax.train --config configs/gpt2_124m.py --workdir runs/gpt2_124m --config.data.path=DATA_DIR

The recipe is gpt2_jax/configs/gpt2_124m.py, shipped with the package (`--config gpt2_124m` runs it
from any directory); this file re-exports it. To make your own config, copy that file.
"""

from gpt2_jax.configs.gpt2_124m import get_config  # noqa: F401
