"""Load a model (GPT2Config + params) for inference from a training workdir or a Hugging Face folder."""

from __future__ import annotations

from typing import NamedTuple

import jax

from gpt2_jax.errors import UserError
from gpt2_jax.interop.checkpoint import Checkpoints
from gpt2_jax.interop import paths
from gpt2_jax.interop.hf import load_hf
from gpt2_jax.model import GPT2Config, abstract_params


class LoadedModel(NamedTuple):
    label: str  # e.g. "runs/x@1200" or "hf:gpt2"
    config: GPT2Config
    params: dict
    step: int | None  # training step for a workdir checkpoint


def load_workdir(workdir: str, step: int | None = None, placement: jax.sharding.Sharding | None = None,
                 **overrides) -> LoadedModel:  # fmt: skip
    """Parameters of checkpoint `step` (default: the newest usable one) of a training workdir,
    each array placed with `placement` (default: this process's first device; inside a training
    run, a replicated sharding of its mesh). `overrides` change the model config (e.g. dtype);
    the attention kernel is chosen for this process's devices, not taken from the training run."""
    if not paths.isdir(workdir):
        raise UserError(f"workdir {workdir} does not exist")
    ckpts = Checkpoints(workdir, create=False)  # reading writes nothing
    steps = ckpts.steps()
    if not steps:
        raise UserError(f"{workdir} has no checkpoints yet (looked in {ckpts.directory})")
    if step is not None and step not in steps:
        raise UserError(f"{workdir} has no checkpoint for step {step}; it has {_list(steps)}")

    def restore(s: int) -> LoadedModel:
        config = ckpts.model_config(s, **{"attention": "auto", **overrides})
        params = ckpts.restore_params(s, _placed(abstract_params(config), placement))
        return LoadedModel(f"{workdir}@{s}", config, params, s)

    return restore(step) if step is not None else ckpts.newest_usable(restore)


def load_hf_folder(path: str, **overrides) -> LoadedModel:
    if not paths.isdir(path):
        raise UserError(f"Hugging Face folder {path} does not exist")
    config, params = load_hf(path, **overrides)
    return LoadedModel(f"hf:{path}", config, jax.device_put(params), None)


def _placed(abstract, placement: jax.sharding.Sharding | None):
    placement = placement or jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    return jax.tree_util.tree_map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=placement), abstract)


def _list(steps: list[int]) -> str:
    return ", ".join(map(str, steps[-10:])) + (" (newest 10)" if len(steps) > 10 else "")
