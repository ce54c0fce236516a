"""Orbax checkpoints of {train state, data position, run config, model config} in WORKDIR/checkpoints/<step>/.

WORKDIR is a local path or gs://bucket/path (Orbax writes both; folder operations go through
interop/paths.py). Restoring tells three kinds of failure apart (`failure_kind`): damaged files
(missing, truncated, corrupt) make the checkpoint unusable, so an older one is used and the
damaged one set aside; transient ones (storage unavailable or slow, out of memory) are retried
with backoff and then fail the run with every checkpoint left in place; anything else (a bug, a
setting) fails the run too. In a multi-process run process 0 names each step to try and all
processes try it together, so they all restore the same one.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from typing import Any, Callable, NamedTuple, TypeVar

import jax
import numpy as np
import orbax.checkpoint as ocp

from gpt2_jax.errors import UserError
from gpt2_jax.interop import layout, paths
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
        if paths.is_remote(workdir):
            paths.honour_emulator()  # before tensorstore's first GCS request
        self.directory = paths.join(paths.absolute(workdir), "checkpoints")
        paths.refresh(self.directory)  # gs://: list what is there now, not what this process saw
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
        asked, back = layout.as_stored(abstract_state, paths.join(self.path(step), "state"))
        args = ocp.args.Composite(
            state=ocp.args.StandardRestore(asked),
            data=ocp.args.JsonRestore(),
            config=ocp.args.JsonRestore(),
        )
        out = self._manager.restore(step, args=args)
        return Restored(step, back(out["state"]), dict(out["data"]), dict(out["config"]))

    def model_config(self, step: int, **overrides) -> GPT2Config:
        """The GPT2Config a checkpoint was trained with (overrides: e.g. dtype for inference)."""
        saved = self._manager.restore(step, args=ocp.args.Composite(model=ocp.args.JsonRestore()))["model"]
        return GPT2Config(**{**saved, **overrides})

    def restore_params(self, step: int, abstract_params):
        """Only the parameters of `step` (no optimizer state is read), onto the shardings carried
        by `abstract_params`: for generation, export and evaluation."""
        abstract_params, back = layout.as_stored(abstract_params, paths.join(self.path(step), "state"), ("params",))
        restore_args = jax.tree_util.tree_map(lambda a: ocp.ArrayRestoreArgs(sharding=a.sharding), abstract_params)
        args = ocp.args.PyTreeRestore(
            item={"params": abstract_params}, restore_args={"params": restore_args}, partial_restore=True
        )
        return back(self._manager.restore(step, args=ocp.args.Composite(state=args))["state"]["params"])

    def restore_latest(self, abstract_state) -> Restored | None:
        """The newest checkpoint that restores; None if there are none. Process 0 names the
        step every process tries (so all restore the same one, whatever each sees listed).
        Damaged newer steps are renamed to `<step>.unusable` (kept for inspection, out of the way
        of the run that continues and saves those steps again); a transient or unknown failure
        raises CheckpointError and sets nothing aside."""
        self._manager.reload()
        own = self.steps()
        step = _agreed(own[-1] if own else -1)
        failures: dict[int, str] = {}
        while step >= 0:
            restored, kind, reason = self._try_together(lambda s=step: self.restore(s, abstract_state))
            if kind is None:
                break
            if kind != DAMAGED:
                raise CheckpointError(self._not_damage(step, kind, reason, failures))
            failures[step] = reason
            self.skipped.append(f"checkpoint {self.path(step)} is unusable, skipped it: {reason}")
            log.warning(self.skipped[-1])
            step = _agreed(max((s for s in own if s < step), default=-1))
        if step < 0:
            if not failures:
                return None
            raise CheckpointError(self._none_usable(failures))
        if failures:
            if jax.process_index() == 0:
                for bad in failures:
                    paths.rename(self.path(bad), _free_name(self.path(bad) + ".unusable"))
            if jax.process_count() > 1:
                from jax.experimental import multihost_utils

                multihost_utils.sync_global_devices("gpt2_jax: damaged checkpoints set aside")
            self._manager.reload()
        return restored

    def _try_together(self, restore: Callable[[], T]) -> tuple[T | None, str | None, str]:
        """(result, None, "") once `restore()` succeeds on every process; else (None, kind,
        reason) of the worst failure among them, after RETRY_DELAYS_S for transient ones."""
        for delay in (*RETRY_DELAYS_S, None):
            try:
                result, kind, reason = restore(), None, ""
            except Exception as e:  # classified below: only damage lets the caller skip the step
                result, kind, reason = None, failure_kind(e), _one_line(e)
            worst = _worst(kind)
            if worst is None:
                return result, None, ""
            if worst != TRANSIENT or delay is None:
                return None, worst, reason if kind == worst else f"a {worst} failure on another process"
            log.warning(f"restoring failed ({reason or 'on another process'}); retrying in {delay:g} s")
            time.sleep(delay)
        raise AssertionError("unreachable")

    def _not_damage(self, step: int, kind: str, reason: str, failures: dict) -> str:
        earlier = f" (newer ones were damaged: {', '.join(map(str, failures))})" if failures else ""
        tries = f" after {len(RETRY_DELAYS_S) + 1} tries" if kind == TRANSIENT else ""
        why = ("it looks transient (storage unavailable or slow, or out of memory)" if kind == TRANSIENT
               else "that does not look like damaged files (missing, truncated, corrupt)")  # fmt: skip
        return (f"could not restore checkpoint {self.path(step)}{tries}: {reason}; {why}, so no checkpoint was "
                f"set aside{earlier}. Fix the cause and run again, or move {self.path(step)} away to resume "
                "from an older checkpoint")  # fmt: skip

    def newest_usable(self, restore: Callable[[int], T]) -> T:
        """`restore(step)` for the newest step where it succeeds (this process alone: for reading
        a model, never setting anything aside). Unreadable checkpoints are skipped with a warning
        naming them; transient failures are retried first and raise CheckpointError when they
        persist; CheckpointError too if none is usable or there are none (never a silent fresh
        start)."""
        failures = {}  # step -> reason
        for step in reversed(self.steps()):
            result, kind, reason = _retrying(lambda: restore(step))
            if kind is None:
                return result
            if kind == TRANSIENT:
                raise CheckpointError(self._not_damage(step, kind, reason, failures))
            failures[step] = reason
            self.skipped.append(f"checkpoint {self.path(step)} is unusable, skipped it: {reason}")
            log.warning(self.skipped[-1])
        if not failures:
            raise CheckpointError(f"no checkpoints in {self.directory}")
        raise CheckpointError(self._none_usable(failures))

    def _none_usable(self, failures: dict[int, str]) -> str:
        reasons = set(failures.values())
        if len(failures) > 1 and len(reasons) == 1:  # damage rarely repeats itself exactly: say so
            listed = f"{', '.join(map(str, failures))} all fail the same way ({reasons.pop()})"
            also = ("; the same error from every checkpoint can also mean a problem of this program or its "
                    "settings rather than of the files")  # fmt: skip
        else:
            listed, also = "; ".join(f"{step} ({reason})" for step, reason in failures.items()), ""
        return (f"no usable checkpoint in {self.directory}: {listed}. Move the folder away to start "
                f"afresh, or fix the files{also}")  # fmt: skip

    def path(self, step: int) -> str:
        return paths.join(self.directory, str(step))

    def wait(self) -> None:
        """Block until every started save is on disk."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()


def _free_name(path: str) -> str:
    """`path`, or `path.1`, `path.2`, ... if it exists."""
    candidate, n = path, 0
    while paths.exists(candidate):
        n += 1
        candidate = f"{path}.{n}"
    return candidate


def _one_line(e: Exception) -> str:
    text = f"{type(e).__name__}: {e}".strip().splitlines()
    return text[0][:300] if text else type(e).__name__


# Restore failures, by kind. Decided from the exception (and its causes), as these libraries raise
# them: tensorstore raises ValueError whose message starts with an absl status code; Orbax's JSON
# items raise json.JSONDecodeError / FileNotFoundError; gcsfs raises HttpError (with .code),
# aiohttp errors or OSError. Damage is what the files themselves show: a missing file (NOT_FOUND,
# FileNotFoundError), a short one (OUT_OF_RANGE, EOFError), bytes that do not decode (DATA_LOSS,
# JSON / UTF-8 errors). Transient is what another try may not meet: the store unavailable, slow or
# throttling (UNAVAILABLE, DEADLINE_EXCEEDED, RESOURCE_EXHAUSTED, ABORTED, HTTP 408/429/5xx,
# connection errors, other OSErrors), or the host out of memory. Anything else (TypeError, a shape
# mismatch's INVALID_ARGUMENT) is neither: a problem of the program or its settings.
DAMAGED, TRANSIENT, OTHER = "damaged", "transient", "other"
_ORDER = (None, TRANSIENT, DAMAGED, OTHER)  # the worst one across processes decides
_DAMAGE_CODES = ("NOT_FOUND", "DATA_LOSS", "OUT_OF_RANGE")
_TRANSIENT_CODES = ("UNAVAILABLE", "DEADLINE_EXCEEDED", "RESOURCE_EXHAUSTED", "ABORTED")
RETRY_DELAYS_S = (1.0, 4.0, 16.0)  # between tries of a transient failure


def failure_kind(e: BaseException) -> str:
    """DAMAGED, TRANSIENT or OTHER for an exception raised while restoring (see above)."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, (FileNotFoundError, EOFError, json.JSONDecodeError, UnicodeDecodeError)):
            return DAMAGED
        if isinstance(e, (MemoryError, ConnectionError, TimeoutError)):
            return TRANSIENT
        code = getattr(e, "code", None)
        if type(e).__name__ == "HttpError" and isinstance(code, int):
            return TRANSIENT if code in (408, 429) or code >= 500 else OTHER
        if type(e).__module__.startswith("aiohttp") or isinstance(e, OSError):
            return TRANSIENT
        if isinstance(e, ValueError):
            status = str(e).split(":", 1)[0].strip()
            if status in _DAMAGE_CODES:
                return DAMAGED
            if status in _TRANSIENT_CODES:
                return TRANSIENT
        e = e.__cause__ or e.__context__
    return OTHER


def _retrying(fn: Callable[[], T]) -> tuple[T | None, str | None, str]:
    """(fn(), None, "") or, failing, (None, kind, reason); transient failures are retried."""
    for delay in (*RETRY_DELAYS_S, None):
        try:
            return fn(), None, ""
        except Exception as e:  # classified: the caller decides by kind
            kind, reason = failure_kind(e), _one_line(e)
        if kind != TRANSIENT or delay is None:
            return None, kind, reason
        log.warning(f"reading a checkpoint failed ({reason}); retrying in {delay:g} s")
        time.sleep(delay)
    raise AssertionError("unreachable")


def _agreed(step: int) -> int:
    """Process 0's `step`, on every process (single-process: `step`)."""
    if jax.process_count() == 1:
        return step
    from jax.experimental import multihost_utils

    return int(multihost_utils.broadcast_one_to_all(np.int64(step)))


def _worst(kind: str | None) -> str | None:
    """The worst failure kind across processes (None: every process succeeded)."""
    if jax.process_count() == 1:
        return kind
    from jax.experimental import multihost_utils

    codes = multihost_utils.process_allgather(np.int32(_ORDER.index(kind)))
    return _ORDER[int(np.max(codes))]
