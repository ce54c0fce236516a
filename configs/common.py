"""Kept for config files written before the shared pieces moved into the package: new configs use
`from gpt2_jax.configs import common` (importable from any directory), which this re-exports."""

from gpt2_jax.configs.common import MODEL_PRESETS, base_config, parse_arg, set_model, tokens_to_steps  # noqa: F401
