"""What every command line shares: a user error is one `error: ...` line on stderr and exit status 2."""

from __future__ import annotations

import argparse
import sys
from typing import Callable, Sequence


class UserError(Exception):
    """Something the user can fix; the message says what and how."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse, but a bad command line is one `error: ...` line (plus a pointer to --help)."""

    def error(self, message: str):
        raise UserError(f"{message} (see {self.prog} --help)")


def first_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return lines[0] if lines else type(e).__name__


def user_errors() -> tuple[type[BaseException], ...]:
    """Exception types that mean bad input rather than a bug (imported lazily: no JAX at import)."""
    from gpt2_jax.checkpoint import CheckpointError
    from gpt2_jax.data import DataError
    from gpt2_jax.hf import HFFormatError
    from gpt2_jax.lock import WorkdirBusy

    return (UserError, DataError, HFFormatError, CheckpointError, WorkdirBusy, FileExistsError, FileNotFoundError)


def run(main: Callable[[Sequence[str] | None], int | None], argv: Sequence[str] | None = None) -> int:
    """Call `main(argv)`; print user errors as one line and return 2; Ctrl-C returns 130."""
    try:
        return main(argv) or 0
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        if isinstance(e, user_errors()):
            print(f"error: {first_line(e)}", file=sys.stderr)
            return 2
        raise
