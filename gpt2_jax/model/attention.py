"""Attention kernels: which one a config runs on which platform (xla / cudnn / splash), and the TPU splash call."""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from gpt2_jax.model.config import ACT_HEADS, BATCH, LENGTH, GPT2Config


def platform(devices=None) -> str:
    """'cuda', 'rocm', 'tpu' or 'cpu': the platform of `devices`, else of the current mesh (set
    with jax.set_mesh; readable while tracing), else of this process's default devices. A step
    compiled for a TPU topology from a CPU host so follows the topology, not the host."""
    if devices is not None:
        device = next(iter(devices))
        return _gpu_vendor(device.platform, device.device_kind, device)
    abstract = jax.sharding.get_abstract_mesh()
    if not abstract.empty and abstract.abstract_device is not None:
        return _gpu_vendor(abstract.abstract_device.platform, abstract.abstract_device.device_kind)
    return _gpu_vendor(jax.default_backend(), "", jax.local_devices()[0])


def _gpu_vendor(name: str, kind: str, device=None) -> str:
    if name != "gpu":
        return name
    if device is not None and getattr(device, "client", None) is not None:
        kind = device.client.platform_version
    return "rocm" if any(w in kind.lower() for w in ("rocm", "amd", "instinct")) else "cuda"


def attention_problem(config: GPT2Config, kernel: str, where: str | None = None) -> str | None:
    """Why `kernel` cannot run `config` on platform `where` (default: platform()'s), or None.
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
    """The kernel config.attention stands for on platform `where` (default: platform()'s).
    'auto' is the splash kernel on TPUs (it lowers through Mosaic for a TPU topology, and its
    numbers match XLA's in interpret mode: tests/test_model.py, tests/test_tpu_compile.py),
    cuDNN's flash attention where it runs (bfloat16 on NVIDIA GPUs), and XLA's otherwise."""
    if config.attention != "auto":
        return config.attention
    where = where or platform()
    if where == "tpu":
        return "pallas"
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
                                        head_shards=1, q_seq_shards=1, interpret=platform() != "tpu")  # fmt: skip
        scale = jnp.asarray(1.0 / math.sqrt(Dh), q.dtype)  # the kernel does not scale the scores
        one = lambda q, k, v: kernel(q.swapaxes(0, 1) * scale, k.swapaxes(0, 1), v.swapaxes(0, 1)).swapaxes(0, 1)  # noqa: E731
        return jax.vmap(one)(q, k, v)

    if jax.sharding.get_abstract_mesh().empty:
        return local(q, k, v)
    spec = nn.logical_to_mesh_axes((BATCH, LENGTH, ACT_HEADS, None))
    if spec[1] is not None:
        raise ValueError("attention='pallas' needs the sequence ('length') unsharded")
    return jax.shard_map(local, in_specs=(spec, spec, spec), out_specs=spec, check_vma=False)(q, k, v)


