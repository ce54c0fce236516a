"""GPT-2 in Flax Linen: the Hugging Face architecture and parameter names, with logical axis names."""

from __future__ import annotations

import dataclasses
import math
from typing import Literal

import jax
import jax.numpy as jnp
import flax.linen as nn

VOCAB_SIZE = 50257

# Logical axis names. Parameters and activations get distinct names so that, say, parameters
# can be sharded over 'fsdp' along 'embed' while activations keep the embedding whole.
# sharding.py maps them to mesh axes; the model never names a mesh axis.
BATCH, LENGTH = "batch", "length"
ACT_EMBED, ACT_HEADS, ACT_MLP, ACT_VOCAB = "act_embed", "act_heads", "act_mlp", "act_vocab"
EMBED, HEADS, HEAD_DIM, QKV, MLP_DIM, VOCAB = "embed", "heads", "head_dim", "qkv", "mlp", "vocab"
POSITIONS = "positions"

ATTENTION_KERNELS = ("auto", "xla", "cudnn", "pallas")

REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots_saveable": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


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
    remat: Literal["none", "full", "dots_saveable"] = "none"
    vocab_pad_multiple: int = 1  # 128 pads 50257 -> 50304 for faster matmuls
    loss_chunk: int = 0  # > 0: the loss computes logits this many positions at a time (see chunked_loss_sums)

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


def _normal(std: float, names: tuple):
    return nn.with_logical_partitioning(nn.initializers.normal(stddev=std), names)


def _constant(value: float, names: tuple):
    return nn.with_logical_partitioning(nn.initializers.constant(value), names)


class Conv1D(nn.Module):
    """HF's Conv1D (a Dense whose kernel is [in, out]). `out_shape` splits the output features
    (e.g. (3, heads, head_dim) for the fused qkv) so each piece gets its own logical axis."""

    features: int
    kernel_axes: tuple  # logical names of the stored [in, out] kernel
    out_shape: tuple = ()  # optional view of the `features` dimension
    out_axes: tuple = ()  # logical names of that view, used as a sharding constraint
    std: float = 0.02
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):  # (..., in) -> (..., features) or (..., *out_shape)
        kernel = self.param("kernel", _normal(self.std, self.kernel_axes), (x.shape[-1], self.features))
        bias = self.param("bias", _constant(0.0, self.kernel_axes[1:]), (self.features,))
        kernel, bias = kernel.astype(self.dtype), bias.astype(self.dtype)
        if self.out_shape:
            kernel = kernel.reshape(kernel.shape[0], *self.out_shape)
            kernel = nn.with_logical_constraint(kernel, (self.kernel_axes[0], *self.out_axes))
            bias = bias.reshape(self.out_shape)
        y = jnp.tensordot(x.astype(self.dtype), kernel, axes=1)
        return y + bias


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
        qkv = Conv1D(
            3 * cfg.n_embd, (EMBED, QKV), (3, H, Dh), (None, HEADS, HEAD_DIM),
            dtype=cfg.compute_dtype, name="c_attn",
        )(x)  # (B, T, 3, H, Dh)
        qkv = nn.with_logical_constraint(qkv, (BATCH, LENGTH, None, ACT_HEADS, None))
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]  # each (B, T, H, Dh)
        kernel = attention_kernel(cfg)
        if decode:
            y = self._cached_attention(q, k, v)
        elif cfg.dropout > 0 and not deterministic:
            y = self._attention_with_dropout(q, k, v)
        elif kernel == "pallas" and q.shape[1] % SPLASH_BLOCK == 0:
            y = _splash_attention(q, k, v)
        else:
            impl = "cudnn" if kernel == "cudnn" else "xla"
            y = jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation=impl)
        y = nn.with_logical_constraint(y, (BATCH, LENGTH, ACT_HEADS, None))
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
        # The cache's length is fixed when it is created (see `init_cache`); T new tokens are
        # written at `index` and attend to every cached position up to their own.
        B, T, H, Dh = q.shape
        cached_k = self.variable("cache", "key", jnp.zeros, (B, T, H, Dh), k.dtype)
        cached_v = self.variable("cache", "value", jnp.zeros, (B, T, H, Dh), v.dtype)
        index = self.variable("cache", "index", lambda: jnp.zeros((), jnp.int32))
        i = index.value
        cached_k.value = jax.lax.dynamic_update_slice(cached_k.value, k, (0, i, 0, 0))
        cached_v.value = jax.lax.dynamic_update_slice(cached_v.value, v, (0, i, 0, 0))
        index.value = i + T
        L = cached_k.value.shape[1]
        mask = jnp.arange(L)[None, :] <= (i + jnp.arange(T))[:, None]  # (T, L)
        return jax.nn.dot_product_attention(q, cached_k.value, cached_v.value, mask=mask[None, None])


def platform() -> str:
    """'cuda', 'rocm', 'tpu' or 'cpu': what this process's default devices are."""
    backend = jax.default_backend()
    if backend != "gpu":
        return backend
    return "cuda" if "cuda" in jax.local_devices()[0].client.platform_version.lower() else "rocm"


def attention_problem(config: GPT2Config, kernel: str, where: str | None = None) -> str | None:
    """Why `kernel` cannot run `config` on platform `where` (default: this process's), or None.
    Off TPU 'pallas' runs, in interpret mode: fine for tests, far too slow to train with."""
    here = where is None
    where = where or platform()
    if kernel == "cudnn":
        if where != "cuda":
            return f"needs an NVIDIA GPU (this process runs on {where})"
        if config.dtype != "bfloat16":
            return "needs dtype 'bfloat16' (cuDNN's flash attention has no float32 kernel)"
        if config.head_dim % 8 or config.head_dim > 128:
            return f"needs a head size (n_embd / n_head) that is a multiple of 8 up to 128, not {config.head_dim}"
        if here and float(capability := jax.local_devices()[0].compute_capability) < 8.0:
            return f"needs an Ampere or newer GPU (compute capability 8.0+, not {capability})"
    if kernel == "pallas" and where != "tpu":
        return f"is a TPU kernel (this process runs on {where}, where it runs only in slow interpret mode)"
    return None


def attention_kernel(config: GPT2Config, where: str | None = None) -> str:
    """The kernel config.attention stands for on platform `where` (default: this process's).
    'auto' is cuDNN's flash attention where it runs (bfloat16 on NVIDIA GPUs) and XLA's
    otherwise; on TPUs too, until the splash kernel ('pallas') has been checked on one."""
    if config.attention != "auto":
        return config.attention
    return "xla" if attention_problem(config, "cudnn", where) else "cudnn"


SPLASH_BLOCK = 128  # the splash kernel's query / key block; sequence lengths must be multiples


def _splash_attention(q, k, v):  # (B, T, H, Dh) each -> (B, T, H, Dh)
    """Causal attention through the Pallas TPU splash kernel. Under a mesh, each device runs the
    kernel on its own batch rows and heads (shard_map): the kernel has no partitioning rule."""
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as masks

    def local(q, k, v):
        _, T, H, Dh = q.shape
        block = min(512 if T % 512 == 0 else SPLASH_BLOCK, T)
        sizes = splash.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block, block_q_dkv=block,
                                  block_kv_dkv=block, block_kv_dkv_compute=block, block_q_dq=block, block_kv_dq=block)  # fmt: skip
        kernel = splash.make_splash_mha(masks.MultiHeadMask([masks.CausalMask((T, T))] * H), block_sizes=sizes,
                                        head_shards=1, q_seq_shards=1, interpret=jax.default_backend() != "tpu")  # fmt: skip
        scale = jnp.asarray(1.0 / math.sqrt(Dh), q.dtype)  # the kernel does not scale the scores
        one = lambda q, k, v: kernel(q.swapaxes(0, 1) * scale, k.swapaxes(0, 1), v.swapaxes(0, 1)).swapaxes(0, 1)  # noqa: E731
        return jax.vmap(one)(q, k, v)

    if jax.sharding.get_abstract_mesh().empty:
        return local(q, k, v)
    spec = nn.logical_to_mesh_axes((BATCH, LENGTH, ACT_HEADS, None))
    if spec[1] is not None:
        raise ValueError("attention='pallas' needs the sequence ('length') unsharded")
    return jax.shard_map(local, in_specs=(spec, spec, spec), out_specs=spec, check_vma=False)(q, k, v)


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
    """Pre-LayerNorm transformer block; the residual stream stays float32."""

    config: GPT2Config

    @nn.compact
    def __call__(self, x, deterministic: bool, decode: bool = False):  # (B, T, D) float32
        cfg = self.config
        x = x + Attention(cfg, name="attn")(_layer_norm(cfg, "ln_1")(x), deterministic, decode).astype(jnp.float32)
        x = x + MLP(cfg, name="mlp")(_layer_norm(cfg, "ln_2")(x), deterministic).astype(jnp.float32)
        return nn.with_logical_constraint(x, (BATCH, LENGTH, ACT_EMBED))


class GPT2(nn.Module):
    """GPT-2 language model: int32 tokens (B, T) -> float32 logits (B, T, padded_vocab_size).
    `decode=True` continues from the KV cache in the mutable 'cache' collection (see init_cache).
    `return_hidden=True` stops before the LM head: the final hidden states (B, T, D) after ln_f,
    in the compute dtype (the chunked loss applies the head itself, a piece at a time)."""

    config: GPT2Config

    @nn.compact
    def __call__(self, tokens, deterministic: bool = True, decode: bool = False, return_hidden: bool = False):
        cfg = self.config
        B, T = tokens.shape
        wte = self.param("wte", _padded_normal(cfg), (cfg.padded_vocab_size, cfg.n_embd))
        wpe = self.param("wpe", _normal(0.02, (POSITIONS, EMBED)), (cfg.n_positions, cfg.n_embd))
        start = 0
        if decode:
            position = self.variable("cache", "position", lambda: jnp.zeros((), jnp.int32))
            start, position.value = position.value, position.value + T
        x = wte[tokens] + jax.lax.dynamic_slice_in_dim(wpe, start, T)[None]  # (B, T, D) float32
        x = nn.with_logical_constraint(x, (BATCH, LENGTH, ACT_EMBED))
        x = nn.Dropout(cfg.dropout)(x, deterministic=deterministic)
        block = Block
        if cfg.remat != "none" and not decode:
            block = nn.remat(Block, static_argnums=(2, 3), policy=REMAT_POLICIES[cfg.remat])
        for i in range(cfg.n_layer):
            x = block(cfg, name=f"h_{i}")(x, deterministic, decode)
        x = _layer_norm(cfg, "ln_f")(x)
        if return_hidden:
            return x
        return lm_head(x, wte, cfg)


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


def cross_entropy_sums(logits, targets, weights=None):
    """(sum of weights x next-token NLL, sum of weights) in float32; no weights: all 1."""
    logits = logits.astype(jnp.float32)
    logz = jax.nn.logsumexp(logits, axis=-1)
    target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    nll = logz - target_logit
    if weights is None:
        return nll.sum(), jnp.asarray(nll.size, jnp.float32)
    weights = weights.astype(jnp.float32)
    return (nll * weights).sum(), weights.sum()


def _mean(sums):
    total, count = sums
    return total / jnp.maximum(count, 1.0)  # all weights 0: loss 0 rather than NaN


def cross_entropy(logits, targets, weights=None):
    """Mean next-token loss in float32. logits (B, T, V), targets int (B, T), weights (B, T)."""
    return _mean(cross_entropy_sums(logits, targets, weights))


def chunked_loss_sums(hidden, wte, targets, weights, cfg: GPT2Config):
    """cross_entropy_sums(lm_head(hidden, wte, cfg), targets, weights), computed cfg.loss_chunk
    positions at a time, so float32 logits exist for one chunk of (B, loss_chunk) positions
    only. Each chunk is rematerialised in the backward pass (one extra head matmul, 2·V·D
    FLOPs per token) rather than keeping its logits. A sequence that does not divide into
    chunks is padded with weight-0 positions."""
    B, T, D = hidden.shape
    C = min(cfg.loss_chunk, T)
    n = -(-T // C)
    weights = jnp.ones((B, T), jnp.float32) if weights is None else weights.astype(jnp.float32)
    count = weights.sum()
    if n * C != T:
        pad = ((0, 0), (0, n * C - T))
        hidden = jnp.pad(hidden, pad + ((0, 0),))
        targets, weights = jnp.pad(targets, pad), jnp.pad(weights, pad)

    def chunks(x):  # (B, n*C, ...) -> (n, B, C, ...)
        return jnp.swapaxes(x.reshape(B, n, C, *x.shape[2:]), 0, 1)

    @jax.checkpoint
    def chunk_sum(h, y, w):
        return cross_entropy_sums(lm_head(h, wte, cfg), y, w)[0]

    def body(total, xs):
        return total + chunk_sum(*xs), None

    total, _ = jax.lax.scan(body, jnp.zeros((), jnp.float32), (chunks(hidden), chunks(targets), chunks(weights)))
    return total, count


def loss_sums(model: GPT2, params, inputs, targets, weights=None, *, deterministic=True, rngs=None):
    """(sum of weights x NLL, sum of weights) of `model` on one batch: through full logits, or
    chunk by chunk when model.config.loss_chunk > 0 (same value, less memory)."""
    cfg = model.config
    variables = {"params": params}
    if cfg.loss_chunk > 0:
        hidden = model.apply(variables, inputs, deterministic=deterministic, rngs=rngs, return_hidden=True)
        return chunked_loss_sums(hidden, params["wte"], targets, weights, cfg)
    logits = model.apply(variables, inputs, deterministic=deterministic, rngs=rngs)
    return cross_entropy_sums(logits, targets, weights)


def loss_fn(model: GPT2, params, inputs, targets, weights=None, *, deterministic=True, rngs=None):
    """Mean (or weighted mean) next-token cross-entropy of `model` with `params` on one batch."""
    return _mean(loss_sums(model, params, inputs, targets, weights, deterministic=deterministic, rngs=rngs))


def abstract_params(config: GPT2Config, boxed: bool = False):
    """Parameter shapes/dtypes via jax.eval_shape (nothing allocated), the same under any mesh
    and axis rules in force; logical boxes if `boxed`."""
    with nn.logical_axis_rules(()):  # shapes only: no sharding constraint applies
        variables = jax.eval_shape(lambda: GPT2(config).init(jax.random.key(0), jnp.zeros((1, 1), jnp.int32)))
        params = variables["params"]
        return params if boxed else nn.unbox(params)


def init_params(config: GPT2Config, rng) -> dict:
    """Freshly initialised float32 parameters (unboxed)."""
    variables = GPT2(config).init(rng, jnp.zeros((1, 1), jnp.int32))
    return nn.unbox(variables["params"])


def init_cache(config: GPT2Config, batch_size: int, max_length: int | None = None) -> dict:
    """An empty KV cache for `batch_size` sequences of up to `max_length` (default n_positions)
    tokens, in the compute dtype."""
    length = max_length or config.n_positions
    tokens = jnp.zeros((batch_size, length), jnp.int32)
    shapes = jax.eval_shape(lambda: GPT2(config).init(jax.random.key(0), tokens, decode=True))["cache"]
    return jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)


def count_params(params) -> int:
    return sum(math.prod(x.shape) for x in jax.tree_util.tree_leaves(params))


def logical_axes(config: GPT2Config):
    """Pytree of logical axis-name tuples matching the parameter pytree."""
    return nn.get_partition_spec(abstract_params(config, boxed=True))
