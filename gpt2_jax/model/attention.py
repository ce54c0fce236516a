"""Attention kernels: which one a config runs on which platform (xla / cudnn / splash), and the TPU splash call."""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from gpt2_jax.model.config import ACT_HEADS, BATCH, LENGTH, GPT2Config


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


def splash_attention(q, k, v):  # (B, T, H, Dh) each -> (B, T, H, Dh)
    """Causal attention through the Pallas TPU splash kernel. Under a mesh, each device runs the
    kernel on its own batch rows and heads (shard_map): the kernel has no partitioning rule."""
    from jax.experimental.pallas.ops.tpu.splash_attention import (
        splash_attention_kernel as splash,
    )
    from jax.experimental.pallas.ops.tpu.splash_attention import (
        splash_attention_mask as masks,
    )

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


