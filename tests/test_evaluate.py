"""The evaluate CLI against torch references: shard loss/perplexity and HellaSwag scoring."""

import json
import math

import numpy as np
import pytest
import torch
from hf_reference import hf_model, save_folder

from gpt2_jax.cli import run
from gpt2_jax.interop.tokenizer import get_tokenizer
from gpt2_jax.tools import evaluate


def write_shard(path, tokens):
    header = np.zeros(256, np.int32)
    header[:3] = [20240520, 1, len(tokens)]
    with open(path, "wb") as f:
        f.write(header.tobytes())
        f.write(np.asarray(tokens, np.uint16).tobytes())


@pytest.fixture(scope="module")
def reference():
    return hf_model(n_positions=32, scale=0.3)


@pytest.fixture(scope="module")
def hf_dir(reference, tmp_path_factory):
    return save_folder(reference, tmp_path_factory.mktemp("hf") / "model")


def _torch_loss(model, windows):
    with torch.no_grad():
        logits = model(torch.as_tensor(windows[:, :-1])).logits
        nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                                torch.as_tensor(windows[:, 1:]).reshape(-1), reduction="sum")
    return nll.item(), windows[:, 1:].size


def test_val_loss_matches_torch_over_every_window(reference, hf_dir, tmp_path, capsys):
    rng = np.random.RandomState(0)
    shards = [rng.randint(0, 50257, 16 * 5 + 1), rng.randint(0, 50257, 16 * 3 + 7)]  # 5 + 3 windows
    data = tmp_path / "data"
    data.mkdir()
    for i, tokens in enumerate(shards):
        write_shard(data / f"val_{i:06d}.bin", tokens)
    assert run(evaluate.main, ["--hf", hf_dir, "--data", str(data), "--block_size", "16", "--batch_size", "3"]) == 0
    result = json.loads(capsys.readouterr().out)
    sums = [_torch_loss(reference, np.stack([t[i * 16 : i * 16 + 17] for i in range(len(t) // 16)]))
            for t in shards]  # windows of 17 tokens at stride 16, within each shard
    expected = sum(s for s, _ in sums) / sum(n for _, n in sums)
    assert result["tokens"] == 8 * 16
    assert result["loss"] == pytest.approx(expected, rel=1e-5)
    assert result["ppl"] == pytest.approx(math.exp(expected), rel=1e-5)
    assert result["model"] == f"hf:{hf_dir}" and result["step"] is None


def test_a_checkpoint_trained_with_cudnn_attention_evaluates_on_this_cpu(hf_dir, tmp_path, capsys):
    # The checkpoint records the training machine's kernel (cuDNN, bfloat16); evaluating it here
    # picks this machine's kernel instead, and gives the HF folder's loss on the same weights.
    import jax
    import optax

    from gpt2_jax.interop.checkpoint import Checkpoints
    from gpt2_jax.interop.hf import load_hf
    from gpt2_jax.train.steps import TrainState

    config, params = load_hf(hf_dir)
    state = TrainState.create(apply_fn=None, params=jax.device_put(params), tx=optax.adamw(1e-3),
                              dropout_key=np.zeros(2, np.uint32))  # fmt: skip
    ckpts = Checkpoints(str(tmp_path / "run"))
    ckpts.save(7, state, {"next_batch": 7}, {}, config.replace(attention="cudnn", dtype="bfloat16"))
    ckpts.close()
    data = tmp_path / "data"
    data.mkdir()
    write_shard(data / "val_000000.bin", np.random.RandomState(1).randint(0, 50257, 16 * 4 + 1))
    results = []
    for source in (["--workdir", str(tmp_path / "run")], ["--hf", hf_dir]):
        assert run(evaluate.main, [*source, "--data", str(data), "--block_size", "16"]) == 0
        results.append(json.loads(capsys.readouterr().out))
    assert results[0]["step"] == 7 and results[0]["tokens"] == results[1]["tokens"] == 4 * 16
    assert results[0]["loss"] == pytest.approx(results[1]["loss"], rel=1e-6)


def _hellaswag_file(path, n=6):
    rng = np.random.RandomState(1)
    words = ["the cat", "a dog", "runs away", "jumps over the fence", "sits", "eats a very large sandwich"]
    with open(path, "w") as f:
        for i in range(n):
            endings = [" ".join(rng.choice(words, rng.randint(1, 4))) for _ in range(4)]
            f.write(json.dumps({"ind": i, "ctx": f"Example {i}: someone", "endings": endings, "label": i % 4}) + "\n")
    return [json.loads(line) for line in open(path)]


def _torch_hellaswag(model, examples):
    enc = get_tokenizer()
    correct = correct_norm = 0
    for ex in examples:
        sums, means = [], []
        for ending in ex["endings"]:
            ctx, end = enc.encode(ex["ctx"]), enc.encode(" " + ending)
            tokens = torch.tensor([ctx + end])
            with torch.no_grad():
                logits = model(tokens[:, :-1]).logits[0]
            nll = torch.nn.functional.cross_entropy(logits, tokens[0, 1:], reduction="none")[-len(end):]
            sums.append(nll.sum().item())
            means.append(nll.mean().item())
        correct += int(np.argmin(sums) == ex["label"])
        correct_norm += int(np.argmin(means) == ex["label"])
    return correct / len(examples), correct_norm / len(examples)


def test_hellaswag_scores_like_llm_c(reference, hf_dir, tmp_path, capsys):
    examples = _hellaswag_file(tmp_path / "hs.jsonl")
    assert run(evaluate.main, ["--hf", hf_dir, "--hellaswag", str(tmp_path / "hs.jsonl")]) == 0
    result = json.loads(capsys.readouterr().out)
    acc, acc_norm = _torch_hellaswag(reference, examples)
    assert result["hellaswag_examples"] == 6
    assert result["hellaswag_acc"] == pytest.approx(acc)
    assert result["hellaswag_acc_norm"] == pytest.approx(acc_norm)
    assert "loss" not in result


@pytest.mark.parametrize("make, argv_tail, message", [
    (None, ["--data", "DATA"], "no val shards"),
    (None, [], "nothing to evaluate"),
    ("bad_json", ["--hellaswag", "HS"], "hs.jsonl:2 is not JSON"),
    ("no_field", ["--hellaswag", "HS"], "hs.jsonl:1 lacks ctx"),
    (None, ["--hellaswag", "HS"], "does not exist"),
    (None, ["--data", "DATA", "--block_size", "33"], "--block_size must be between 1"),
])
def test_user_errors(make, argv_tail, message, hf_dir, tmp_path, capsys):
    (tmp_path / "data").mkdir()
    if make == "bad_json":
        (tmp_path / "hs.jsonl").write_text('{"ctx": "a", "endings": ["1","2","3","4"], "label": 0}\n{oops\n')
    elif make == "no_field":
        (tmp_path / "hs.jsonl").write_text('{"context": "a"}\n')
    if "--block_size" in argv_tail:
        write_shard(tmp_path / "data" / "val_000000.bin", np.arange(100))
    tail = [str(tmp_path / "data") if a == "DATA" else str(tmp_path / "hs.jsonl") if a == "HS" else a for a in argv_tail]
    assert run(evaluate.main, ["--hf", hf_dir, *tail]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and message in err, err


def test_a_summaries_line_that_is_not_json_is_one_error_line_naming_it(hf_dir, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "Hi", "completion": "there"}\n{oops\n')
    assert run(evaluate.main, ["--hf", hf_dir, "--summaries", str(bad)]) == 2
    captured = capsys.readouterr()
    assert captured.err.startswith(f"error: {bad}:2: not valid JSON") and captured.err.count("\n") == 1, captured.err
    assert captured.out == ""
