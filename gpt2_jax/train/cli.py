"""CLI: `python -m gpt2_jax.train`, the command line around train_and_evaluate (train/loop.py) and --dry_run.

    python -m gpt2_jax.train --config configs/X.py[:ARG] --workdir DIR [--config.KEY=VALUE ...]
    python -m gpt2_jax.train --config configs/X.py --dry_run     # per-device memory and FLOPs, then exit

Several processes (a TPU pod, SLURM, launch/local.sh) join through jax.distributed: from the
environment, or --coordinator HOST:PORT --num_processes N --process_id I [--coordinator_port P]
[--init_timeout S] [--heartbeat_timeout S] (see gpt2_jax/parallel/distributed.py).

The config is checked whole before anything compiles (`plan`): a config the trainer cannot run
is refused with one line, `error: ...`, and exit status 2. Writes DIR/metrics.jsonl, TensorBoard
events and DIR/checkpoints/<step>/. Run the same command again to resume from the newest usable
checkpoint.

Exit status: 0 done; 2 a user error (config, data, workdir in use, no usable checkpoint);
1 diverged (non-finite steps beyond max_bad_steps; the last good checkpoint is kept);
143 / 130 stopped by SIGTERM / SIGINT after saving a checkpoint (run the command again).
With --dry_run: 0, or 1 if the step does not fit the device's memory.
"""

from __future__ import annotations

import difflib
import os
import re
import sys

import ml_collections

from gpt2_jax.cli import TRAINING_MEMORY_HINT, out_of_memory
from gpt2_jax.errors import UserError
from gpt2_jax.parallel import distributed, sharding
from gpt2_jax.train.hooks import Diverged
from gpt2_jax.train.loop import train_and_evaluate
from gpt2_jax.train.plan import plan
from gpt2_jax.train.preemption import Preempted
from gpt2_jax.train.trainer import Trainer


def compile_only(config: ml_collections.ConfigDict) -> int:
    """--dry_run: compile the train step for the configured mesh and print per-device memory and
    FLOPs, reading no data; 1 if it does not fit the device's memory, else 0."""
    from gpt2_jax.train import dry_run

    p = plan(config, data=False)
    with sharding.use_mesh(p.mesh, p.rules):
        trainer = Trainer(config, p)
        estimate = dry_run.estimate(trainer, p, config.batch_size, config.grad_accum)
    print(dry_run.report(estimate, p))
    return 1 if estimate.fits is False else 0


# --- CLI -------------------------------------------------------------------------------------


class UsageError(UserError):
    """A bad command line; main() prints it as `error: ...` and exits 2."""


def parse_args(argv: list[str], require_workdir: bool = True) -> tuple[ml_collections.ConfigDict, str]:
    """(config, workdir) from `--config FILE[:ARG] --workdir DIR [--config.KEY=VALUE ...]`."""
    from absl import flags
    from ml_collections import config_flags

    config_file = next((a.split("=", 1)[1] for a in argv if a.startswith("--config=")), None)
    if config_file is None and "--config" in argv[:-1]:
        config_file = argv[argv.index("--config") + 1]
    if not config_file:
        raise UsageError("--config FILE is required, e.g. --config configs/shakespeare.py")
    if not os.path.isfile(config_file.split(":", 1)[0]):
        raise UsageError(f"config file {config_file.split(':', 1)[0]} does not exist")
    _check_override_keys(argv, config_file)
    fv = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, "config file[:arg]", flag_values=fv, lock_config=True, sys_argv=argv)
    flags.DEFINE_string("workdir", None, "run folder (metrics, checkpoints)", flag_values=fv)
    try:
        extra = fv(argv)
        config = fv.config
    except flags.Error as e:
        where = f"config {config_file}: " if str(e).startswith("flag --config=") else ""
        raise UsageError(where + _first_line(e)) from None
    except Exception as e:  # errors raised by the config file's get_config
        raise UsageError(f"config {config_file}: {_first_line(e)}") from None
    if len(extra) > 1:
        raise UsageError(f"unexpected argument {extra[1]!r}")
    if not fv.workdir and require_workdir:
        raise UsageError("--workdir DIR is required")
    return config, fv.workdir


def _load_config(config_file: str) -> ml_collections.ConfigDict:
    from absl import flags
    from ml_collections import config_flags

    argv = ["train", f"--config={config_file}"]
    fv = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, flag_values=fv, sys_argv=argv)
    try:
        fv(argv)
        return fv.config
    except Exception as e:
        raise UsageError(f"config {config_file}: {_first_line(e)}") from None


def _check_override_keys(argv: list[str], config_file: str) -> None:
    """Unknown --config.KEY overrides are errors that name the key (ml_collections' own message
    for them is a bare KeyError)."""
    keys = [m.group(1) for a in argv if (m := re.match(r"--?config\.([^=]+)", a))]
    if not keys:
        return
    known = set(_flat_keys(_load_config(config_file)))
    for key in keys:
        if key not in known:
            close = difflib.get_close_matches(key, sorted(known), n=1)
            hint = f"; did you mean {close[0]}?" if close else ""
            raise UsageError(f"unknown config key {key!r} (--config.{key}){hint}")


def _flat_keys(c, prefix: str = "") -> list[str]:
    keys = []
    for k, v in c.items():
        keys.append(prefix + k)
        if isinstance(v, ml_collections.ConfigDict):
            keys += _flat_keys(v, prefix + k + ".")
    return keys


def _first_line(e: BaseException) -> str:
    """The message on one line; for a wrapped traceback (a config file that raised), its last
    line, which names the actual error."""
    lines = [line.strip() for line in str(e).strip().splitlines() if line.strip()]
    if not lines:
        return type(e).__name__
    if "Traceback (most recent call last):" in lines:
        return re.sub(r"^\w+(Error|Exception): ", "", lines[-1])
    return lines[0]


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv if argv is None else argv)
    if any(a in ("-h", "--help", "-help", "--helpfull") for a in argv[1:]):
        print(__doc__.strip())
        return 0
    dry_run = "--dry_run" in argv
    argv = [a for a in argv if a != "--dry_run"]
    try:
        argv, multi_process = distributed.pop_flags(argv)
        distributed.initialize(**multi_process)  # before anything touches a device
        config, workdir = parse_args(argv, require_workdir=not dry_run)
        if dry_run:
            return compile_only(config)
        train_and_evaluate(config, workdir)
    except UserError as e:
        print(f"error: {_first_line(e)}", file=sys.stderr)
        return 2
    except Diverged as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except Preempted as e:
        print(str(e), file=sys.stderr)
        return e.exit_code
    except RuntimeError as e:
        message = out_of_memory(e, TRAINING_MEMORY_HINT)
        if message is None:
            raise
        print(f"error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted (a second Ctrl-C): stopped without saving", file=sys.stderr)
        return 130
    return 0

