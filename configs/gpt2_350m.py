"""GPT-2 medium (350M) from scratch: the 124M recipe with GPT-3's medium learning rate.

    python -m gpt2_jax.train --config configs/gpt2_350m.py --workdir runs/gpt2_350m --config.data.path=DATA_DIR

The recipe is gpt2_jax/configs/gpt2_350m.py, shipped with the package (`--config gpt2_350m` runs it
from any directory); this file re-exports it. To make your own config, copy that file.
"""

from gpt2_jax.configs.gpt2_350m import get_config  # noqa: F401
