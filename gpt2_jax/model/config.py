"""GPT2Config: the architecture of a GPT-2 model and how it computes; presets and logical axis names."""

from __future__ import annotations

import dataclasses
from typing import Literal

import jax
import jax.numpy as jnp

VOCAB_SIZE = 50257

# Logical axis names. Parameters and activations get distinct names so that, say, parameters
# can be sharded over 'fsdp' along 'embed' while activations keep the embedding whole.
# sharding.py maps them to mesh axes; the model never names a mesh axis.
BATCH, LENGTH = "batch", "length"
ACT_EMBED, ACT_HEADS, ACT_MLP, ACT_VOCAB = "act_embed", "act_heads", "act_mlp", "act_vocab"
EMBED, HEADS, HEAD_DIM, QKV, MLP_DIM, VOCAB = "embed", "heads", "head_dim", "qkv", "mlp", "vocab"
POSITIONS = "positions"
LAYERS = "layers"  # the stacked-layer axis of scanned parameters (config.scan_layers); never sharded

ATTENTION_KERNELS = ("auto", "xla", "cudnn", "pallas")

REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots_saveable": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    # Named activations (checkpoint_name tags in gpt2.py's Attention): save these, recompute the rest.
    "save_qkv_proj": jax.checkpoint_policies.save_only_these_names("qkv_proj"),
    "save_attn_out": jax.checkpoint_policies.save_only_these_names("qkv_proj", "attn_out"),
}
RematPolicy = Literal["none", "full", "dots_saveable", "save_qkv_proj", "save_attn_out"]


@dataclasses.dataclass(frozen=True)
class GPT2Config:
    """Architecture of a GPT-2 model and how it computes (not how it trains)."""

    vocab_size: int = VOCAB_SIZE
    n_positions: int = 1024
    n_embd: int = 768
    n_layer: int = 12
    n_head: int = 12
    layer_norm_epsilon: float = 1e-5
    dropout: float = 0.0  # embedding, attention-probability and residual dropout (HF's *_pdrop)
    dtype: str = "float32"  # compute dtype: 'float32' | 'bfloat16'; parameters stay float32
    attention: Literal["auto", "xla", "cudnn", "pallas"] = "auto"  # see Attention and attention_kernel
    remat: RematPolicy = "none"  # see REMAT_POLICIES
    vocab_pad_multiple: int = 1  # 128 pads 50257 -> 50304 for faster matmuls
    loss_chunk: int = 0  # > 0: the loss computes logits this many positions at a time (see chunked_loss_sums)
    # One nn.scan over stacked layers (params under `h`, leading axis n_layer) instead of h_0 ...
    # h_{L-1}: compile time independent of depth. Off here, so a saved config without the field
    # (checkpoints before it existed) still means unrolled; the GPT-2 training presets turn it on.
    scan_layers: bool = False

    def __post_init__(self):
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        if self.dtype not in ("float32", "bfloat16"):
            raise ValueError(f"dtype must be 'float32' or 'bfloat16', not {self.dtype!r}")
        if self.remat not in REMAT_POLICIES:
            raise ValueError(f"remat must be one of {sorted(REMAT_POLICIES)}, not {self.remat!r}")
        if self.attention not in ATTENTION_KERNELS:
            raise ValueError(f"attention must be one of {', '.join(map(repr, ATTENTION_KERNELS))}, not {self.attention!r}")
        if self.vocab_pad_multiple < 1:
            raise ValueError("vocab_pad_multiple must be >= 1")
        if self.loss_chunk < 0:
            raise ValueError(f"loss_chunk must be >= 0 (0 = whole sequence at once), not {self.loss_chunk}")

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def padded_vocab_size(self) -> int:
        m = self.vocab_pad_multiple
        return -(-self.vocab_size // m) * m

    @property
    def compute_dtype(self):
        return jnp.dtype(self.dtype)

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "GPT2Config":
        if name not in PRESETS:
            raise ValueError(f"unknown GPT-2 preset {name!r}; choose one of {sorted(PRESETS)}")
        return dataclasses.replace(PRESETS[name], **overrides)

    def replace(self, **overrides) -> "GPT2Config":
        return dataclasses.replace(self, **overrides)


PRESETS = {
    "gpt2": GPT2Config(n_embd=768, n_layer=12, n_head=12),
    "gpt2-medium": GPT2Config(n_embd=1024, n_layer=24, n_head=16),
    "gpt2-large": GPT2Config(n_embd=1280, n_layer=36, n_head=20),
    "gpt2-xl": GPT2Config(n_embd=1600, n_layer=48, n_head=25),
    "tiny": GPT2Config(n_positions=128, n_embd=64, n_layer=2, n_head=4),
}


