"""SIGTERM / SIGINT -> a request to stop at the next step boundary, agreed on by every process.

Preemptible TPUs and SLURM send SIGTERM before they take the machine; Ctrl-C sends SIGINT. The
trainer finishes the step it is on, saves a checkpoint and exits; a second Ctrl-C stops at once.
"""

from __future__ import annotations

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


class StopRequest:
    """Context manager that turns the first SIGTERM/SIGINT into a flag (handlers are restored on
    exit). Only the main thread can install handlers; elsewhere it never fires."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.signum: int | None = None
        self._previous: dict = {}

    def _handle(self, signum, frame) -> None:
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: stop now, without saving
        self.signum = signum

    def __enter__(self) -> "StopRequest":
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous = {}

    def agreed(self, sync: bool) -> int | None:
        """The signal to stop for, or None. With several processes each may have been signalled
        at a different step, so they decide together, at steps where `sync` is True (a small
        all-gather, which waits for the device); in between they keep going."""
        if jax.process_count() == 1:
            return self.signum
        if not sync:
            return None
        from jax.experimental import multihost_utils

        mine = np.array([self.signum or 0], np.int32)
        signals = np.asarray(multihost_utils.process_allgather(mine)).ravel()
        return int(signals.max()) or None
