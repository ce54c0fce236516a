"""The configs, shipped with the package: shared pieces (common.py), the key table (keys.py), the
names other tools use (aliases.py), the presets below (one file each), and their loading (load.py).

`--config NAME` runs a preset from any directory; a config file of your own starts with
`from gpt2_jax.configs import common`. Imports nothing but ml_collections (and gpt2_jax.errors).
"""

# The preset modules here, each with get_config(arg); configs/NAME.py in a checkout re-exports it.
PRESETS = ("tiny", "shakespeare", "gpt2_124m", "gpt2_350m", "gpt2_774m", "gpt2_1558m", "finetune_summarize")
