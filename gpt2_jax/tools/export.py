"""CLI: a training checkpoint -> a Hugging Face folder that transformers loads offline.

    python -m gpt2_jax.export --workdir runs/shakespeare --out exported/shakespeare [--step N] [--overwrite]

Writes config.json, model.safetensors (float32, vocab padding trimmed), generation_config.json
and the GPT-2 tokenizer files, into a temporary folder renamed into place at the end. --workdir
and --out may be gs:// paths (a gs:// --out is written locally first, then uploaded file by file).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from typing import Sequence

import jax

from gpt2_jax.cli import ArgumentParser, run
from gpt2_jax.errors import UserError
from gpt2_jax.interop import paths
from gpt2_jax.interop.hf import save_hf
from gpt2_jax.interop.load import load_workdir


def main(argv: Sequence[str] | None = None) -> int:
    p = ArgumentParser(prog="python -m gpt2_jax.export", description=__doc__.split("\n")[0])
    p.add_argument("--workdir", required=True, help="training workdir")
    p.add_argument("--step", type=int, help="checkpoint step (default: the latest usable one)")
    p.add_argument("--out", required=True, help="folder to create")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    args = p.parse_args(argv)
    out = paths.absolute(args.out)
    if paths.isdir(out) and paths.listdir(out) and not args.overwrite:
        raise UserError(f"{args.out} is not empty; pass --overwrite to replace it")
    model = load_workdir(args.workdir, args.step, dtype="float32")
    if jax.process_index() == 0:
        config, params = model.config.replace(dropout=0.0), jax.device_get(model.params)
        if paths.is_remote(out):
            _save_remote(out, config, params)
        else:
            save_hf(out, config, params, overwrite=args.overwrite)
    print(f"exported {model.label} to {args.out}")
    return 0


def _save_remote(out: str, config, params) -> None:
    """save_hf into a local temporary folder, then each file uploaded whole under `out`."""
    tmp = tempfile.mkdtemp(prefix="gpt2_jax-export-")
    try:
        save_hf(os.path.join(tmp, "hf"), config, params)
        for name in sorted(os.listdir(os.path.join(tmp, "hf"))):
            paths.upload(os.path.join(tmp, "hf", name), paths.join(out, name))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def cli() -> int:
    """`python -m gpt2_jax.export`: main() with user errors as one line and exit status 2."""
    return run(main)
