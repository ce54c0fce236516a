"""The cache of prepared data folders: each is reused while its source matches and rebuilt, once, under a lock when not.

    out, built = cache.prepared("shakespeare", source, build)   # build(out) writes out atomically

`source` is a JSON-able dict that names the inputs by their content; build must write it as
meta.json's "source". The root is $GPT2_JAX_CACHE if set, else ~/.cache/gpt2_jax.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
from typing import Callable

from gpt2_jax.data import shards


def cache_root() -> str:
    """$GPT2_JAX_CACHE if set, else ~/.cache/gpt2_jax."""
    return os.environ.get("GPT2_JAX_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "gpt2_jax")


def is_ready(out: str, source: dict) -> bool:
    """meta.json is written last inside the atomically renamed folder, so it marks completion."""
    try:
        with open(os.path.join(out, "meta.json")) as f:
            meta = json.load(f)
    except (OSError, ValueError):
        return False
    return meta.get("source") == source and meta.get("meta_version") == shards.META_VERSION


@contextlib.contextmanager
def _locked(path: str):
    """An exclusive lock so that processes sharing a cache prepare a folder only once."""
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def prepared(name: str, source: dict, build: Callable[[str], object]) -> tuple[str, bool]:
    """(folder, whether this call built it): cache_root()/name, built by build(folder) unless a
    folder of the same source is there already (or another process made one while we waited)."""
    out = os.path.join(cache_root(), name)
    if is_ready(out, source):
        return out, False
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with _locked(out + ".lock"):
        if is_ready(out, source):
            return out, False
        build(out)
    return out, True
