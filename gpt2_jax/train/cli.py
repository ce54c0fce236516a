"""CLI: `python -m gpt2_jax.train`, the command line around train_and_evaluate (train/loop.py) and --dry_run.

    python -m gpt2_jax.train --config configs/X.py[:ARG] --workdir DIR [--config.KEY=VALUE ...]
    python -m gpt2_jax.train --config X[:ARG] --workdir DIR      # a packaged config by name, from anywhere
    python -m gpt2_jax.train --config configs/X.py --dry_run     # per-device memory and FLOPs, then exit
    python -m gpt2_jax.train --config configs/X.py --dry_run --topology v5e:2x2   # ... on a TPU slice, from any host
    python -m gpt2_jax.train --config X --help                   # X's value of every key

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
With --dry_run: 0, or 1 if the step does not fit the device's memory; the last line is JSON
(topology, devices, peak_bytes_per_device, hbm_bytes_per_device, fits, compile_s, ...).
--topology NAME (v5e:2x2, v5e:4x4, v5p:2x2x1, v4:2x2x1, v6e:2x4, ...) compiles for that TPU slice's
devices with libtpu (pip install -e ".[tpu]"), no TPU needed; the TPU compiler's out-of-memory
verdict decides whether it fits.
"""

from __future__ import annotations

import re
import sys
import textwrap

import ml_collections

from gpt2_jax.cli import TRAINING_MEMORY_HINT, out_of_memory
from gpt2_jax.configs import PRESETS, aliases
from gpt2_jax.configs import load as config_load
from gpt2_jax.errors import UserError
from gpt2_jax.parallel import distributed, sharding
from gpt2_jax.train.hooks import Diverged
from gpt2_jax.train.loop import train_and_evaluate
from gpt2_jax.train.plan import plan
from gpt2_jax.train.preemption import Preempted
from gpt2_jax.train.trainer import Trainer


def compile_only(config: ml_collections.ConfigDict, topology_name: str | None = None) -> int:
    """--dry_run [--topology NAME]: compile the train step for the configured mesh (of this job's
    devices, or of TPU slice NAME's compile-only devices) and print per-device memory and FLOPs,
    then one JSON line, reading no data; 1 if it does not fit the device's memory, else 0."""
    from gpt2_jax.parallel import topology
    from gpt2_jax.train import dry_run

    devices, hbm = None, None
    if topology_name is not None:
        tpu_slice = topology.parse(topology_name)
        devices, hbm, topology_name = topology.topology_devices(tpu_slice), tpu_slice.chip.hbm_bytes, tpu_slice.name
    p = plan(config, data=False, devices=devices)
    with sharding.use_mesh(p.mesh, p.rules):
        trainer = Trainer(config, p)
        estimate = dry_run.estimate(trainer, p, config.batch_size, p.grad_accum, hbm, topology_name)
    for note in p.notes:
        print(note)
    print(dry_run.report(estimate, p))
    print(dry_run.json_line(estimate, p), flush=True)
    return 1 if estimate.fits is False else 0


# --- CLI -------------------------------------------------------------------------------------


class UsageError(UserError):
    """A bad command line; main() prints it as `error: ...` and exits 2."""


def parse_args(argv: list[str], require_workdir: bool = True) -> tuple[ml_collections.ConfigDict, str]:
    """(config, workdir) from `--config NAME|FILE[:ARG] --workdir DIR [--config.KEY=VALUE ...]`."""
    from absl import flags
    from ml_collections import config_flags

    spec, argv = _pop_config(argv)
    if not spec:
        raise UsageError("--config FILE is required, e.g. --config configs/shakespeare.py (or a packaged config "
                         f"by name: {', '.join(PRESETS)})")  # fmt: skip
    try:
        config = config_load.load(spec)
    except config_load.ConfigFileError as e:  # one line naming the file (and the line in it)
        raise UsageError(str(e)) from None
    _check_override_keys(argv, config)
    fv = flags.FlagValues()
    config_flags.DEFINE_config_dict("config", config, "the config", flag_values=fv, lock_config=True, sys_argv=argv)
    flags.DEFINE_string("workdir", None, "run folder (metrics, checkpoints)", flag_values=fv)
    try:
        extra = fv(argv)
    except flags.UnrecognizedFlagError as e:  # nanoGPT's `--max_iters=N`, HF's `--output_dir D`, `--lr`
        hint = aliases.flag_hint(e.flagname, config_load.flat_keys(config))
        raise UsageError(f"unknown flag --{e.flagname}{hint or ' (see python -m gpt2_jax.train --help)'}") from None
    except flags.Error as e:
        raise UsageError(_first_line(e)) from None
    if len(extra) > 1:
        raise UsageError(f"unexpected argument {extra[1]!r}")
    if not fv.workdir and require_workdir:
        raise UsageError("--workdir DIR is required")
    return fv.config, fv.workdir


def _pop_config(argv: list[str]) -> tuple[str | None, list[str]]:
    """(the --config value, argv without it): the config is loaded here, not by absl, so that a
    name finds the packaged presets and the file's errors say what to fix."""
    for i, a in enumerate(argv):
        if a.startswith("--config="):
            return a.split("=", 1)[1], argv[:i] + argv[i + 1:]
        if a == "--config":
            if i + 1 == len(argv):
                raise UsageError("--config needs a value: --config NAME or --config FILE[:ARG]")
            return argv[i + 1], argv[:i] + argv[i + 2:]
    return None, list(argv)


def _check_override_keys(argv: list[str], config: ml_collections.ConfigDict) -> None:
    """Unknown --config.KEY overrides are errors that name the key and the right one (ml_collections'
    own message for them is a bare KeyError)."""
    leaves = config_load.flat_keys(config)
    known = {".".join(k.split(".")[:i]) for k in leaves for i in range(1, k.count(".") + 2)}  # sections too
    for key in (m.group(1) for a in argv if (m := re.match(r"--?config\.([^=]+)", a))):
        if key not in known:
            raise UsageError(f"unknown config key {key!r} (--config.{key}){aliases.key_hint(key, leaves)}")


def _pop_topology(argv: list[str], dry_run: bool) -> tuple[list[str], str | None]:
    """(argv without it, the --topology value): a TPU slice to compile for instead of this job's
    devices. Before JAX starts a backend: keeps libtpu quiet on a host without TPUs, and this
    process on its CPU (its own devices are not used)."""
    from gpt2_jax.parallel import topology

    for i, a in enumerate(argv):
        if a == "--topology" or a.startswith("--topology="):
            value = a.split("=", 1)[1] if "=" in a else (argv[i + 1] if i + 1 < len(argv) else "")
            if not value:
                raise UsageError("--topology needs a value, e.g. --topology v5e:2x2")
            if not dry_run:
                raise UsageError("--topology compiles for a TPU slice without running: use it with --dry_run")
            topology.quiet_libtpu(topology.parse(value))
            topology.compile_only_host()
            return argv[:i] + argv[i + (1 if "=" in a else 2):], value
    return argv, None


def _first_line(e: BaseException) -> str:
    lines = [line.strip() for line in str(e).strip().splitlines() if line.strip()]
    return lines[0] if lines else type(e).__name__


def usage(config: ml_collections.ConfigDict | None = None, name: str = "") -> str:
    """--help: the module's docstring, then every config key with its value and meaning (from the
    key table that base_config is built from), then other tools' names for them."""
    from gpt2_jax.configs.keys import DEFAULTS, KEYS

    values = dict(DEFAULTS) if config is None else {k: _get(config, k) for k in DEFAULTS}
    config_help = (f"--config NAME|FILE[:ARG]: a packaged config by name, from any directory ({', '.join(PRESETS)}; "
                   "configs/NAME.py in a checkout re-exports it), or a file of yours whose get_config(arg) starts "
                   "from `from gpt2_jax.configs import common; c = common.base_config()`.")  # fmt: skip
    out = [__doc__.strip(), "", *textwrap.wrap(config_help, 100, break_on_hyphens=False), "",
           f"Config keys, set with --config.KEY=VALUE ({'values of ' + name if name else 'defaults of the base config'};"
           " `--config X --help` shows X's):"]  # fmt: skip
    width = max(len(k) for k in DEFAULTS) + 2
    for key, _, meaning in KEYS:
        head = f"  {key:<{width}}{values[key]!r:<12} "
        out += textwrap.wrap(meaning, 110, initial_indent=head, subsequent_indent=" " * len(head))
    out += ["", "nanoGPT's and the HF Trainer's names, and what they are here (--workdir is a flag):"]
    for line in aliases.table():
        out += textwrap.wrap(line, 110, initial_indent="  ", subsequent_indent="      ")
    return "\n".join(out)


def _get(c: ml_collections.ConfigDict, key: str):
    for part in key.split("."):
        c = c[part]
    return c


def _help(argv: list[str]) -> str:
    """--help, with the values of --config's config when one is given."""
    spec, _ = _pop_config(argv)
    return usage(config_load.load(spec), spec) if spec else usage()


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv if argv is None else argv)
    if any(a in ("-h", "--help", "-help", "--helpfull") for a in argv[1:]):
        try:
            print(_help([a for a in argv if a not in ("-h", "--help", "-help", "--helpfull")]))
        except UserError as e:
            print(f"error: {_first_line(e)}", file=sys.stderr)
            return 2
        return 0
    dry_run = "--dry_run" in argv
    argv = [a for a in argv if a != "--dry_run"]
    try:
        argv, topology_name = _pop_topology(argv, dry_run)
        argv, multi_process = distributed.pop_flags(argv)
        if topology_name is None:
            distributed.initialize(**multi_process)  # before anything touches a device
        config, workdir = parse_args(argv, require_workdir=not dry_run)
        if dry_run:
            return compile_only(config, topology_name)
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

