"""Tests for the bundled Shakespeare corpus (prepared once into the cache, reused, same as the CLI) and the cache itself."""

import io
import json
import os
import tarfile
import threading
import time

import numpy as np
import pytest

from gpt2_jax.data import corpus, prepare, pretraining, shards
from gpt2_jax.interop.tokenizer import EOT_ID, get_tokenizer

VAL_TITLES = ["THE HISTORY OF KING HENRY THE SIXTH, THIRD PART", "A LOVER'S COMPLAINT", "MUCH ADO ABOUT NOTHING",
              "THE PASSIONATE PILGRIM", "THE RAPE OF LUCRECE", "THE TAMING OF THE SHREW",
              "THE TWO GENTLEMEN OF VERONA"]  # fmt: skip


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    root = tmp_path_factory.mktemp("cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("GPT2_JAX_CACHE", str(root))
        path = corpus.shakespeare_path()
    return root, path


def test_prepared_into_the_cache_with_whole_works_held_out(cache):
    root, path = cache
    assert path == str(root / "shakespeare")
    meta = json.load(open(os.path.join(path, "meta.json")))
    assert (meta["train"]["documents"], meta["val"]["documents"]) == (35, 7)
    assert (meta["train"]["tokens"], meta["val"]["tokens"]) == (1_381_826, 184_175)
    assert meta["val_fraction"] == corpus.VAL_FRACTION
    val = np.fromfile(os.path.join(path, "val_000000.bin"), dtype="<u2", offset=1024)
    first_lines = [get_tokenizer().decode(val[i + 1 : i + 20].tolist()).split("\n")[0] for i in np.flatnonzero(val == EOT_ID)]
    assert first_lines == VAL_TITLES
    assert sorted(os.listdir(root)) == ["shakespeare", "shakespeare.lock"]


def test_second_call_reuses_the_cache(cache, monkeypatch):
    root, path = cache
    monkeypatch.setenv("GPT2_JAX_CACHE", str(root))
    monkeypatch.setattr(pretraining, "write_dataset", lambda *a, **k: pytest.fail("prepared again"))
    mtime = os.path.getmtime(os.path.join(path, "meta.json"))
    assert corpus.shakespeare_path() == path
    assert os.path.getmtime(os.path.join(path, "meta.json")) == mtime


def test_a_stale_cache_is_prepared_again(tmp_path, monkeypatch):
    monkeypatch.setenv("GPT2_JAX_CACHE", str(tmp_path))
    (tmp_path / "shakespeare").mkdir()
    (tmp_path / "shakespeare" / "meta.json").write_text(json.dumps({"source": {"asset_sha256": "old"}}))
    (tmp_path / "shakespeare" / "train_000000.bin").write_bytes(b"stale")
    path = corpus.shakespeare_path()
    assert json.load(open(os.path.join(path, "meta.json")))["train"]["documents"] == 35
    assert os.path.getsize(os.path.join(path, "train_000000.bin")) == 1024 + 2 * 1_381_826


def test_same_shards_as_the_cli_on_the_extracted_files(cache, tmp_path):
    _, path = cache
    asset = (corpus.resources.files("gpt2_jax") / "assets" / corpus.ASSET).read_bytes()
    with tarfile.open(fileobj=io.BytesIO(asset), mode="r:xz") as tar:
        names = sorted(m.name for m in tar.getmembers())
        tar.extractall(tmp_path / "texts", filter="data")
    assert len(names) == 42 and all(n.endswith("_gut.txt") for n in names)
    argv = ["--input", str(tmp_path / "texts"), "--out", str(tmp_path / "out"), "--val_fraction", str(corpus.VAL_FRACTION)]
    assert prepare.main(argv) == 0
    for name in ("train_000000.bin", "val_000000.bin"):
        assert (tmp_path / "out" / name).read_bytes() == open(os.path.join(path, name), "rb").read()


def _builder(calls):
    def build(out, source):
        calls.append(out)
        time.sleep(0.2)  # long enough for a second caller to arrive while this one holds the lock
        with shards.atomic_folder(out, overwrite=True) as tmp:
            shards.write_meta(tmp, {"source": source, "meta_version": shards.META_VERSION})

    return build


def test_the_cache_builds_once_for_concurrent_callers_and_again_when_the_source_changes(tmp_path, monkeypatch):
    from gpt2_jax.data import cache as prepared_cache

    monkeypatch.setenv("GPT2_JAX_CACHE", str(tmp_path))
    calls = []
    build = _builder(calls)
    source = {"content_sha256": "a"}
    results = []
    callers = [threading.Thread(target=lambda: results.append(prepared_cache.prepared("x/y", source, lambda o: build(o, source))))
               for _ in range(2)]  # fmt: skip
    for t in callers:
        t.start()
    for t in callers:
        t.join()
    out = str(tmp_path / "x" / "y")
    assert calls == [out] and sorted(results) == [(out, False), (out, True)]
    assert prepared_cache.prepared("x/y", source, lambda o: build(o, source)) == (out, False) and len(calls) == 1
    changed = {"content_sha256": "b"}
    assert prepared_cache.prepared("x/y", changed, lambda o: build(o, changed)) == (out, True) and len(calls) == 2
    assert json.load(open(os.path.join(out, "meta.json")))["source"] == changed
