"""Tests for the prepare CLI: exact tokens, llm.c header bytes, splits, workers, errors, atomicity."""

import gzip
import json
import os
import struct
import subprocess
import sys

import numpy as np
import pytest

from gpt2_jax.data import prepare, pretraining, shards
from gpt2_jax.interop.tokenizer import EOT_ID, get_tokenizer

UNICODE_DOCS = [
    "Hello world",
    "Ünïcödé: naïve café, Straße, Ærø — “quotes” … 10€\n",
    "日本語のテキスト。中文文本。한국어 텍스트.\n\nEmoji: 🦄🚀👩‍👩‍👧 and flags 🇳🇿",
    "RTL: שלום עולם مرحبا بالعالم; combining: e\u0301 a\u0308; a literal <|endoftext|> stays text\r\n",
]


def read_shard(path):
    """(header int32[256], tokens uint16) of one shard file."""
    raw = open(path, "rb").read()
    header = np.frombuffer(raw[:1024], dtype="<i4")
    return header, np.frombuffer(raw[1024:], dtype="<u2")


def split_tokens(out, split):
    files = json.load(open(os.path.join(out, "meta.json")))[split]["files"]
    return np.concatenate([read_shard(os.path.join(out, f))[1] for f in files] or [np.zeros(0, "<u2")])


def docs_of(tokens):
    """Token stream -> decoded documents (each begins with <|endoftext|>)."""
    enc = get_tokenizer()
    cuts = np.flatnonzero(tokens == EOT_ID)
    return [enc.decode(tokens[a + 1 : b].tolist()) for a, b in zip(cuts, list(cuts[1:]) + [len(tokens)])]


def expected_stream(texts):
    enc = get_tokenizer()
    return [t for text in texts for t in [EOT_ID] + enc.encode_ordinary(text)]


def run_cli(capsys, *argv):
    rc = prepare.main([str(a) for a in argv])
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


def write_files(folder, texts, suffix=".txt"):
    paths = []
    for i, text in enumerate(texts):
        path = folder / f"doc{i:02d}{suffix}"
        path.write_bytes(text.encode("utf-8") if isinstance(text, str) else text)
        paths.append(path)
    return paths


def test_tokens_in_equal_tokens_out_with_unicode(tmp_path, capsys):
    (tmp_path / "in").mkdir()
    write_files(tmp_path / "in", UNICODE_DOCS)
    rc, out, err = run_cli(capsys, "--input", tmp_path / "in", "--out", tmp_path / "out", "--val_fraction", 0, "--workers", 1)
    assert rc == 0, err
    assert out.startswith(f"wrote {tmp_path / 'out'}: train 4 docs")
    np.testing.assert_array_equal(split_tokens(tmp_path / "out", "train"), expected_stream(UNICODE_DOCS))
    assert docs_of(split_tokens(tmp_path / "out", "train")) == UNICODE_DOCS
    meta = json.load(open(tmp_path / "out" / "meta.json"))
    assert meta["train"]["documents"] == 4 and meta["val"] == {"files": [], "tokens": 0, "documents": 0,
                                                               "sha256": meta["val"]["sha256"]}  # fmt: skip
    assert meta["input_bytes"] == sum(len(t.encode()) for t in UNICODE_DOCS)
    assert "warning: the validation split is empty" not in err  # val_fraction 0 asks for no val
    assert meta["val_rule"] == "none" and err == ""


def test_header_is_llm_c_format_byte_for_byte(tmp_path, capsys):
    (tmp_path / "a.txt").write_text("Hello world")
    rc, _, err = run_cli(capsys, "--input", tmp_path / "a.txt", "--out", tmp_path / "out", "--val_fraction", 0)
    assert rc == 0, err
    raw = (tmp_path / "out" / "train_000000.bin").read_bytes()
    assert raw[:1024] == struct.pack("<256i", 20240520, 1, 3, *[0] * 253)
    assert raw[1024:] == struct.pack("<3H", 50256, 15496, 995)  # <|endoftext|> Hello world
    assert shards.shard_header(3) == raw[:1024]


def test_shard_size_fills_shards_exactly(tmp_path, capsys):
    (tmp_path / "in").mkdir()
    write_files(tmp_path / "in", [f"document {i}: " + "words " * i for i in range(60)])
    rc, _, _ = run_cli(capsys, "--input", tmp_path / "in", "--out", tmp_path / "one", "--val_fraction", 0)
    rc2, _, _ = run_cli(capsys, "--input", tmp_path / "in", "--out", tmp_path / "many", "--val_fraction", 0, "--shard_size", 100)
    assert rc == rc2 == 0
    meta = json.load(open(tmp_path / "many" / "meta.json"))
    sizes = [read_shard(tmp_path / "many" / f)[0][2] for f in meta["train"]["files"]]
    assert meta["train"]["files"][:2] == ["train_000000.bin", "train_000001.bin"]
    assert sizes[:-1] == [100] * (len(sizes) - 1) and 0 < sizes[-1] <= 100
    np.testing.assert_array_equal(split_tokens(tmp_path / "many", "train"), split_tokens(tmp_path / "one", "train"))
    assert meta["train"]["sha256"] == json.load(open(tmp_path / "one" / "meta.json"))["train"]["sha256"]


def test_val_split_is_deterministic_disjoint_and_order_free(tmp_path, capsys):
    lines = [f"line document number {i} with some text" for i in range(400)]
    (tmp_path / "a.txt").write_text("\n".join(lines) + "\n")
    (tmp_path / "b.txt").write_text("\n".join(reversed(lines)) + "\n")
    for name, src in (("out1", "a.txt"), ("out2", "a.txt"), ("rev", "b.txt")):
        rc, _, err = run_cli(capsys, "--input", tmp_path / src, "--out", tmp_path / name, "--doc_mode", "line", "--val_fraction", 0.2)
        assert rc == 0, err
    train, val = docs_of(split_tokens(tmp_path / "out1", "train")), docs_of(split_tokens(tmp_path / "out1", "val"))
    assert not set(train) & set(val) and sorted(train + val) == sorted(lines)
    assert set(val) == {d for d in lines if pretraining.is_val(d, 0.2)}
    assert 40 <= len(val) <= 120  # 20% of 400, loosely
    assert json.load(open(tmp_path / "out1" / "meta.json"))["val_rule"] == "documents"
    for split in ("train", "val"):
        assert (tmp_path / "out1" / f"{split}_000000.bin").read_bytes() == (tmp_path / "out2" / f"{split}_000000.bin").read_bytes()
    assert set(docs_of(split_tokens(tmp_path / "rev", "val"))) == set(val)  # membership does not depend on order


def test_one_and_four_workers_write_identical_files(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(pretraining, "CHUNK_BYTES", 2000)  # many tasks, so the pool interleaves them
    (tmp_path / "in").mkdir()
    write_files(tmp_path / "in", [UNICODE_DOCS[i % 4] * (i + 1) + f" #{i}" for i in range(40)])
    for workers in (1, 4):
        argv = ["--input", tmp_path / "in", "--out", tmp_path / f"w{workers}", "--val_fraction", 0.3, "--workers", workers]
        rc, _, err = run_cli(capsys, *argv, "--shard_size", 500)
        assert rc == 0, err
    names = sorted(os.listdir(tmp_path / "w1"))
    assert names == sorted(os.listdir(tmp_path / "w4")) and "val_000000.bin" in names and len(names) > 4
    for name in names:
        assert (tmp_path / "w1" / name).read_bytes() == (tmp_path / "w4" / name).read_bytes(), name


def test_doc_modes_jsonl_gzip_and_bom(tmp_path, capsys):
    (tmp_path / "lines.txt").write_bytes(b"\xef\xbb\xbffirst\r\n\n  \nsecond line\nthird")
    (tmp_path / "paras.txt").write_text("p1 a\np1 b\n\n\n  \np2\n")
    records = [{"text": "jsonl one", "id": 1}, {"text": "jsonl ü two"}, {"text": None}]
    (tmp_path / "r.jsonl.gz").write_bytes(gzip.compress("\n".join(map(json.dumps, records)).encode() + b"\n\n"))
    cases = [("lines.txt", "line", ["first", "second line", "third"]), ("paras.txt", "blank_line", ["p1 a\np1 b", "p2"]),
             ("r.jsonl.gz", "file", ["jsonl one", "jsonl ü two"])]  # fmt: skip
    for name, mode, docs in cases:
        out = tmp_path / f"out_{name}"
        rc, _, err = run_cli(capsys, "--input", tmp_path / name, "--out", out, "--doc_mode", mode, "--val_fraction", 0)
        assert rc == 0, err
        np.testing.assert_array_equal(split_tokens(out, "train"), expected_stream(docs))


def test_jsonl_field_and_globs(tmp_path, capsys):
    for i in range(3):
        (tmp_path / f"part{i}.jsonl").write_text(json.dumps({"body": f"record {i}", "text": 5}) + "\n")
    rc, _, err = run_cli(capsys, "--input", str(tmp_path / "part*.jsonl"), "--out", tmp_path / "out", "--field", "body", "--val_fraction", 0)
    assert rc == 0, err
    assert docs_of(split_tokens(tmp_path / "out", "train")) == ["record 0", "record 1", "record 2"]


def test_errors_replace_substitutes_undecodable_bytes(tmp_path, capsys):
    (tmp_path / "bad.txt").write_bytes(b"good\nbad \xff\xfe byte")
    rc, _, err = run_cli(capsys, "--input", tmp_path / "bad.txt", "--out", tmp_path / "out", "--errors", "replace", "--val_fraction", 0)
    assert rc == 0, err
    assert docs_of(split_tokens(tmp_path / "out", "train")) == ["good\nbad \ufffd\ufffd byte"]


def test_hf_dataset_from_local_folder(tmp_path, capsys):
    datasets = pytest.importorskip("datasets")
    texts = ["first row", "second row ✓", "", "fourth"]
    datasets.Dataset.from_dict({"content": texts, "n": [1, 2, 3, 4]}).save_to_disk(str(tmp_path / "ds"))
    rc, _, err = run_cli(capsys, "--hf_dataset", tmp_path / "ds", "--field", "content", "--out", tmp_path / "out", "--val_fraction", 0)
    assert rc == 0, err
    np.testing.assert_array_equal(split_tokens(tmp_path / "out", "train"), expected_stream(["first row", "second row ✓", "fourth"]))
    rc, _, err = run_cli(capsys, "--hf_dataset", tmp_path / "ds", "--out", tmp_path / "o2")
    assert rc == 2 and err == f"error: dataset '{tmp_path / 'ds'}' has no field 'text' (fields: content, n); choose one with --field\n"


def test_overwrite_replaces_only_a_prepare_output(tmp_path, capsys):
    (tmp_path / "a.txt").write_text("one")
    (tmp_path / "b.txt").write_text("two")
    assert run_cli(capsys, "--input", tmp_path / "a.txt", "--out", tmp_path / "out", "--val_fraction", 0)[0] == 0
    assert run_cli(capsys, "--input", tmp_path / "b.txt", "--out", tmp_path / "out", "--val_fraction", 0, "--overwrite")[0] == 0
    assert docs_of(split_tokens(tmp_path / "out", "train")) == ["two"]
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    rc, _, err = run_cli(capsys, "--input", tmp_path / "a.txt", "--out", tmp_path / "mine", "--overwrite")
    assert rc == 2 and "no meta.json" in err and (tmp_path / "mine" / "notes.txt").read_text() == "keep me"
    assert sorted(os.listdir(tmp_path)) == ["a.txt", "b.txt", "mine", "out"]  # no temporary folders left


def test_atomic_folder_leaves_nothing_on_ctrl_c_and_replaces_out_at_the_end(tmp_path):
    out = tmp_path / "new" / "parents" / "out"
    with pytest.raises(KeyboardInterrupt):
        with shards.atomic_folder(str(out)) as tmp:
            (tmp_path / "new" / "parents" / os.path.basename(tmp) / "half.bin").write_bytes(b"x")
            raise KeyboardInterrupt
    assert os.listdir(tmp_path) == []  # the parent folders it made are gone too
    for text in ("first", "second"):  # a trailing slash on --out names the same folder
        with shards.atomic_folder(f"{out}/", overwrite=True) as tmp:
            with open(os.path.join(tmp, "meta.json"), "w") as f:
                f.write(text)
    assert os.listdir(out) == ["meta.json"] and (out / "meta.json").read_text() == "second"
    assert os.listdir(out.parent) == ["out"]  # no temporary or old folders beside it


def _bad_inputs(tmp_path):
    """(argv, expected message) for every user error; files are made on demand."""
    (tmp_path / "empty.txt").write_bytes(b"")
    (tmp_path / "blank.txt").write_text("  \n\n \t\n")
    (tmp_path / "ok.txt").write_text("fine")
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n\n{"text": oops}\n')
    (tmp_path / "nofield.jsonl").write_text('{"text": "ok"}\n{"body": "x"}\n')
    (tmp_path / "list.jsonl").write_text("[1, 2]\n")
    (tmp_path / "num.jsonl").write_text('{"text": 3}\n')
    (tmp_path / "latin1.txt").write_bytes("line one\nfa\u00e7ade\n".encode("latin-1"))
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    (tmp_path / "emptydir").mkdir()
    out = ["--out", tmp_path / "new" / "out"]
    t = str(tmp_path)
    return [
        (["--input", tmp_path / "missing.txt", *out], f"input not found: {t}/missing.txt"),
        (["--input", f"{t}/*.nothing", *out], f"no files match '{t}/*.nothing'"),
        (["--input", tmp_path / "emptydir", *out], f"no input files: the folders given are empty ({t}/emptydir)"),
        (["--input", tmp_path / "empty.txt", *out], "input is empty (0 bytes)"),
        (["--input", tmp_path / "blank.txt", *out], "no documents after filtering: every document is empty or whitespace"),
        (["--input", tmp_path / "blank.txt", "--doc_mode", "line", *out], "no documents after filtering"),
        (["--input", tmp_path / "bad.jsonl", *out], f"{t}/bad.jsonl:3: not valid JSON (Expecting value at column 10)"),
        (["--input", tmp_path / "nofield.jsonl", *out], f"{t}/nofield.jsonl:2: no field 'text' (fields: body); choose one with --field"),
        (["--input", tmp_path / "list.jsonl", *out], f"{t}/list.jsonl:1: not a JSON object but list"),
        (["--input", tmp_path / "num.jsonl", *out], f"{t}/num.jsonl:1: field 'text' is int, not a string"),
        (["--input", tmp_path / "ok.txt", tmp_path / "latin1.txt", *out],
         f"{t}/latin1.txt:2: not valid UTF-8 (byte 0xe7); pass --errors replace to replace undecodable bytes with U+FFFD"),
        (["--input", tmp_path / "ok.txt", "--out", tmp_path / "full"], f"--out {t}/full is not empty; pass --overwrite to replace it"),
        (["--input", tmp_path / "ok.txt", "--out", tmp_path / "ok.txt"], f"--out {t}/ok.txt exists and is not a folder"),
        (["--input", tmp_path / "ok.txt", "--val_fraction", "1.5", *out], "--val_fraction must be in [0, 1), got 1.5"),
        (["--input", tmp_path / "ok.txt", "--val_fraction", "0.999999", *out], "no training documents: all went to validation"),
        (["--input", tmp_path / "ok.txt", "--workers", "0", *out], "--workers must be at least 1, got 0"),
        (["--input", tmp_path / "ok.txt", "--shard_size", "0", *out], "--shard_size must be in [1, 2**31), got 0"),
        ([*out], "give exactly one of --input PATH ... or --hf_dataset NAME"),
        (["--input", tmp_path / "ok.txt", "--hf_dataset", "x", *out], "give exactly one of --input PATH ... or --hf_dataset NAME"),
        (["--input", tmp_path / "ok.txt"], "the following arguments are required: --out"),
        (["--input", tmp_path / "ok.txt", "--doc_mode", "page", *out], "argument --doc_mode: invalid choice: 'page'"),
        (["--input", tmp_path / "ok.txt", "--bogus", *out], "unrecognized arguments: --bogus"),
    ]  # fmt: skip


def test_every_bad_input_is_one_error_line_and_leaves_nothing(tmp_path, capsys):
    cases = _bad_inputs(tmp_path)
    before = sorted(os.listdir(tmp_path))
    for argv, message in cases:
        rc, out, err = run_cli(capsys, *argv)
        assert rc == 2, (argv, err)
        assert err.startswith(f"error: {message}") and err.count("\n") == 1, (message, err)
        assert out == ""
        assert sorted(os.listdir(tmp_path)) == before, message  # no output, temp or parent folder
        assert os.listdir(tmp_path / "full") == ["x"]


def _cli(*argv, cwd):
    return subprocess.run([sys.executable, "-m", "gpt2_jax.prepare", *map(str, argv)], cwd=cwd,
                          capture_output=True, text=True, timeout=120)  # fmt: skip


def test_cli_subprocess_success_and_error(tmp_path):
    (tmp_path / "a.txt").write_text("Hello world\n\nSecond paragraph.\n")
    ok = _cli("--input", "a.txt", "--out", "data", "--doc_mode", "blank_line", "--val_fraction", 0, "--workers", 2, cwd=tmp_path)
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.startswith("wrote data: train 2 docs, 7 tokens in 1 shard(s); val 0 docs, 0 tokens in 0 shard(s)")
    np.testing.assert_array_equal(split_tokens(tmp_path / "data", "train"), expected_stream(["Hello world", "Second paragraph."]))
    (tmp_path / "b.txt").write_bytes(b"ok\n\xff")
    bad = _cli("--input", "a.txt", "b.txt", "--out", "data2", "--workers", 2, cwd=tmp_path)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert bad.stderr == "error: b.txt:2: not valid UTF-8 (byte 0xff); pass --errors replace to replace undecodable bytes with U+FFFD\n"
    assert sorted(os.listdir(tmp_path)) == ["a.txt", "b.txt", "data"]


def test_one_document_is_split_by_position_and_the_console_says_so(tmp_path, capsys):
    """Before, one file gave an empty val split whatever --val_fraction ("use a larger
    --val_fraction": 0.5 still gave none); now its stream's last fraction is held out."""
    text = " ".join(f"word{i % 97}" for i in range(3000))
    (tmp_path / "one.txt").write_text(text)
    stream = expected_stream([text])
    for fraction in (0.01, 0.5):
        out = tmp_path / f"out{fraction}"
        rc, stdout, err = run_cli(capsys, "--input", tmp_path / "one.txt", "--out", out, "--val_fraction", fraction)
        n_val = round(len(stream) * fraction)
        assert rc == 0 and stdout.startswith(f"wrote {out}: train 1 docs, {len(stream) - n_val:,} tokens in 1 shard(s); "
                                             f"val 0 docs, {n_val:,} tokens in 1 shard(s)")  # fmt: skip
        meta = json.load(open(out / "meta.json"))
        assert meta["val_rule"] == "positions" and meta["val"]["tokens"] == n_val
        np.testing.assert_array_equal(np.concatenate([split_tokens(out, "train"), split_tokens(out, "val")]), stream)
        assert err.splitlines()[0] == (f"note: validation split: the last {fraction * 100:g}% of the token stream "
                                       f"({n_val:,} tokens), by position, because whole documents gave none (1 document(s))")  # fmt: skip
        assert "empty" not in err and "larger --val_fraction" not in err


def test_a_tiny_validation_split_warns(tmp_path, capsys):
    (tmp_path / "one.txt").write_text("a single short document, " * 40)
    rc, _, err = run_cli(capsys, "--input", tmp_path / "one.txt", "--out", tmp_path / "out", "--val_fraction", 0.1)
    val = json.load(open(tmp_path / "out" / "meta.json"))["val"]["tokens"]
    assert rc == 0 and 0 < val < 100
    assert err.splitlines()[-1] == (f"warning: the validation split has only {val:,} tokens to evaluate (under 10,000): "
                                    "its val_loss and val_ppl are rough estimates from so few; more text gives steadier ones")  # fmt: skip


def test_an_empty_example_split_gives_advice_that_can_work(tmp_path, capsys):
    """Prompt/completion examples are never cut, so one example cannot give a val split."""
    for n in (1, 3):
        rows = [{"prompt": f"question {i}?", "completion": f" answer {i}."} for i in range(n)]
        (tmp_path / f"pairs{n}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        rc, _, err = run_cli(capsys, "--input", tmp_path / f"pairs{n}.jsonl", "--out", tmp_path / f"out{n}",
                             "--completion_field", "completion", "--val_fraction", 0.001)  # fmt: skip
        advice = "one example cannot be split; add examples" if n == 1 else \
            "add examples or raise --val_fraction (the chance that each goes to validation)"  # fmt: skip
        assert rc == 0 and err == f"warning: the validation split is empty ({n} example(s) at --val_fraction 0.001); {advice}\n"


def test_an_output_folder_that_cannot_be_made_is_one_error_line(tmp_path, capsys):
    (tmp_path / "a_file").write_text("x")
    (tmp_path / "doc.txt").write_text("some text\n")
    assert prepare.main(["--input", str(tmp_path / "doc.txt"), "--out", str(tmp_path / "a_file" / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and len(err.splitlines()) == 1
    assert not (tmp_path / "a_file").is_dir()
