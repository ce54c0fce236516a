"""Fine-tuning on prompt/completion data: the loss mask at the boundary, prompt truncation, the
loss ignoring prompt targets, no leakage between examples, ROUGE rising with fine-tuning."""

import json
import os

import jax
import numpy as np
import optax
import pytest
from runs import load_config

from gpt2_jax.cli import run
from gpt2_jax.data import dialogues as synthetic
from gpt2_jax.data import loader as data
from gpt2_jax.data import prepare, shards
from gpt2_jax.data.pairs import read_pairs
from gpt2_jax.data.shards import COMPLETION, MASK_MAGIC, PROMPT, START
from gpt2_jax.infer import rouge as summarize
from gpt2_jax.interop.tokenizer import EOT_ID, get_tokenizer
from gpt2_jax.model import GPT2, GPT2Config, init_params
from gpt2_jax.tools import evaluate
from gpt2_jax.train import cli as train
from gpt2_jax.train import steps

TEMPLATE = synthetic.TEMPLATE


def _prepare(tmp_path, rows, *extra, name="out"):
    src = tmp_path / f"{name}.jsonl"
    synthetic.write_jsonl(str(src), rows)
    argv = ["--input", str(src), "--out", str(tmp_path / name), "--completion_field", "summary", "--template",
            TEMPLATE, "--val_fraction", "0", "--workers", "1", *map(str, extra)]  # fmt: skip
    return prepare.main(argv), tmp_path / name


def _shard(folder, split="train"):
    tokens = shards.load_shard(str(folder / f"{split}_000000.bin"))
    return np.asarray(tokens), np.asarray(shards.load_mask(str(folder / f"{split}_000000.mask"), len(tokens)))


def test_each_example_is_eot_prompt_completion_eot_with_the_mask_exact_at_the_boundary(tmp_path, capsys):
    rows = synthetic.synthetic_dialogues(3, seed=5)
    assert _prepare(tmp_path, rows)[0] == 0
    tokens, mask = _shard(tmp_path / "out")
    enc = get_tokenizer()
    want_tokens, want_mask = [], []
    for r in rows:
        p, c = enc.encode(TEMPLATE.format(dialogue=r["dialogue"])), enc.encode(r["summary"])
        want_tokens += [EOT_ID, *p, *c, EOT_ID]
        want_mask += [START] + [PROMPT] * len(p) + [COMPLETION] * (len(c) + 1)
    assert tokens.tolist() == want_tokens and mask.tolist() == want_mask
    with open(tmp_path / "out" / "train_000000.mask", "rb") as f:
        assert np.frombuffer(f.read(12), "<i4").tolist() == [MASK_MAGIC, 1, len(tokens)]
    meta = json.loads((tmp_path / "out" / "meta.json").read_text())
    assert meta["loss_mask"] is True and meta["train"]["documents"] == 3 and "mask" in meta["format"]


def test_long_prompts_lose_their_start_and_too_long_completions_are_refused(tmp_path, capsys):
    long = {"dialogue": "A: " + "blah " * 200, "summary": "short summary."}
    rc, out = _prepare(tmp_path, [long, *synthetic.synthetic_dialogues(2)], "--block_size", 64)
    assert rc == 0 and "1 prompt(s) cut from the left to fit 64 tokens" in capsys.readouterr().out
    tokens, mask = _shard(out)
    first = tokens[: np.flatnonzero(mask == START)[1]]
    assert len(first) == 65 and first[0] == EOT_ID
    assert get_tokenizer().decode(first[-4:].tolist()) == "short summary.<|endoftext|>"  # the completion is whole
    rc, _ = _prepare(tmp_path, [{"dialogue": "hi", "summary": "word " * 100}], "--block_size", 64, name="bad")
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.startswith("error: ") and "bad.jsonl:1: the completion alone (102 tokens with its end token) does not fit in a block of 64" in err and len(err.splitlines()) == 1
    assert not os.path.exists(tmp_path / "bad") and not [f for f in os.listdir(tmp_path) if f.startswith(".bad")]


@pytest.fixture(scope="module")
def dialogues(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dialogues")
    rc, out = _prepare(tmp, synthetic.synthetic_dialogues(1200), "--block_size", 128, "--val_fraction", 0.05)
    assert rc == 0
    return out


def test_batches_weight_completion_targets_only_and_rows_never_mix_examples(dialogues):
    examples = data.open_split(str(dialogues), "train", 128)
    assert isinstance(examples, data.Examples)
    batch = examples.batch(np.arange(4))
    tokens, mask = _shard(dialogues)
    starts = np.flatnonzero(mask == START)
    for row in range(4):
        a, b = starts[row], starts[row + 1]
        n = b - a - 1  # targets of this example
        np.testing.assert_array_equal(batch["inputs"][row, :n], tokens[a : b - 1])
        np.testing.assert_array_equal(batch["weights"][row, :n], (mask[a + 1 : b] == COMPLETION).astype(np.float32))
        assert not batch["weights"][row, n:].any() and (batch["inputs"][row, n:] == EOT_ID).all()
        assert batch["targets"][row, n - 1] == EOT_ID and batch["weights"][row, n - 1] == 1  # the end token counts
        assert (batch["inputs"][row, 1:n] != EOT_ID).all()  # one example per row: no other example's tokens


def test_the_loss_ignores_prompt_targets_and_padding_cannot_reach_the_example(dialogues):
    config = GPT2Config.from_preset("tiny", n_positions=128)
    params = init_params(config, jax.random.key(0))
    state = steps.TrainState.create(apply_fn=GPT2(config).apply, params=params, tx=optax.sgd(0.1),
                                    lr_fn=lambda step: 0.1, dropout_key=np.zeros(2, np.uint32))  # fmt: skip
    batch = data.open_split(str(dialogues), "train", 128).batch(np.arange(4))
    loss = float(steps.eval_step(state, batch)["loss"])
    prompt_pos = np.argwhere(batch["weights"][0] == 0)[1][0]
    changed = {k: v.copy() for k, v in batch.items()}
    changed["targets"][0, prompt_pos] = 123  # a prompt target: weight 0
    assert float(steps.eval_step(state, changed)["loss"]) == loss
    changed["targets"][0, np.argwhere(batch["weights"][0] == 1)[0][0]] = 123  # a completion target
    assert float(steps.eval_step(state, changed)["loss"]) != loss
    m1 = steps.train_step(state, batch)[1]
    m2 = steps.train_step(state, {**batch, "targets": np.where(batch["weights"] == 0, 7, batch["targets"])})[1]
    assert float(m1["loss"]) == float(m2["loss"]) and float(m1["grad_norm"]) == float(m2["grad_norm"])
    # padding comes after each example and attention is causal: the example's logits are its own
    n = int(np.flatnonzero(batch["weights"][1])[-1]) + 1
    alone = GPT2(config).apply({"params": params}, batch["inputs"][1:2, :n])
    padded = GPT2(config).apply({"params": params}, batch["inputs"][1:2])
    np.testing.assert_allclose(padded[0, :n], alone[0], atol=1e-5)


def test_fine_tuning_a_tiny_model_raises_rouge_well_above_its_start(dialogues, tmp_path, capsys):
    c = load_config("finetune_summarize", f"data={dialogues},tiny,steps=100")
    with c.unlocked():
        c.eval_every, c.progress_bar, c.rouge.examples = 100, False, 16
    summary = train.train_and_evaluate(c, str(tmp_path / "run"))
    rows = read_pairs(str(dialogues / "val_pairs.jsonl"))[:16]
    config = GPT2Config.from_preset("tiny", n_positions=128, vocab_pad_multiple=128)
    start, _ = summarize.rouge_eval(config, init_params(config, jax.random.key(0)), rows, 24)
    assert start["rouge1"] < 0.1
    assert summary["rouge1"] > 0.4 and summary["rougeL"] > 0.4  # the template words, names, places, days
    assert summary["val_loss"] < 1.5  # per completion token

    capsys.readouterr()
    out = str(tmp_path / "preds.jsonl")
    assert run(evaluate.main, ["--workdir", str(tmp_path / "run"), "--summaries", str(dialogues / "val_pairs.jsonl"),
                               "--max_examples", "16", "--max_new_tokens", "24", "--summaries_out", out]) == 0  # fmt: skip
    result = json.loads(capsys.readouterr().out)
    assert result["rouge1"] == pytest.approx(summary["rouge1"]) and result["summaries"] == 16
    preds = [json.loads(line) for line in open(out)]
    assert len(preds) == 16 and {"prompt", "reference", "prediction"} == set(preds[0])


def test_a_local_hf_dataset_prepares_like_its_jsonl(tmp_path, capsys):
    import datasets

    rows = synthetic.synthetic_dialogues(4, seed=2)
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "ds"))
    argv = ["--hf_dataset", str(tmp_path / "ds"), "--out", str(tmp_path / "hf"), "--completion_field", "summary",
            "--template", TEMPLATE, "--val_fraction", "0"]  # fmt: skip
    assert prepare.main(argv) == 0
    assert _prepare(tmp_path, rows)[0] == 0
    for a, b in zip(_shard(tmp_path / "hf"), _shard(tmp_path / "out")):
        np.testing.assert_array_equal(a, b)


def test_a_literal_endoftext_in_a_row_is_text_not_the_end_token(tmp_path, capsys):
    # Pretraining encodes text as text (encode_ordinary); so must prompt/completion examples:
    # only the leading and closing <|endoftext|> of each example are the token 50256.
    rows = [{"prompt": "Ann: the file ends with <|endoftext|>, see?\nTL;DR:", "completion": " it ends <|endoftext|> there"},
            {"prompt": "<|endoftext|>", "completion": "<|endoftext|>"}]  # fmt: skip
    src = tmp_path / "rows.jsonl"
    synthetic.write_jsonl(str(src), rows)
    argv = ["--input", str(src), "--out", str(tmp_path / "out"), "--completion_field", "completion",
            "--val_fraction", "0", "--workers", "1"]  # fmt: skip
    assert prepare.main(argv) == 0
    tokens, mask = _shard(tmp_path / "out")
    starts = np.flatnonzero(mask == START)
    assert len(starts) == 2
    enc = get_tokenizer()
    for row, a, b in zip(rows, starts, [*starts[1:], len(tokens)]):
        example, n_prompt = tokens[a:b], int((mask[a:b] == PROMPT).sum())
        assert (example == EOT_ID).sum() == 2 and example[0] == example[-1] == EOT_ID
        assert enc.decode(example[1 : 1 + n_prompt].tolist()) == row["prompt"]
        assert enc.decode(example[1 + n_prompt : -1].tolist()) == row["completion"]
