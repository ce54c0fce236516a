"""`python -m gpt2_jax.train`: see gpt2_jax/train/cli.py."""

from gpt2_jax.parallel import distributed
from gpt2_jax.train.cli import main

distributed.exit(main())
