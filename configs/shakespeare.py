"""The default job: a small GPT-2 trained on the bundled Shakespeare in about 10 minutes on a 2-core CPU.

    python -m gpt2_jax.train --config configs/shakespeare.py --workdir runs/shakespeare

The recipe is gpt2_jax/configs/shakespeare.py, shipped with the package (`--config shakespeare` runs it
from any directory); this file re-exports it. To make your own config, copy that file.
"""

from gpt2_jax.configs.shakespeare import get_config  # noqa: F401
