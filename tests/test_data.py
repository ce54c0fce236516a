"""Tests for the data pipeline: window layout, exact epochs, restore, host slices, errors, llm.c shards."""

import json
import os
import subprocess
import sys
import textwrap

import grain
import jax
import numpy as np
import pytest
from etils import epath
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from gpt2_jax.data import loader as data
from gpt2_jax.data import prepare
from gpt2_jax.data.shards import shard_header

T = 16  # block_size
SIZES = (1000, 777, 1500)  # tokens per shard: (n - 1) // T = 62 + 48 + 93 windows
N_WINDOWS = sum((n - 1) // T for n in SIZES)


def write_shard(path, tokens, header=None):
    header = shard_header(len(tokens)) if header is None else np.asarray(header, "<i4").tobytes()
    with open(path, "wb") as f:
        f.write(header + np.asarray(tokens, "<u2").tobytes())


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """Three train shards whose token values are their global positions, so a window's first
    input names it; plus a short val shard."""
    path = tmp_path_factory.mktemp("shards")
    start = 0
    for i, n in enumerate(SIZES):
        write_shard(path / f"train_{i:06d}.bin", np.arange(start, start + n))
        start += n
    write_shard(path / "val_000000.bin", np.arange(40_000, 40_000 + 5 * T + 3))  # 5 windows
    return str(path)


def window_starts():
    """The global position of every window's first token, in window order."""
    starts, offset = [], 0
    for n in SIZES:
        starts += [offset + w * T for w in range((n - 1) // T)]
        offset += n
    return np.array(starts)


def take(it, k):
    return [next(it) for _ in range(k)]


def train(shards, **kw):
    args = dict(block_size=T, global_batch_size=8, seed=0, process_index=0, process_count=1) | kw
    return data.make_train_iterator(shards, **args)


def test_windows_are_stride_block_size_and_stay_in_their_shard(shards):
    assert data.num_windows(shards, T) == N_WINDOWS == 203 and data.num_windows(shards, T, "val") == 5
    it = data.make_eval_iterator(shards, block_size=T, global_batch_size=8, split="train", process_index=0, process_count=1)
    batches = list(it)
    assert len(batches) == it.num_batches == 26  # ceil(203 / 8)
    inputs = np.concatenate([b["inputs"] for b in batches])
    targets = np.concatenate([b["targets"] for b in batches])
    weights = np.concatenate([b["weights"] for b in batches])
    starts = window_starts()
    np.testing.assert_array_equal(inputs[:N_WINDOWS], starts[:, None] + np.arange(T))
    np.testing.assert_array_equal(targets[:N_WINDOWS], starts[:, None] + np.arange(1, T + 1))
    assert inputs.dtype == targets.dtype == np.int32 and weights.dtype == np.float32
    assert (weights[:N_WINDOWS] == 1).all() and (weights[N_WINDOWS:] == 0).all() and (inputs[N_WINDOWS:] == 0).all()


def test_every_window_exactly_once_per_epoch(shards):
    it = train(shards, seed=7)
    stream = np.concatenate([b["inputs"][:, 0] for b in take(it, 3 * N_WINDOWS // 8 + 1)])
    epochs = [stream[e * N_WINDOWS : (e + 1) * N_WINDOWS] for e in range(3)]
    for epoch in epochs:
        np.testing.assert_array_equal(np.sort(epoch), window_starts())
    assert not np.array_equal(epochs[0], epochs[1]) and not np.array_equal(epochs[0], window_starts())
    assert it.epoch == 3 and it.next_batch == 3 * N_WINDOWS // 8 + 1
    again = np.concatenate([b["inputs"][:, 0] for b in take(train(shards, seed=7), 10)])
    other = np.concatenate([b["inputs"][:, 0] for b in take(train(shards, seed=8), 10)])
    np.testing.assert_array_equal(again, stream[:80])
    assert not np.array_equal(other, again)


def test_batches_are_targets_shifted_by_one(shards):
    batch = next(train(shards))
    assert batch["inputs"].shape == batch["targets"].shape == (8, T)
    np.testing.assert_array_equal(batch["targets"][:, :-1], batch["inputs"][:, 1:])
    np.testing.assert_array_equal(batch["targets"][:, -1], batch["inputs"][:, -1] + 1)


@pytest.mark.parametrize("at", [0, 5, 25, 26, 60])  # 25/26: around the first epoch boundary (203 / 8)
def test_restore_continues_with_the_same_batches(shards, at):
    it = train(shards, seed=3)
    take(it, at)
    state = json.loads(json.dumps(it.get_state()))
    expected = take(it, 3)
    restored = train(shards, seed=3)
    take(restored, 2)  # a used iterator also jumps
    restored.set_state(state)
    assert restored.get_state() == state
    for a, b in zip(expected, take(restored, 3)):
        np.testing.assert_array_equal(a["inputs"], b["inputs"])
        np.testing.assert_array_equal(a["targets"], b["targets"])
    assert state == {"next_batch": at, "split": "train", "seed": 3, "block_size": T, "global_batch_size": 8,
                     "num_windows": N_WINDOWS}  # fmt: skip


def test_restore_in_a_fresh_process(shards, tmp_path):
    it = train(shards, seed=11)
    take(it, 30)
    (tmp_path / "state.json").write_text(json.dumps(it.get_state()))
    expected = np.stack([b["inputs"] for b in take(it, 4)])
    script = textwrap.dedent(f"""
        import json, sys, numpy as np
        from gpt2_jax.data import loader as data
        it = data.make_train_iterator({shards!r}, block_size={T}, global_batch_size=8, seed=11)
        it.set_state(json.load(open(sys.argv[1] + "/state.json")))
        np.save(sys.argv[1] + "/next.npy", np.stack([next(it)["inputs"] for _ in range(4)]))
    """)
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    subprocess.run([sys.executable, "-c", script, str(tmp_path)], check=True, env=env, timeout=120)
    np.testing.assert_array_equal(np.load(tmp_path / "next.npy"), expected)


def test_grain_orbax_handler_round_trip(shards, tmp_path):
    it = train(shards, seed=5)
    take(it, 9)
    handler = grain.checkpoint.CheckpointHandler()
    handler.save(epath.Path(tmp_path), args=grain.checkpoint.CheckpointSave(it))
    expected = next(it)
    restored = handler.restore(epath.Path(tmp_path), args=grain.checkpoint.CheckpointRestore(train(shards, seed=5)))
    np.testing.assert_array_equal(next(restored)["inputs"], expected["inputs"])


def test_restore_refuses_a_changed_order(shards):
    state = train(shards, seed=1).get_state()
    with pytest.raises(data.DataError, match=r"changed since the checkpoint: seed 1 -> 2"):
        train(shards, seed=2).set_state(state)
    with pytest.raises(data.DataError, match=r"global_batch_size 8 -> 16"):
        train(shards, seed=1, global_batch_size=16).set_state(state)


@pytest.mark.parametrize("hosts", [2, 4])
def test_hosts_get_disjoint_rows_whose_union_is_the_global_batch(shards, hosts):
    single = take(train(shards, seed=2), 40)
    per_host = [take(train(shards, seed=2, process_index=p, process_count=hosts), 40) for p in range(hosts)]
    for k, whole in enumerate(single):
        parts = [h[k]["inputs"] for h in per_host]
        assert all(p.shape == (8 // hosts, T) for p in parts)
        np.testing.assert_array_equal(np.concatenate(parts), whole["inputs"])  # host p holds rows p*L:(p+1)*L
        firsts = np.concatenate(parts)[:, 0]
        assert len(set(firsts)) == len(firsts)


def test_eval_hosts_split_every_batch_and_pad_the_last(shards):
    kw = dict(block_size=T, global_batch_size=4, split="val")
    whole = list(data.make_eval_iterator(shards, process_index=0, process_count=1, **kw))
    hosts = [list(data.make_eval_iterator(shards, process_index=p, process_count=2, **kw)) for p in range(2)]
    assert len(whole) == len(hosts[0]) == len(hosts[1]) == 2  # 5 windows -> 2 batches of 4
    for k in range(2):
        for key in ("inputs", "targets", "weights"):
            np.testing.assert_array_equal(np.concatenate([hosts[0][k][key], hosts[1][k][key]]), whole[k][key])
    np.testing.assert_array_equal(whole[1]["weights"][:, 0], [1, 0, 0, 0])
    np.testing.assert_array_equal(whole[0]["inputs"][:, 0], 40_000 + T * np.arange(4))


def test_to_global_batch_shards_rows_over_the_mesh(shards):
    mesh = Mesh(np.array(jax.devices()[:8]), ("data",))
    sharding = NamedSharding(mesh, P("data", None))
    batch = next(train(shards))
    arrays = data.to_global_batch(batch, sharding)
    assert set(arrays) == {"inputs", "targets", "weights"}
    assert np.all(np.asarray(arrays["weights"]) == 1.0)  # pretraining: every target counts
    for key, array in arrays.items():
        assert array.shape == (8, T) and array.dtype == batch[key].dtype and array.sharding == sharding
        np.testing.assert_array_equal(np.asarray(array), batch[key])
        assert [s.data.shape for s in array.addressable_shards] == [(1, T)] * 8


def test_llm_c_and_modded_nanogpt_shards_load_unchanged(tmp_path):
    """Written exactly like llm.c's dev/data/data_common.py write_datafile (gpt-2) and named like
    its and modded-nanogpt's FineWeb shards."""
    rng = np.random.default_rng(0)
    toks = {name: rng.integers(0, 50257, size=n, dtype=np.int64) for name, n in
            (("fineweb_val_000000.bin", 300), ("fineweb_train_000001.bin", 500), ("fineweb_train_000002.bin", 200))}  # fmt: skip
    for name, tokens in toks.items():
        header = np.zeros(256, dtype=np.int32)
        header[0], header[1], header[2] = 20240520, 1, len(tokens)
        with open(tmp_path / name, "wb") as f:
            f.write(header.tobytes())
            f.write(tokens.astype(np.uint16).tobytes())
    assert data.num_windows(str(tmp_path), 99, "train") == 5 + 2
    ev = list(data.make_eval_iterator(str(tmp_path), block_size=99, global_batch_size=1, split="train",
                                      process_index=0, process_count=1))  # fmt: skip
    first = toks["fineweb_train_000001.bin"]
    np.testing.assert_array_equal(ev[0]["inputs"][0], first[:99])
    np.testing.assert_array_equal(ev[4]["targets"][0], first[4 * 99 + 1 : 5 * 99 + 1])
    np.testing.assert_array_equal(ev[5]["inputs"][0], toks["fineweb_train_000002.bin"][:99])
    assert data.num_windows(str(tmp_path), 99, "val") == 3


def test_prepare_output_round_trips_through_the_loader(tmp_path, capsys):
    (tmp_path / "a.txt").write_text("To be, or not to be: that is the question. " * 20)
    assert prepare.main(["--input", str(tmp_path / "a.txt"), "--out", str(tmp_path / "d"), "--val_fraction", "0"]) == 0
    tokens = np.fromfile(tmp_path / "d" / "train_000000.bin", dtype="<u2", offset=1024)
    ev = list(data.make_eval_iterator(str(tmp_path / "d"), block_size=8, global_batch_size=2, split="train",
                                      process_index=0, process_count=1))  # fmt: skip
    got = np.concatenate([b["inputs"][b["weights"][:, 0] == 1] for b in ev])
    np.testing.assert_array_equal(got.reshape(-1), tokens[: len(got) * 8])
    assert ev[0]["inputs"][0, 0] == 50256


def _bad_shard_dirs(tmp_path):
    def make(name, header=None, tokens=range(100), file="train_000000.bin"):
        (tmp_path / name).mkdir()
        write_shard(tmp_path / name / file, list(tokens), header)
        return str(tmp_path / name)

    (tmp_path / "empty").mkdir()
    truncated = make("truncated", header=[20240520, 1, 5000] + [0] * 253)
    tiny = make("tiny", tokens=range(T))
    headless = str(tmp_path / "headless")
    os.mkdir(headless)
    (tmp_path / "headless" / "train_000000.bin").write_bytes(b"\x00" * 10)
    return [
        (str(tmp_path / "nowhere"), f"data path {tmp_path}/nowhere is not a folder"),
        (str(tmp_path / "empty"), f"no train shards in {tmp_path}/empty; accepted names: train_NNNNNN.bin"),
        (make("magic", header=[1234] + [0] * 255), "not a token shard \\(magic number 1234, expected 20240520\\)"),
        (make("version", header=[20240520, 7, 100] + [0] * 253), "shard version 7; only version 1"),
        (truncated, "truncated: its header says 5,000 tokens but the file holds 100"),
        (headless, "10 bytes, shorter than the 1024-byte shard header"),
        (tiny, "shorter than one window of block_size \\+ 1 = 17 tokens \\(its longest shard has 16\\)"),
    ]


def test_bad_shards_give_clear_errors(tmp_path):
    for path, message in _bad_shard_dirs(tmp_path):
        with pytest.raises(data.DataError, match=message):
            data.make_train_iterator(path, block_size=T, global_batch_size=8, seed=0)


def test_out_of_vocabulary_token_is_reported_where_it_is(tmp_path):
    tokens = np.arange(200) % 1000
    tokens[37] = 60000
    write_shard(tmp_path / "train_000000.bin", tokens)
    it = data.make_eval_iterator(str(tmp_path), block_size=T, global_batch_size=4, split="train",
                                 process_index=0, process_count=1)  # fmt: skip
    with pytest.raises(data.DataError, match=r"train_000000.bin: token id 60000 at position 37 is >= the vocabulary size 50257"):
        next(it)


def test_batch_layout_errors(shards):
    with pytest.raises(data.DataError, match="global batch size 6 must be a positive multiple of the 4 processes"):
        train(shards, global_batch_size=6, process_count=4)
    with pytest.raises(data.DataError, match=r"process_index 2 is not in \[0, process_count=2\)"):
        train(shards, process_index=2, process_count=2)


# --- llm.c's other shard names and files ------------------------------------------------------


def _llm_c_file(path, tokens, magic=20240520, version=1, dtype=np.uint16):
    """Like llm.c's dev/data/data_common.py write_datafile: gpt-2 (uint16) or llama-3 (uint32)."""
    header = np.zeros(256, dtype=np.int32)
    header[:3] = magic, version, len(tokens)
    path.write_bytes(header.tobytes() + np.asarray(tokens, dtype).tobytes())


@pytest.mark.parametrize("train_name, val_name", [
    ("tiny_shakespeare_train.bin", "tiny_shakespeare_val.bin"),  # dev/data/tinyshakespeare.py
    ("TinyStories_train.bin", "TinyStories_val.bin"),  # dev/data/tinystories.py
    ("fineweb_train_000001.bin", "fineweb_val_000000.bin"),  # dev/data/fineweb.py, modded-nanogpt
])  # fmt: skip
def test_every_llm_c_shard_name_is_found(tmp_path, train_name, val_name):
    _llm_c_file(tmp_path / train_name, np.arange(10 * T + 1))
    _llm_c_file(tmp_path / val_name, np.arange(3 * T + 1))
    (tmp_path / "tiny_shakespeare.txt").write_text("the input llm.c keeps beside its shards")
    assert data.shard_files(str(tmp_path), "train") == [str(tmp_path / train_name)]
    assert data.num_windows(str(tmp_path), T, "train") == 10 and data.num_windows(str(tmp_path), T, "val") == 3


def test_no_shards_lists_the_accepted_names_and_the_bin_files_seen(tmp_path):
    _llm_c_file(tmp_path / "shakespeare.bin", np.arange(100))
    with pytest.raises(data.DataError) as e:
        data.shard_files(str(tmp_path), "train")
    assert str(e.value) == (
        f"no train shards in {tmp_path} (its .bin files: shakespeare.bin); accepted names: train_NNNNNN.bin "
        "(prepare's), PREFIX_train_NNNNNN.bin (llm.c's and modded-nanogpt's FineWeb) or PREFIX_train.bin (llm.c's "
        "tiny_shakespeare_train.bin, TinyStories_train.bin); make them with python -m gpt2_jax.prepare")


def test_a_llama_3_shard_is_named_for_what_it_is_in_one_line_exit_2(tmp_path):
    from runs import cli

    _llm_c_file(tmp_path / "fineweb_train_000001.bin", np.arange(1000) + 100_000, 20240801, 7, np.uint32)
    with pytest.raises(data.DataError, match="an llm.c Llama-3 shard \\(magic 20240801: uint32 token ids"):
        data.num_windows(str(tmp_path), T)
    run = cli("--config", "tiny", "--workdir", str(tmp_path / "run"), f"--config.data.path={tmp_path}")
    assert run.returncode == 2 and "Traceback" not in run.stderr
    assert run.stderr == (
        f"error: {tmp_path}/fineweb_train_000001.bin: an llm.c Llama-3 shard (magic 20240801: uint32 token ids of "
        "the Llama-3 tokenizer), not GPT-2 tokens; this trainer reads GPT-2 shards (magic 20240520, uint16): "
        "re-run llm.c's dev/data script with -m gpt-2 (its default), or prepare the text with python -m "
        "gpt2_jax.prepare\n")


def test_an_llm_c_hellaswag_file_among_the_shards_is_named(tmp_path):
    _llm_c_file(tmp_path / "train_000000.bin", np.arange(100))
    _llm_c_file(tmp_path / "hellaswag_val.bin", np.arange(100), 20240522)
    with pytest.raises(data.DataError, match="hellaswag_val.bin: an llm.c evaluation file \\(magic 20240522"):
        data.num_windows(str(tmp_path), T, "val")


# --- data.path from raw text: prepared into the cache on first use ----------------------------

WORDS = "the quick brown fox jumps over a lazy dog and then runs far away into the woods".split()


def _text(n_words, seed):
    rng = np.random.default_rng(seed)
    return " ".join(WORDS[i] for i in rng.integers(0, len(WORDS), n_words))


def _plan_on(path, **overrides):
    from runs import tiny

    from gpt2_jax.train import plan as plan_lib

    settings = {"model.vocab_size": 50257, "batch_size": 8, "eval_every": 2} | overrides
    return plan_lib.plan(tiny(str(path), **settings))


def _meta(folder):
    return json.load(open(os.path.join(folder, "meta.json")))


@pytest.fixture
def cache_root(tmp_path, monkeypatch):
    monkeypatch.setenv("GPT2_JAX_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_one_text_file_trains_through_data_path_with_a_val_split_by_position(tmp_path, cache_root, capsys):
    from runs import rows, tiny

    from gpt2_jax.interop.tokenizer import get_tokenizer
    from gpt2_jax.train import cli as train

    text = _text(3000, 0)
    (tmp_path / "data.txt").write_text(text)
    config = tiny(str(tmp_path / "data.txt"), **{"model.vocab_size": 50257, "batch_size": 8, "total_steps": 2,
                                                  "warmup_steps": 1, "eval_every": 2})  # fmt: skip
    train.train_and_evaluate(config, str(tmp_path / "run"))
    out = capsys.readouterr().out
    (folder,) = [str(p) for p in (cache_root / "prepared").iterdir() if p.is_dir()]
    meta = _meta(folder)
    stream = [50256, *get_tokenizer().encode_ordinary(text)]
    n_val = round(len(stream) * 0.1)
    assert meta["val_rule"] == "positions" and meta["val_fraction"] == 0.1
    assert (meta["train"]["tokens"], meta["val"]["tokens"]) == (len(stream) - n_val, n_val)
    got = [np.fromfile(os.path.join(folder, f"{s}_000000.bin"), "<u2", offset=1024) for s in ("train", "val")]
    np.testing.assert_array_equal(np.concatenate(got), stream)  # the stream, cut once: val is its last 10%
    assert f"data: validation split: the last 10% of the token stream ({n_val:,} tokens), by position" in out
    _, eval_rows = rows(tmp_path / "run")
    assert [r["step"] for r in eval_rows] == [2] and np.isfinite(eval_rows[0]["val_loss"])


def test_unchanged_inputs_are_reused_and_changed_ones_prepared_again(tmp_path, cache_root, monkeypatch, capsys):
    from gpt2_jax.data import pretraining

    calls = []
    write = pretraining.write_dataset
    monkeypatch.setattr(pretraining, "write_dataset", lambda *a, **k: calls.append(a[1]) or write(*a, **k))
    (tmp_path / "data.txt").write_text(_text(2000, 0))
    first = _plan_on(tmp_path / "data.txt").data_path
    mtime = os.path.getmtime(os.path.join(first, "meta.json"))
    assert calls == [first] and first.startswith(str(cache_root / "prepared" / "data.txt-"))
    assert "data: preparing 1 file(s)" in capsys.readouterr().out

    os.utime(tmp_path / "data.txt")  # touched, same bytes: still reused
    assert _plan_on(tmp_path / "data.txt").data_path == first and calls == [first]
    assert os.path.getmtime(os.path.join(first, "meta.json")) == mtime
    assert f"data: {first}, prepared from {tmp_path}/data.txt (unchanged since)" in capsys.readouterr().out

    (tmp_path / "data.txt").write_text(_text(2500, 1))
    assert _plan_on(tmp_path / "data.txt").data_path == first and calls == [first, first]
    assert _meta(first)["train"]["tokens"] + _meta(first)["val"]["tokens"] > 2500
    assert sorted(os.listdir(cache_root / "prepared")) == [os.path.basename(first), os.path.basename(first) + ".lock"]


def test_folders_globs_and_jsonl_are_prepared_too(tmp_path, cache_root):
    from gpt2_jax.interop.tokenizer import get_tokenizer

    enc = get_tokenizer()
    texts = [_text(800, i) for i in range(3)]
    (tmp_path / "books").mkdir()
    for i, t in enumerate(texts):
        (tmp_path / "books" / f"b{i}.txt").write_text(t)
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps({"text": t, "id": i}) + "\n" for i, t in enumerate(texts)))
    n_tokens = sum(1 + len(enc.encode_ordinary(t)) for t in texts)
    for path in (tmp_path / "books", f"{tmp_path}/books/*.txt", tmp_path / "rows.jsonl"):
        meta = _meta(_plan_on(path).data_path)
        assert meta["source"]["files"] == (1 if str(path).endswith(".jsonl") else 3), path
        assert meta["train"]["tokens"] + meta["val"]["tokens"] == n_tokens, path
        assert meta["val"]["tokens"] > 0 and meta["val_rule"] in ("documents", "positions"), path
    assert len([p for p in (cache_root / "prepared").iterdir() if p.is_dir()]) == 3


def test_bad_raw_inputs_are_one_config_error_line(tmp_path, cache_root):
    from gpt2_jax.train import plan as plan_lib

    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "bad.txt").write_bytes(b"fine\n\xff")
    for path, message in [
        (tmp_path / "nowhere.txt", f"data.path {tmp_path}/nowhere.txt: not found (it is not a folder of token "
                                   "shards, nor a text / jsonl file, folder or glob)"),
        (tmp_path / "empty.txt", f"data.path {tmp_path}/empty.txt: input is empty (0 bytes)"),
        (tmp_path / "bad.txt", f"data.path {tmp_path}/bad.txt: {tmp_path}/bad.txt:2: not valid UTF-8 (byte 0xff)"),
        (f"{tmp_path}/*.md", f"data.path {tmp_path}/*.md: no files match '{tmp_path}/*.md'"),
    ]:  # fmt: skip
        with pytest.raises(plan_lib.ConfigError) as e:
            _plan_on(path)
        assert str(e.value) == message
    assert not (cache_root / "prepared").exists() or not [p for p in (cache_root / "prepared").iterdir() if p.is_dir()]


def test_a_tiny_validation_split_warns(tmp_path, cache_root, capsys):
    (tmp_path / "small.txt").write_text(_text(1500, 0))
    p = _plan_on(tmp_path / "small.txt", **{"model.block_size": 16})
    val = _meta(p.data_path)["val"]["tokens"]
    windows = (val - 1) // 16
    assert 0 < val < 1000
    assert (f"warning: the validation split has only {windows * 16:,} tokens to evaluate (under 10,000): its "
            "val_loss and val_ppl are rough estimates from so few; more text gives steadier ones") in capsys.readouterr().out
