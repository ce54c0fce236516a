"""What every command line shares: a user error is one `error: ...` line on stderr and exit status 2."""

from __future__ import annotations

import argparse
import sys
from typing import Callable, Sequence

from gpt2_jax.errors import UserError


class ArgumentParser(argparse.ArgumentParser):
    """argparse, but a bad command line is one `error: ...` line (plus a pointer to --help)."""

    def error(self, message: str):
        raise UserError(f"{message} (see {self.prog} --help)")


def first_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return lines[0] if lines else type(e).__name__


# Errors that mean bad input rather than a bug: every UserError kind, and files named wrongly.
USER_ERRORS = (UserError, FileExistsError, FileNotFoundError)


# What to change when a training step does not fit in device memory.
TRAINING_MEMORY_HINT = ("lower batch_size or raise grad_accum (with microbatch_per_device: lower it), or set "
                        "model.remat=full or model.loss_chunk=256; "
                        "python -m gpt2_jax.train --dry_run --config ... shows a config's memory before it runs")  # fmt: skip


def out_of_memory(e: BaseException, hint: str) -> str | None:
    """The one-line error for a device that ran out of memory (XLA's RESOURCE_EXHAUSTED, at
    compile or run time), or None for any other error."""
    if not isinstance(e, RuntimeError) or "RESOURCE_EXHAUSTED" not in first_line(e):
        return None
    return f"out of device memory ({first_line(e)}); {hint}"


def run(main: Callable[[Sequence[str] | None], int | None], argv: Sequence[str] | None = None,
        memory_hint: str = "use a smaller batch or a smaller model") -> int:  # fmt: skip
    """Call `main(argv)`; print user errors (and running out of device memory, with
    `memory_hint`) as one line and return 2; Ctrl-C returns 130."""
    try:
        return main(argv) or 0
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        message = first_line(e) if isinstance(e, USER_ERRORS) else out_of_memory(e, memory_hint)
        if message is None:
            raise
        print(f"error: {message}", file=sys.stderr)
        return 2
