"""SIGTERM / SIGINT -> a request to stop at a step boundary that every process agrees on.

Preemptible TPUs and SLURM send SIGTERM before they take the machine; Ctrl-C sends SIGINT. The
trainer finishes the step it is on (several processes: the step they agree on), saves a
checkpoint and exits; a second Ctrl-C stops at once.

One process: a Python signal handler sets a flag, read at every step. Under jax.distributed
(with `jax_enable_preemption_service`, JAX's default), JAX's own preemption notifier catches
SIGTERM in any process, the coordination service tells the others, and
`multihost_utils.reached_preemption_sync_point`, asked at every step (a local check, no
collective), turns True on every process at the same step: the one after the furthest step any
process had reached when the notice spread (JAX looks for SIGTERM about once a second). A SIGINT
is handed to the same notifier as a SIGTERM to this process.
"""

from __future__ import annotations

import os
import signal
import threading

import jax
import numpy as np


class Preempted(Exception):
    """The run stopped early, cleanly, after saving `step`; exit status 128 + signum."""

    def __init__(self, signum: int, step: int, checkpoint: str):
        self.signum, self.step, self.checkpoint = signum, step, checkpoint
        name = signal.Signals(signum).name
        super().__init__(f"stopped by {name} after step {step}; checkpoint {checkpoint} saved. "
                         "Run the same command to continue")  # fmt: skip

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


def jax_preemption_service() -> bool:
    """Whether JAX's preemption notice service runs in this process (it does under
    jax.distributed unless `jax_enable_preemption_service` is off)."""
    return jax.distributed.is_initialized() and bool(jax.config.jax_enable_preemption_service)


class StopRequest:
    """Context manager that turns the first SIGTERM/SIGINT into a stop at an agreed step (handlers
    are restored on exit). Only the main thread can install handlers; elsewhere it never fires."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.signum: int | None = None
        self._previous: dict = {}
        self._jax = jax_preemption_service()
        self._probed = False

    def _handle(self, signum, frame) -> None:
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: stop now, without saving
        self.signum = signum
        if self._jax and signum != signal.SIGTERM:
            os.kill(os.getpid(), signal.SIGTERM)  # JAX's notifier holds SIGTERM: tell every process

    def __enter__(self) -> "StopRequest":
        if threading.current_thread() is threading.main_thread():
            # Under JAX's service SIGTERM stays with its notifier (installed by jax.distributed.initialize).
            mine = (signal.SIGINT,) if self._jax else self.SIGNALS
            self._previous = {s: signal.signal(s, self._handle) for s in mine}
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous = {}

    def agreed(self, step: int | None = None, sync: bool = True) -> int | None:
        """The signal to stop for after `step`, or None. Call it at every step, every process
        with the same steps. Under JAX's preemption service the processes agree at every step;
        several processes without it agree only where `sync` is True (a small all-gather, which
        waits for the device); one process needs no agreement."""
        if self._jax:
            if step is None:
                raise ValueError("agreed(step=...) is needed under JAX's preemption service")
            return self._jax_agreed(step)
        if jax.process_count() == 1:
            return self.signum
        if not sync:
            return None
        from jax.experimental import multihost_utils

        mine = np.array([self.signum or 0], np.int32)
        signals = np.asarray(multihost_utils.process_allgather(mine)).ravel()
        return int(signals.max()) or None

    def _jax_agreed(self, step: int) -> int | None:
        # Step ids are the training steps, as Orbax's own calls (at saves) use them. JAX's sync
        # step is one past the largest id seen when the notice spread; a notice that came before
        # the first call (during compilation or restore) makes it step 1, which a resumed run
        # has passed: ask for 1 once, first, and stop after this step if it is the one.
        from jax.experimental import multihost_utils

        early = False
        if not self._probed:
            self._probed = True
            early = step > 1 and multihost_utils.reached_preemption_sync_point(1)
        if multihost_utils.reached_preemption_sync_point(step) or early:
            return self.signum or signal.SIGTERM
        return None
