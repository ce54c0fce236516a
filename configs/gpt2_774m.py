"""GPT-2 large (774M) from scratch, parameters and optimizer state sharded with FSDP.

    python -m gpt2_jax.train --config configs/gpt2_774m.py --workdir runs/gpt2_774m --config.data.path=DATA_DIR

The recipe is gpt2_jax/configs/gpt2_774m.py, shipped with the package (`--config gpt2_774m` runs it
from any directory); this file re-exports it. To make your own config, copy that file.
"""

from gpt2_jax.configs.gpt2_774m import get_config  # noqa: F401
