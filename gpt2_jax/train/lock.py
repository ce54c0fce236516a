"""One trainer per workdir: an advisory file lock that the OS drops when its holder dies."""

from __future__ import annotations

import fcntl
import os
import socket

from gpt2_jax.errors import UserError


class WorkdirBusy(UserError, RuntimeError):
    """Another live process holds the workdir; the message names it."""


class WorkdirLock:
    """`flock` on WORKDIR/.lock. A crashed or killed run leaves the file but not the lock (the
    kernel releases it with the process), so nothing stays stuck. Use as a context manager."""

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
            raise WorkdirBusy(
                f"{os.path.dirname(self.path)} is in use by {holder}; wait for it to finish, stop "
                "it, or choose another --workdir"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> "WorkdirLock":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()
