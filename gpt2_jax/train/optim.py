"""The optimizer: global-norm clipping -> AdamW (weight decay on matrices only), warmup + cosine schedule.

Matches torch.optim.AdamW (decoupled decay, eps outside the square root, bias correction) with
torch.nn.utils.clip_grad_norm_ before it, as nanoGPT / llm.c train GPT-2.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax


def lr_schedule(peak_lr: float, total_steps: int, warmup_steps: int, min_lr_ratio: float = 0.1) -> optax.Schedule:
    """Linear warmup to `peak_lr` over `warmup_steps` (step 0 already gets peak/warmup, so no
    step is wasted at lr 0), then cosine decay to `min_lr_ratio * peak_lr` at `total_steps`."""
    if not 0 <= warmup_steps <= total_steps:
        raise ValueError(f"warmup_steps ({warmup_steps}) must be between 0 and total_steps ({total_steps})")
    if not 0 <= min_lr_ratio <= 1:
        raise ValueError(f"min_lr_ratio must be in [0, 1], got {min_lr_ratio}")
    min_lr = peak_lr * min_lr_ratio
    decay_steps = max(total_steps - warmup_steps, 1)

    def schedule(step):
        step = jnp.asarray(step, jnp.float32)
        warm = peak_lr * (step + 1) / max(warmup_steps, 1)
        progress = jnp.clip((step - warmup_steps) / decay_steps, 0.0, 1.0)
        cosine = min_lr + 0.5 * (peak_lr - min_lr) * (1 + jnp.cos(jnp.pi * progress))
        return jnp.where(step < warmup_steps, warm, cosine)

    return schedule


def decay_mask(params):
    """True for matrices (kernels, embeddings), False for biases and LayerNorm scales: vectors,
    and by name, since c_attn's bias is (3, H, Dh) and scanned layers stack every leaf."""
    return jax.tree_util.tree_map_with_path(
        lambda path, p: p.ndim >= 2 and getattr(path[-1], "key", None) not in ("bias", "scale"), params
    )


def make_optimizer(
    schedule: optax.Schedule,
    *,
    weight_decay: float = 0.1,
    b1: float = 0.9,
    b2: float = 0.95,
    eps: float = 1e-8,
    grad_clip: float = 1.0,
) -> optax.GradientTransformation:
    """clip_by_global_norm(grad_clip) (none if 0) -> AdamW(schedule) with decay on matrices. The
    state has the same structure either way, so a checkpoint restores whatever the clip."""
    clip = optax.clip_by_global_norm(grad_clip) if grad_clip > 0 else optax.identity()
    adamw = optax.adamw(schedule, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay, mask=decay_mask)
    return optax.chain(clip, adamw)


def schedule_count(opt_state, default):
    """The count the learning-rate schedule reads in `opt_state` (optax's ScaleByScheduleState):
    the number of updates actually applied. Unlike the train state's step it does not advance
    on an update that apply_if_finite left out, so lr_fn(schedule_count(...)) is the learning
    rate the next update applies. `default` where the optimizer has no schedule."""
    is_schedule = lambda x: isinstance(x, optax.ScaleByScheduleState)  # noqa: E731
    found = [s.count for s in jax.tree_util.tree_leaves(opt_state, is_leaf=is_schedule) if is_schedule(s)]
    return found[0] if found else default
