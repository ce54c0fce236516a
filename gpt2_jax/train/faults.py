"""Deterministic fault injection for resume tests, read from the GPT2_JAX_FAULT environment variable.

    GPT2_JAX_FAULT="sigkill_at:8"          SIGKILL right after step 8 (and its checkpoint, if any, is on disk)
    GPT2_JAX_FAULT="sigkill_saving:8"      SIGKILL while the checkpoint of step 8 is being written
    GPT2_JAX_FAULT="sigterm_at:8"          SIGTERM to this process after step 8 (it stops after step 9)
    GPT2_JAX_FAULT="nan_update_at:8"       the update of step 8 is non-finite (its learning rate is NaN)

Several may be joined with commas. Unset (always, outside tests) it does nothing.
"""

from __future__ import annotations

import os
import signal
import time

import jax

KINDS = ("sigkill_at", "sigkill_saving", "sigterm_at", "nan_update_at")


def _parse(text: str) -> dict[str, set[int]]:
    faults: dict[str, set[int]] = {k: set() for k in KINDS}
    for item in filter(None, (s.strip() for s in text.split(","))):
        kind, _, step = item.partition(":")
        if kind not in faults or not step.isdigit():
            raise ValueError(f"GPT2_JAX_FAULT: cannot read {item!r}; expected KIND:STEP with KIND in {KINDS}")
        faults[kind].add(int(step))
    return faults


_FAULTS = _parse(os.environ.get("GPT2_JAX_FAULT", ""))


def active() -> bool:
    return any(_FAULTS.values())


def nan_steps() -> frozenset[int]:
    """Steps whose update should be made non-finite."""
    return frozenset(_FAULTS["nan_update_at"])


def while_saving(step: int) -> None:
    """Called right after the (asynchronous) save of `step` has started."""
    if step in _FAULTS["sigkill_saving"]:
        os.kill(os.getpid(), signal.SIGKILL)


def after_step(step: int) -> None:
    """Called when `step` is done (its checkpoint, if any, complete)."""
    if step in _FAULTS["sigkill_at"]:
        os.kill(os.getpid(), signal.SIGKILL)
    if step in _FAULTS["sigterm_at"]:
        os.kill(os.getpid(), signal.SIGTERM)
        if jax.process_count() > 1:  # JAX's notifier polls about once a second: let the notice spread
            time.sleep(3.0)  # before the next step, so the test's stop step does not race the run's end
