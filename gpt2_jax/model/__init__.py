"""The model: GPT2Config and the Flax GPT-2 (gpt2.py), attention kernels, losses, parameters, the decode cache.

The names below are re-exported for users; modules inside gpt2_jax.model import each other directly.
"""

from gpt2_jax.model.attention import attention_kernel, attention_problem, platform
from gpt2_jax.model.cache import init_cache
from gpt2_jax.model.config import PRESETS, VOCAB_SIZE, GPT2Config
from gpt2_jax.model.gpt2 import GPT2, lm_head
from gpt2_jax.model.loss import (
           chunked_loss_sums,
           cross_entropy,
           cross_entropy_sums,
           loss_fn,
           loss_sums,
)
from gpt2_jax.model.params import (
           abstract_params,
           count_params,
           init_params,
           logical_axes,
           stack_layers,
           to_layout,
           unstack_layers,
)

__all__ = ["GPT2Config", "GPT2", "PRESETS", "VOCAB_SIZE", "abstract_params", "attention_kernel", "attention_problem",
           "chunked_loss_sums", "count_params", "cross_entropy", "cross_entropy_sums", "init_cache", "init_params",
           "lm_head", "logical_axes", "loss_fn", "loss_sums", "platform", "stack_layers", "to_layout",
           "unstack_layers"]
