"""Orbax checkpoints of {train state, data position, run config, model config} in WORKDIR/checkpoints/<step>/."""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any, Callable, NamedTuple, TypeVar

import jax
import orbax.checkpoint as ocp

from gpt2_jax.errors import UserError
from gpt2_jax.model import GPT2Config

log = logging.getLogger(__name__)
T = TypeVar("T")


class CheckpointError(UserError, RuntimeError):
    """No usable checkpoint where one was required; the message says what to do."""


class Restored(NamedTuple):
    step: int
    state: Any
    data_state: dict
    config: dict


def abstract_with_shardings(abstract_state, shardings):
    """ShapeDtypeStructs that carry the *current* mesh's shardings, so a checkpoint written on
    any device count restores straight onto this one."""
    return jax.tree_util.tree_map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract_state, shardings
    )


class Checkpoints:
    """Saves every `save` asynchronously (training continues while it writes) and keeps the
    newest `max_to_keep`. Orbax writes each step into a temporary folder and renames it when
    complete, so a run killed mid-write never leaves a step that looks finished."""

    def __init__(self, workdir: str, *, max_to_keep: int = 3, async_save: bool = True, create: bool = True):
        self.directory = os.path.join(os.path.abspath(workdir), "checkpoints")
        options = ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep,
            enable_async_checkpointing=async_save,
            cleanup_tmp_directories=create,
            create=create,
        )
        self._manager = ocp.CheckpointManager(
            self.directory, options=options, item_names=("state", "data", "config", "model")
        )
        self.skipped: list[str] = []  # what newest_usable skipped, one line each

    def steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    def save(self, step: int, state, data_state: dict, config: dict, model: GPT2Config, *, force: bool = False) -> bool:
        """Start writing a checkpoint of `step`; returns False if Orbax chose to skip it. `config`
        is the run's config; `model` lets generate/export/evaluate rebuild the model alone."""
        args = ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            data=ocp.args.JsonSave(data_state),
            config=ocp.args.JsonSave(config),
            model=ocp.args.JsonSave(dataclasses.asdict(model)),
        )
        return self._manager.save(step, args=args, force=force)

    def restore(self, step: int, abstract_state) -> Restored:
        """Restore `step` onto the shardings carried by `abstract_state` (see
        abstract_with_shardings)."""
        args = ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state),
            data=ocp.args.JsonRestore(),
            config=ocp.args.JsonRestore(),
        )
        out = self._manager.restore(step, args=args)
        return Restored(step, out["state"], dict(out["data"]), dict(out["config"]))

    def model_config(self, step: int, **overrides) -> GPT2Config:
        """The GPT2Config a checkpoint was trained with (overrides: e.g. dtype for inference)."""
        saved = self._manager.restore(step, args=ocp.args.Composite(model=ocp.args.JsonRestore()))["model"]
        return GPT2Config(**{**saved, **overrides})

    def restore_params(self, step: int, abstract_params):
        """Only the parameters of `step` (no optimizer state is read), onto the shardings carried
        by `abstract_params`: for generation, export and evaluation."""
        restore_args = jax.tree_util.tree_map(lambda a: ocp.ArrayRestoreArgs(sharding=a.sharding), abstract_params)
        args = ocp.args.PyTreeRestore(
            item={"params": abstract_params}, restore_args={"params": restore_args}, partial_restore=True
        )
        return self._manager.restore(step, args=ocp.args.Composite(state=args))["state"]["params"]

    def restore_latest(self, abstract_state) -> Restored | None:
        """The newest checkpoint that restores (see `newest_usable`); None if there are none.
        Unusable newer steps are renamed to `<step>.unusable` (kept for inspection, out of the
        way of the run that continues and saves those steps again)."""
        if not self.steps():
            return None
        restored = self.newest_usable(lambda step: self.restore(step, abstract_state))
        damaged = [s for s in self.steps() if s > restored.step]
        if damaged:
            if jax.process_index() == 0:
                for step in damaged:
                    os.replace(self.path(step), _free_name(self.path(step) + ".unusable"))
            if jax.process_count() > 1:
                from jax.experimental import multihost_utils

                multihost_utils.sync_global_devices("gpt2_jax: damaged checkpoints set aside")
            self._manager.reload()
        return restored

    def newest_usable(self, restore: Callable[[int], T]) -> T:
        """`restore(step)` for the newest step where it succeeds. Unreadable checkpoints
        (truncated, corrupted) are skipped with a warning naming them; CheckpointError if none
        is usable or there are none (never a silent fresh start)."""
        failures = {}  # step -> reason
        for step in reversed(self.steps()):
            try:
                return restore(step)
            except Exception as e:  # Orbax/tensorstore raise many kinds on damaged files
                failures[step] = _one_line(e)
                self.skipped.append(f"checkpoint {self.path(step)} is unusable, skipped it: {failures[step]}")
                log.warning(self.skipped[-1])
        if not failures:
            raise CheckpointError(f"no checkpoints in {self.directory}")
        reasons = set(failures.values())
        if len(failures) > 1 and len(reasons) == 1:  # damage rarely repeats itself exactly: say so
            listed = f"{', '.join(map(str, failures))} all fail the same way ({reasons.pop()})"
            also = ("; the same error from every checkpoint can also mean a problem of this program or its "
                    "settings rather than of the files")  # fmt: skip
        else:
            listed, also = "; ".join(f"{step} ({reason})" for step, reason in failures.items()), ""
        raise CheckpointError(f"no usable checkpoint in {self.directory}: {listed}. Move the folder away to start "
                              f"afresh, or fix the files{also}")  # fmt: skip

    def path(self, step: int) -> str:
        return os.path.join(self.directory, str(step))

    def wait(self) -> None:
        """Block until every started save is on disk."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()


def _free_name(path: str) -> str:
    """`path`, or `path.1`, `path.2`, ... if it exists."""
    candidate, n = path, 0
    while os.path.exists(candidate):
        n += 1
        candidate = f"{path}.{n}"
    return candidate


def _one_line(e: Exception) -> str:
    text = f"{type(e).__name__}: {e}".strip().splitlines()
    return text[0][:300] if text else type(e).__name__
