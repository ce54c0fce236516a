"""The bundled Shakespeare corpus as token shards, prepared into a cache folder once and reused.

    from gpt2_jax.data.corpus import shakespeare_path
    path = shakespeare_path()   # ~/.cache/gpt2_jax/shakespeare, or $GPT2_JAX_CACHE/shakespeare

Provenance and attribution: gpt2_jax/assets/shakespeare.PROVENANCE.md.
"""

from __future__ import annotations

import hashlib
import io
import tarfile
from importlib import resources
from typing import Iterator

from gpt2_jax.data import cache, pretraining, shards

ASSET = "shakespeare.tar.xz"
# Whole works go to validation by the hash of their text: 0.16 holds out 4 plays and 3 poems
# (Taming of the Shrew, Henry VI Part 3, Much Ado, Two Gentlemen of Verona, Lover's Complaint,
# Passionate Pilgrim, Rape of Lucrece): 184,175 of 1,566,001 tokens (11.8%).
VAL_FRACTION = 0.16
SHARD_SIZE = shards.DEFAULT_SHARD_SIZE


def _asset_bytes() -> bytes:
    return resources.files("gpt2_jax").joinpath("assets", ASSET).read_bytes()


def _source(asset: bytes) -> dict:
    return {"bundled": ASSET, "asset_sha256": hashlib.sha256(asset).hexdigest(), "doc_mode": "file"}


def documents(asset: bytes) -> Iterator[tuple[str, str, int, bytes]]:
    """(kind, source, line, payload) for each work in the archive, in name order."""
    with tarfile.open(fileobj=io.BytesIO(asset), mode="r:xz") as tar:
        members = sorted((m for m in tar.getmembers() if m.isfile()), key=lambda m: m.name)
        for m in members:
            yield "text", f"{ASSET}:{m.name}", 1, tar.extractfile(m).read()


def shakespeare_path(workers: int = 1) -> str:
    """The folder of Shakespeare token shards; prepares it on first use (about a second)."""
    asset = _asset_bytes()

    def build(out: str) -> None:
        settings = pretraining.Settings(val_fraction=VAL_FRACTION)
        pretraining.write_dataset(pretraining.chunked(documents(asset)), out, settings=settings, source=_source(asset),
                                  shard_size=SHARD_SIZE, workers=workers, overwrite=True)  # fmt: skip

    return cache.prepared("shakespeare", _source(asset), build)[0]
