"""The fit table: each GPT-2 preset on the smallest v5e / v5p / v6e slice it fits (train --dry_run --topology).

    python scripts/fit_table.py                       # all presets x v5e, v5p, v6e -> markdown on stdout
    python scripts/fit_table.py --presets gpt2_124m --generations v5e --attention pallas xla
    python scripts/fit_table.py --jsonl fits.jsonl    # also keep every dry run's JSON line

For each preset and TPU generation it tries the slices in SLICES from the smallest up and stops
at the first whose compile fits (exit 0); a slice that does not fit (exit 1) is listed too. Each
attempt is one `python -m gpt2_jax.train --config PRESET --dry_run --topology NAME` in its own
process (fresh compile caches, the CLI's env settings for libtpu); extra arguments after `--` go
to every run (e.g. -- --config.model.remat=full). Needs libtpu (pip install -e ".[tpu]"); no TPU.
Compiling gpt2-xl takes minutes per slice on a small CPU host.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

PRESETS = ("gpt2_124m", "gpt2_350m", "gpt2_774m", "gpt2_1558m")
SLICES = {  # smallest first; single-host slices, then pods
    "v5e": ("v5e:1x1", "v5e:2x2", "v5e:2x4", "v5e:4x4"),
    "v5p": ("v5p:2x2x1", "v5p:2x2x2"),
    "v6e": ("v6e:1x1", "v6e:2x2", "v6e:2x4", "v6e:4x4"),
}
GIB = 2**30


def dry_run(preset: str, name: str, attention: str | None, extra: list[str]) -> dict:
    cmd = [sys.executable, "-m", "gpt2_jax.train", "--config", preset, "--dry_run", "--topology", name, *extra]
    cmd += [f"--config.model.attention={attention}"] if attention else []
    out = subprocess.run(cmd, capture_output=True, text=True)
    lines = out.stdout.strip().splitlines()
    if out.returncode not in (0, 1) or not lines:
        err = (out.stderr.strip().splitlines() or ["no output"])[-1]
        return {"topology": name, "fits": None, "error": err, "command": " ".join(cmd[1:])}
    return {**json.loads(lines[-1]), "command": " ".join(["python", *cmd[1:]])}


def row(preset: str, attention: str | None, r: dict) -> str:
    if r.get("error"):
        return f"| {preset} | {attention or 'auto'} | {r['topology']} | error: {r['error']} | | | |"
    peak = r["peak_bytes_per_device"] or r["oom_required_bytes"]
    gib = f"{peak / GIB:.1f}" if peak else "?"
    return (f"| {preset} | {r['attention']} | {r['topology']} ({r['devices']} chips) | {gib} of "
            f"{r['hbm_bytes_per_device'] / GIB:.0f} | {'yes' if r['fits'] else 'no'} | {r['grad_accum']} | "
            f"{r['compile_s']:.0f} |")  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--presets", nargs="+", default=PRESETS)
    ap.add_argument("--generations", nargs="+", default=tuple(SLICES), choices=tuple(SLICES))
    ap.add_argument("--attention", nargs="+", default=[None], help="model.attention values (default: the preset's)")
    ap.add_argument("--jsonl", help="append every dry run's JSON line (with its command) to this file")
    args = ap.parse_args(argv[: argv.index("--")] if "--" in argv else argv)
    print("| preset | attention | slice | peak GiB per chip (of HBM) | fits | grad_accum | compile s |")
    print("| --- | --- | --- | --- | --- | --- | --- |", flush=True)
    for preset in args.presets:
        for attention in args.attention:
            for gen in args.generations:
                for name in SLICES[gen]:
                    r = dry_run(preset, name, attention, extra)
                    print(row(preset, attention, r), flush=True)
                    if args.jsonl:
                        with open(args.jsonl, "a") as f:
                            f.write(json.dumps({"preset": preset, **r}) + "\n")
                    if r.get("fits") or r.get("error"):
                        break
    return 0


if __name__ == "__main__":
    sys.exit(main())
