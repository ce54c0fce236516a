"""One trainer per workdir: an OS file lock on local disk, a leased lock object on gs://.

Local workdirs: `flock` on WORKDIR/.lock, which the kernel drops when its holder dies.

gs:// workdirs (an OS lock means nothing on an object store): WORKDIR/.lock is an object
created with the precondition `ifGenerationMatch=0`, so of two trainers only one create
succeeds (GCS's compare-and-swap; a 412 answers the other). It names its holder (host, pid,
process start time, boot id). The holder renews it every LEASE_S / 4 seconds, each time replacing the
generation it wrote (`ifGenerationMatch=<its generation>`), and deletes it the same way when the
run ends. A run killed without cleanup (SIGKILL, a preempted and deleted TPU slice) leaves the
object behind; a new trainer takes it over, again with a generation precondition so one taker
wins, when
  - the holder is a process of this host that no longer runs (same pid and start time), at once;
  - otherwise when its generation has not changed for LEASE_S seconds of watching (a live holder
    renews well within that, and is then refused: no clocks are compared across machines).
A holder that finds its lock taken over (its renewal fails: another trainer judged it dead, it
stalled past the lease) prints one error line and exits 2 at once, saving nothing more: two
writers never share a workdir. The holder line carries the boot id, so a machine that shares a
hostname with the holder's never judges it by its own process table.
"""

from __future__ import annotations

import fcntl
import logging
import os
import socket
import sys
import threading
import time

from gpt2_jax.errors import UserError
from gpt2_jax.interop import paths

log = logging.getLogger(__name__)
LEASE_S = 60.0  # a lock object whose generation stays the same this long is a dead run's


class WorkdirBusy(UserError, RuntimeError):
    """Another live process holds the workdir; the message names it."""


def WorkdirLock(workdir: str):
    """The lock for `workdir`: local (flock) or gs:// (a leased object). Use as a context manager."""
    return ObjectLock(workdir) if paths.is_remote(workdir) else FileLock(workdir)


class FileLock:
    """`flock` on WORKDIR/.lock. A crashed or killed run leaves the file but not the lock (the
    kernel releases it with the process), so nothing stays stuck."""

    def __init__(self, workdir: str):
        self.path = os.path.join(workdir, ".lock")
        self._fd: int | None = None

    def acquire(self) -> None:
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise _busy(os.path.dirname(self.path), holder) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self):
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()


class ObjectLock:
    """The leased lock object of a gs:// workdir (see the module docstring)."""

    def __init__(self, workdir: str, lease_s: float | None = None):
        self.workdir = paths.absolute(workdir)
        self.path = paths.join(self.workdir, ".lock")
        self.lease_s = LEASE_S if lease_s is None else lease_s
        self._generation: int | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def acquire(self) -> None:
        me = _identity().encode()
        gen = paths.create_object(self.path, me)
        if gen is None:
            gen = self._take_over(me)
        self._generation = gen
        self._stop.clear()
        self._thread = threading.Thread(target=self._renew, name="gpt2_jax-workdir-lock", daemon=True)
        self._thread.start()

    def _take_over(self, me: bytes) -> int:
        """Wait for the current holder to be known dead, then replace its object; WorkdirBusy if
        it is alive."""
        watched_since, seen, warned = time.monotonic(), None, False
        while True:
            current = paths.read_object(self.path)
            if current is None:  # released meanwhile
                gen = paths.create_object(self.path, me)
            else:
                holder, gen_now = current[0].decode(errors="replace").strip(), current[1]
                if seen is not None and gen_now != seen:
                    raise _busy(self.workdir, holder)  # it renewed its lease: alive
                seen = gen_now
                dead_here = _dead_on_this_host(holder)
                if not dead_here and time.monotonic() - watched_since < self.lease_s:
                    if not warned:
                        warned = True
                        log.warning(f"{self.workdir} is locked by {holder}; waiting up to {self.lease_s:g} s for "
                                    "its lease to be renewed (then it is busy) or to lapse (then it is ours)")  # fmt: skip
                    time.sleep(min(2.0, self.lease_s / 8))
                    continue
                gen = paths.replace_object(self.path, me, gen_now)
            if gen is not None:
                return gen
            # another taker won the race, or the holder renewed between our read and write: look again

    def _renew(self) -> None:
        while not self._stop.wait(self.lease_s / 4):
            try:
                gen = paths.replace_object(self.path, _identity().encode(), self._generation)
            except Exception as e:  # a network blip: try again at the next renewal
                log.warning(f"could not renew the lock {self.path}: {e}")
                continue
            if gen is None:  # two writers must never share a workdir: stop at once, saving nothing more
                print(f"error: the lock {self.path} was taken over by another trainer (this run stalled past its "
                      f"{self.lease_s:g} s lease); stopping this run, the workdir is no longer its own",
                      file=sys.stderr, flush=True)  # fmt: skip
                os._exit(2)
            self._generation = gen

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._generation is not None:
            try:
                paths.delete_object(self.path, self._generation)
            except Exception as e:  # never hide the run's own error; the lease lapses and the next run takes over
                log.warning(f"could not delete the lock {self.path}: {e}")
            self._generation = None

    def __enter__(self):
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def _busy(workdir: str, holder: str) -> WorkdirBusy:
    return WorkdirBusy(f"{workdir} is in use by {holder or 'another process'}; wait for it to finish, stop it, "
                       "or choose another --workdir")  # fmt: skip


def _start_time(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (Linux), None if it is not running."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _boot_id() -> str:
    """This boot of this machine (two machines may share a hostname; a pid means nothing across boots)."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return "unknown"


def _identity() -> str:
    pid = os.getpid()
    return f"pid {pid} on {socket.gethostname()} (started {_start_time(pid)}) boot {_boot_id()}"


def _dead_on_this_host(holder: str) -> bool:
    """Whether `holder` (an `_identity()` line) is a process of this host that is gone."""
    parts = holder.split()
    if len(parts) < 6 or parts[0] != "pid" or parts[2] != "on" or parts[3] != socket.gethostname():
        return False
    if not parts[1].isdigit() or not os.path.isdir("/proc"):
        return False
    if len(parts) >= 8 and parts[6] == "boot" and parts[7] != _boot_id():  # same name, another machine or boot
        return False
    return f"(started {_start_time(int(parts[1]))})" != " ".join(parts[4:6])
