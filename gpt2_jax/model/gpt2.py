"""GPT-2 in Flax Linen: the Hugging Face architecture and parameter names, with logical axis names."""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from gpt2_jax.model.attention import SPLASH_BLOCK, attention_kernel, splash_attention
from gpt2_jax.model.config import (
    ACT_EMBED,
    ACT_HEADS,
    ACT_MLP,
    ACT_VOCAB,
    BATCH,
    EMBED,
    HEAD_DIM,
    HEADS,
    LAYERS,
    LENGTH,
    MLP_DIM,
    POSITIONS,
    QKV,
    REMAT_POLICIES,
    VOCAB,
    GPT2Config,
)


def _normal(std: float, names: tuple):
    return nn.with_logical_partitioning(nn.initializers.normal(stddev=std), names)


def _constant(value: float, names: tuple):
    return nn.with_logical_partitioning(nn.initializers.constant(value), names)


class Conv1D(nn.Module):
    """HF's Conv1D (a Dense whose kernel is [in, *out]). `features` may be a shape: c_attn's
    kernel is stored head-major (D, 3, H, Dh), so tensor parallelism divides it by heads (HF's
    (D, 3*D) is the same memory order; interop/hf.py reshapes on the way in and out)."""

    features: int | tuple
    kernel_axes: tuple  # logical names of the stored kernel: (in, *out); the bias takes (*out)
    std: float = 0.02
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):  # (..., in) -> (..., *features)
        out = (self.features,) if isinstance(self.features, int) else tuple(self.features)
        kernel = self.param("kernel", _normal(self.std, self.kernel_axes), (x.shape[-1], *out))
        bias = self.param("bias", _constant(0.0, self.kernel_axes[1:]), out)
        y = jnp.tensordot(x.astype(self.dtype), kernel.astype(self.dtype), axes=1)
        return y + bias.astype(self.dtype)


class LayerNorm(nn.Module):
    """LayerNorm computed in float32 (as HF does), returned in the compute dtype; `scale` and
    `bias` sit directly under its name, like HF's `ln_1.weight` / `ln_1.bias`."""

    epsilon: float
    dtype: jnp.dtype

    @nn.compact
    def __call__(self, x):
        d = x.shape[-1]
        scale = self.param("scale", _constant(1.0, (EMBED,)), (d,))
        bias = self.param("bias", _constant(0.0, (EMBED,)), (d,))
        x = x.astype(jnp.float32)
        mean = x.mean(-1, keepdims=True)
        var = jnp.square(x - mean).mean(-1, keepdims=True)
        y = (x - mean) * jax.lax.rsqrt(var + self.epsilon) * scale + bias
        return y.astype(self.dtype)


def _layer_norm(config: GPT2Config, name: str) -> LayerNorm:
    return LayerNorm(epsilon=config.layer_norm_epsilon, dtype=config.compute_dtype, name=name)


class Attention(nn.Module):
    """Causal multi-head self-attention with a fused qkv projection. With `decode`, keys and
    values go into a fixed-size cache (the 'cache' collection) so generation compiles once.

    config.attention picks the kernel: 'xla' (jax.nn.dot_product_attention, any device),
    'cudnn' (its cuDNN flash attention; NVIDIA GPUs, bfloat16), 'pallas' (the splash
    attention kernel from jax.experimental.pallas.ops.tpu, for TPUs; sequences whose length is
    not a multiple of 128 fall back to 'xla'; off TPU it runs in Pallas interpret mode, slowly,
    which is how the tests check its numbers), or 'auto' (see attention_kernel)."""

    config: GPT2Config

    @nn.compact
    def __call__(self, x, deterministic: bool, decode: bool = False):  # (B, T, D) -> (B, T, D)
        cfg = self.config
        H, Dh = cfg.n_head, cfg.head_dim
        qkv = Conv1D((3, H, Dh), (EMBED, QKV, HEADS, HEAD_DIM), dtype=cfg.compute_dtype, name="c_attn")(x)
        qkv = checkpoint_name(qkv, "qkv_proj")  # (B, T, 3, H, Dh)
        qkv = nn.with_logical_constraint(qkv, (BATCH, LENGTH, None, ACT_HEADS, None))
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]  # each (B, T, H, Dh)
        kernel = attention_kernel(cfg)
        if decode:
            y = self._cached_attention(q, k, v)
        elif cfg.dropout > 0 and not deterministic:
            y = self._attention_with_dropout(q, k, v)
        elif kernel == "pallas" and q.shape[1] % SPLASH_BLOCK == 0:
            y = splash_attention(q, k, v)
        else:
            impl = "cudnn" if kernel == "cudnn" else "xla"
            y = jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation=impl)
        y = checkpoint_name(nn.with_logical_constraint(y, (BATCH, LENGTH, ACT_HEADS, None)), "attn_out")
        y = y.reshape(*y.shape[:2], cfg.n_embd)  # (B, T, D)
        y = Conv1D(cfg.n_embd, (HEADS, EMBED), std=_residual_std(cfg), dtype=cfg.compute_dtype, name="c_proj")(y)
        return nn.Dropout(cfg.dropout)(y, deterministic=deterministic)

    def _attention_with_dropout(self, q, k, v):
        # jax.nn.dot_product_attention has no dropout; HF drops attention probabilities.
        T = q.shape[1]
        scores = jnp.einsum("bqhd,bkhd->bhqk", q, k).astype(jnp.float32) / math.sqrt(q.shape[-1])
        causal = jnp.tril(jnp.ones((T, T), dtype=bool))
        scores = jnp.where(causal, scores, jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(scores, axis=-1).astype(q.dtype)
        probs = nn.Dropout(self.config.dropout)(probs, deterministic=False)
        return jnp.einsum("bhqk,bkhd->bqhd", probs, v)

    def _cached_attention(self, q, k, v):
        # The cache's length L is fixed when it is created (see `init_cache`); each row b writes its
        # T new tokens at its own position index[b] and they attend to that row's cached positions
        # up to their own, so rows holding prompts of different lengths share one batch.
        B, T, H, Dh = q.shape
        cached_k = self.variable("cache", "key", jnp.zeros, (B, T, H, Dh), k.dtype)
        cached_v = self.variable("cache", "value", jnp.zeros, (B, T, H, Dh), v.dtype)
        index = self.variable("cache", "index", lambda: jnp.zeros((B,), jnp.int32))
        i, L = index.value, cached_k.value.shape[1]  # i: (B,)
        _check_cache_room(i, T, L)
        write = jax.vmap(lambda cache, new, at: jax.lax.dynamic_update_slice_in_dim(cache, new, at, axis=0))
        cached_k.value = write(cached_k.value, k, i)
        cached_v.value = write(cached_v.value, v, i)
        index.value = i + T
        mask = jnp.arange(L)[None, None, :] <= (i[:, None] + jnp.arange(T))[:, :, None]  # (B, T, L)
        y = jax.nn.dot_product_attention(q, cached_k.value, cached_v.value, mask=mask[:, None])
        # A write past the end is clamped by dynamic_update_slice onto the last cached positions,
        # which would give finite, wrong outputs. Under jit the index is not known on the host, so
        # a row whose step does not fit gets NaN outputs, all of them, as does every step of that
        # row after it (its index only grows): an overflow can never pass for logits.
        return jnp.where((i + T > L)[:, None, None, None], jnp.nan, y)


def _check_cache_room(index, tokens: int, length: int) -> None:
    """Raise where an overflow of the KV cache is known on the host: more new tokens than the cache
    holds (shapes are static), or a concrete index (the module applied outside jit)."""
    if tokens > length:
        raise ValueError(f"{tokens} tokens do not fit the {length}-position KV cache; make a longer one with init_cache")
    if not isinstance(index, jax.core.Tracer) and (last := int(jnp.max(index))) + tokens > length:
        raise ValueError(f"decoding {tokens} token(s) at position {last} goes past the end of the "
                         f"{length}-position KV cache; make a longer one with init_cache")  # fmt: skip


class MLP(nn.Module):
    config: GPT2Config

    @nn.compact
    def __call__(self, x, deterministic: bool):  # (B, T, D) -> (B, T, D)
        cfg = self.config
        h = Conv1D(4 * cfg.n_embd, (EMBED, MLP_DIM), dtype=cfg.compute_dtype, name="c_fc")(x)  # (B, T, 4D)
        h = nn.with_logical_constraint(h, (BATCH, LENGTH, ACT_MLP))
        h = jax.nn.gelu(h, approximate=True)
        h = Conv1D(cfg.n_embd, (MLP_DIM, EMBED), std=_residual_std(cfg), dtype=cfg.compute_dtype, name="c_proj")(h)
        return nn.Dropout(cfg.dropout)(h, deterministic=deterministic)


def _residual_std(cfg: GPT2Config) -> float:
    # GPT-2 scales the init of projections that write into the residual stream by 1/sqrt(2L).
    return 0.02 / math.sqrt(2 * cfg.n_layer)


class Block(nn.Module):
    """Pre-LayerNorm transformer block; the residual stream stays float32. `scanned`: the body
    of nn.scan (see `layers`), returning (x, None) as a scan carry."""

    config: GPT2Config
    scanned: bool = False

    @nn.compact
    def __call__(self, x, deterministic: bool, decode: bool = False):  # (B, T, D) float32
        cfg = self.config
        x = x + Attention(cfg, name="attn")(_layer_norm(cfg, "ln_1")(x), deterministic, decode).astype(jnp.float32)
        x = x + MLP(cfg, name="mlp")(_layer_norm(cfg, "ln_2")(x), deterministic).astype(jnp.float32)
        x = nn.with_logical_constraint(x, (BATCH, LENGTH, ACT_EMBED))
        return (x, None) if self.scanned else x


def _block(cfg: GPT2Config, decode: bool):
    """Block, rematerialised in the backward pass as config.remat says (never while decoding)."""
    if cfg.remat == "none" or decode:
        return Block
    # Inside a scan the loop already keeps XLA from merging recomputation with the forward pass.
    return nn.remat(Block, static_argnums=(2, 3), policy=REMAT_POLICIES[cfg.remat], prevent_cse=not cfg.scan_layers)


def layers(cfg: GPT2Config, x, deterministic: bool, decode: bool):
    """The n_layer blocks: unrolled (parameters h_0 ... h_{L-1}), or with config.scan_layers one
    nn.scan over a block whose parameters (and KV cache) are stacked on a leading 'layers' axis
    under `h`, so the step compiles one block whatever the depth."""
    block = _block(cfg, decode)
    if not cfg.scan_layers:
        for i in range(cfg.n_layer):
            x = block(cfg, name=f"h_{i}")(x, deterministic, decode)
        return x
    scan = nn.scan(block, variable_axes={"params": 0, "cache": 0}, split_rngs={"params": True, "dropout": True},
                   in_axes=(nn.broadcast, nn.broadcast), length=cfg.n_layer,
                   metadata_params={nn.PARTITION_NAME: LAYERS})  # fmt: skip
    x, _ = scan(cfg, scanned=True, name="h")(x, deterministic, decode)
    return x


class GPT2(nn.Module):
    """GPT-2 language model: int32 tokens (B, T) -> float32 logits (B, T, padded_vocab_size).
    `decode=True` continues from the KV cache in the mutable 'cache' collection (see init_cache),
    each row from its own position; tokens past the cache's end are an error (ValueError, or NaN
    logits under jit: see Attention).
    `return_hidden=True` stops before the LM head: the final hidden states (B, T, D) after ln_f,
    in the compute dtype (the chunked loss applies the head itself, a piece at a time)."""

    config: GPT2Config

    @nn.compact
    def __call__(self, tokens, deterministic: bool = True, decode: bool = False, return_hidden: bool = False):
        cfg = self.config
        B, T = tokens.shape
        wte = self.param("wte", _padded_normal(cfg), (cfg.padded_vocab_size, cfg.n_embd))
        wpe = self.param("wpe", _normal(0.02, (POSITIONS, EMBED)), (cfg.n_positions, cfg.n_embd))
        if decode:  # each row continues from its own position (B,)
            position = self.variable("cache", "position", lambda: jnp.zeros((B,), jnp.int32))
            if (length := _cache_length(self)) is not None:  # here too: inside nn.scan every index is traced
                _check_cache_room(position.value, T, length)
            positions = position.value[:, None] + jnp.arange(T)  # (B, T)
            position.value = position.value + T
            x = wte[tokens] + wpe[positions]  # (B, T, D) float32
        else:
            x = wte[tokens] + jax.lax.dynamic_slice_in_dim(wpe, 0, T)[None]  # (B, T, D) float32
        x = nn.with_logical_constraint(x, (BATCH, LENGTH, ACT_EMBED))
        x = nn.Dropout(cfg.dropout)(x, deterministic=deterministic)
        x = layers(cfg, x, deterministic, decode)
        x = _layer_norm(cfg, "ln_f")(x)
        if return_hidden:
            return x
        return lm_head(x, wte, cfg)


def _cache_length(model: nn.Module) -> int | None:
    """Positions the KV cache holds (None while it is being created): keys are (B, L, H, Dh) per
    layer, with a leading layer axis when scanned."""
    cache = model.variables.get("cache", {})
    layer = cache.get("h", cache.get("h_0"))
    return None if layer is None else layer["attn"]["key"].shape[-3]


def lm_head(x, wte, cfg: GPT2Config):
    """(B, T, D) hidden states -> float32 logits (B, T, padded V), padding columns masked: the
    LM head is tied to wte."""
    logits = jnp.einsum("btd,vd->btv", x, wte.astype(cfg.compute_dtype), preferred_element_type=jnp.float32)
    logits = nn.with_logical_constraint(logits, (BATCH, LENGTH, ACT_VOCAB))
    return _mask_vocab_padding(logits, cfg)


def _padded_normal(cfg: GPT2Config):
    """wte init: normal(0.02) for real tokens, zeros for padding rows."""

    def init(key, shape, dtype=jnp.float32):
        w = 0.02 * jax.random.normal(key, shape, dtype)
        return w.at[cfg.vocab_size :].set(0.0)

    return nn.with_logical_partitioning(init, (VOCAB, EMBED))


def _mask_vocab_padding(logits, cfg: GPT2Config):
    """Padding columns pushed to the lowest float32. Added as a constant bias, not selected with
    jnp.where: the same logits, but the gradient passes through unchanged instead of costing
    another pass over the (B, T, V) logits (softmax is exactly 0 at those columns anyway)."""
    if cfg.padded_vocab_size == cfg.vocab_size:
        return logits
    is_pad = jnp.arange(cfg.padded_vocab_size) >= cfg.vocab_size
    return logits + jnp.where(is_pad, jnp.finfo(jnp.float32).min, 0.0)


