"""HellaSwag scoring on a model whose answers are known by hand: a unigram GPT-2.

With ln_f's scale at 0, every position's final hidden state is ln_f's bias b, so the logits are
wte @ b whatever the context: each token costs -log p(token) for a fixed p that the test sets.
Then the sum (acc) and length-normalised (acc_norm) choices can be worked out on paper.
"""

import json
import math

import jax
import numpy as np
import pytest

from gpt2_jax.interop.load import LoadedModel
from gpt2_jax.interop.tokenizer import get_tokenizer
from gpt2_jax.model import GPT2Config, init_params
from gpt2_jax.tools.evaluate import hellaswag, read_hellaswag

SCORES = {" red": 4.0, " blue": 2.0}  # log-odds over the other 50,255 tokens (score 0)


@pytest.fixture(scope="module")
def unigram():
    config = GPT2Config.from_preset("tiny", n_positions=32)
    params = jax.tree_util.tree_map(np.array, init_params(config, jax.random.key(0)))
    enc = get_tokenizer()
    params["ln_f"]["scale"][:] = 0.0
    params["ln_f"]["bias"][:] = 0.0
    params["ln_f"]["bias"][0] = 1.0
    params["wte"][:, 0] = 0.0
    for word, score in SCORES.items():
        (token,) = enc.encode(word)
        params["wte"][token, 0] = score
    return LoadedModel("unigram", config, params, None)


def _cost(word):
    """-log p(word's token) under the unigram model, by hand."""
    log_z = math.log(50257 - len(SCORES) + sum(math.exp(s) for s in SCORES.values()))
    return log_z - SCORES.get(word, 0.0)


def _write(path, examples):
    with open(path, "w") as f:
        for i, (endings, label) in enumerate(examples):
            f.write(json.dumps({"ind": i, "ctx": f"Example {i}: the colour is", "endings": endings, "label": label}) + "\n")
    return read_hellaswag(str(path))


def test_sum_and_length_normalised_choices_are_the_hand_computed_ones(unigram, tmp_path):
    # "red red red" costs 3 x (log Z - 4) ~ 20.4 in total, 6.8 per token; "blue" 8.8 for its one token.
    assert 3 * _cost(" red") > _cost(" blue") and _cost(" red") < _cost(" blue") < _cost(" cat")
    endings = ["red red red", "blue", "cat", "dog"]
    examples = _write(tmp_path / "hs.jsonl", [
        (["dog", "red", "cat", "blue"], 1),  # both pick "red"
        (endings, 0),  # per token "red red red" wins: acc_norm right, acc wrong (the sum picks "blue")
        (endings, 1),  # the sum picks "blue": acc right, acc_norm wrong
        (["cat", "dog", "blue", "cat dog"], 2),  # both pick "blue"
        (["cat dog", "dog", "cat", "red"], 0),  # both pick "red": both wrong
        (["red red red", "dog", "blue", "cat"], 0),  # acc_norm right, acc wrong
    ])  # fmt: skip
    for ex in examples:
        assert all(len(get_tokenizer().encode(" " + e)) == len(e.split()) for e in ex["endings"])
    result = hellaswag(unigram, examples, per_batch=4)  # 2 batches, the last one padded
    assert result == {"hellaswag_acc": 3 / 6, "hellaswag_acc_norm": 4 / 6, "hellaswag_examples": 6}


def test_the_context_does_not_change_a_unigram_models_choice(unigram, tmp_path):
    long_ctx = _write(tmp_path / "hs.jsonl", [(["cat", "red", "dog", "blue"], 1)])
    long_ctx[0]["ctx"] = "A much longer context about cats and dogs and many other things, " * 3
    assert hellaswag(unigram, long_ctx)["hellaswag_acc"] == 1.0
