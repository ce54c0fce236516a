"""The generate CLI: HF folders and workdir checkpoints as sources, side by side, and its errors."""

import subprocess
import sys

import jax
import numpy as np
import optax
import pytest
from compile_count import compilations
from hf_reference import hf_model, save_folder

from gpt2_jax.cli import run
from gpt2_jax.infer import generate
from gpt2_jax.infer.sampling import Sampler, SamplingConfig
from gpt2_jax.interop.checkpoint import Checkpoints
from gpt2_jax.interop.hf import load_hf
from gpt2_jax.interop.tokenizer import get_tokenizer
from gpt2_jax.train.steps import TrainState


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    return save_folder(hf_model(n_positions=64, scale=0.5), tmp_path_factory.mktemp("hf") / "model")


@pytest.fixture(scope="module")
def workdir(hf_dir, tmp_path_factory):
    """A workdir whose checkpoint holds the HF model's weights, as the trainer saves them."""
    config, params = load_hf(hf_dir)
    state = TrainState.create(apply_fn=None, params=jax.device_put(params), tx=optax.adamw(1e-3),
                              dropout_key=np.zeros(2, np.uint32))
    path = tmp_path_factory.mktemp("run")
    ckpts = Checkpoints(str(path))
    ckpts.save(12, state, {"next_batch": 12}, {}, config)
    ckpts.close()
    return str(path)


def _greedy(hf_dir, prompt, n):
    config, params = load_hf(hf_dir)
    tokens = np.asarray([get_tokenizer().encode(prompt)], np.int32)
    new = Sampler(config, params, SamplingConfig(temperature=0)).generate(tokens, n, jax.random.key(0))[0]
    return prompt + get_tokenizer().decode(new)


def test_greedy_completion_from_an_hf_folder(hf_dir, capsys):
    assert run(generate.main, ["--hf", hf_dir, "--prompt", "Hello there", "--temperature", "0",
                               "--max_new_tokens", "8"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == f"=== hf:{hf_dir} ==="
    assert out[1] == _greedy(hf_dir, "Hello there", 8)


def test_workdir_and_hf_side_by_side_agree_on_the_same_weights(hf_dir, workdir, capsys):
    argv = ["--workdir", workdir, "--hf", hf_dir, "--prompt", "One", "--prompt", "Two", "--max_new_tokens", "6",
            "--num_samples", "2", "--seed", "3"]
    assert run(generate.main, argv) == 0
    out = capsys.readouterr().out
    blocks = [b for b in out.split("=== ") if b.strip()]
    assert [b.splitlines()[0] for b in blocks] == [
        f"{workdir}@12 | prompt: 'One' ===", f"hf:{hf_dir} | prompt: 'One' ===",
        f"{workdir}@12 | prompt: 'Two' ===", f"hf:{hf_dir} | prompt: 'Two' ===",
    ]
    # same weights, same seed: the checkpoint and the HF folder give the same samples
    assert blocks[0].strip().splitlines()[1:] == blocks[1].strip().splitlines()[1:]
    assert blocks[0].count("--- sample") == 2


def test_one_sampler_per_model_and_one_compilation_for_prompts_of_one_shape(hf_dir, workdir, monkeypatch, capsys):
    made = []

    def counting_sampler(*args, **kwargs):
        made.append(args[0])
        return Sampler(*args, **kwargs)

    monkeypatch.setattr(generate, "Sampler", counting_sampler)
    prompts = ["One", "Two", "Three"]
    assert [len(get_tokenizer().encode(p)) for p in prompts] == [1, 1, 1]  # one prefill shape
    # a batch size (3 samples) no other test uses, so this run compiles its steps once, here
    argv = ["--hf", hf_dir, "--max_new_tokens", "5", "--temperature", "0.9", "--top_k", "17", "--num_samples", "3"]
    with compilations() as compiled:
        assert run(generate.main, [*argv, *(a for p in prompts for a in ("--prompt", p))]) == 0
    assert [n for n in compiled if "prefill" in n or "decode" in n] == ["jit(_prefill)", "jit(_decode)"]
    assert len(made) == 1
    assert capsys.readouterr().out.count("--- sample 3 ---") == 3
    made.clear()
    assert run(generate.main, ["--hf", hf_dir, "--workdir", workdir, "--prompt", "a", "--prompt", "b",
                               "--max_new_tokens", "2"]) == 0  # fmt: skip
    assert len(made) == 2  # one per model, shared by both prompts


def test_long_prompts_keep_their_end_with_a_warning():
    with pytest.warns(UserWarning, match="keeps its last 54"):
        tokens = generate.encode_prompt("word " * 100, context=64, max_new_tokens=10)
    assert tokens == get_tokenizer().encode("word " * 100)[-54:]
    assert generate.encode_prompt("", 64, 10) == [50256]


@pytest.mark.parametrize("argv, message", [
    (["--prompt", "x"], "give a model"),
    (["--hf", "/nonexistent", "--prompt", "x"], "does not exist"),
    (["--hf", "HF", "--prompt", "x", "--max_new_tokens", "64"], "between 1 and 63"),
    (["--hf", "HF", "--prompt", "x", "--step", "3"], "--step applies to --workdir"),
    (["--hf", "HF", "--prompt", "x", "--top_p", "0"], "top_p"),
    (["--hf", "HF"], "at least one --prompt"),
    (["--workdir", "WORK", "--prompt", "x", "--step", "5"], "no checkpoint for step 5; it has 12"),
    (["--hf", "HF", "--prompt", "x", "--nope"], "unrecognized arguments"),
])
def test_user_errors_are_one_line(argv, message, hf_dir, workdir, capsys):
    argv = [hf_dir if a == "HF" else workdir if a == "WORK" else a for a in argv]
    assert run(generate.main, argv) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.count("\n") == 1 and captured.err.startswith("error: ") and message in captured.err


def test_cli_entry_point(hf_dir):
    out = subprocess.run([sys.executable, "-m", "gpt2_jax.generate", "--hf", hf_dir, "--prompt", "Hi",
                          "--max_new_tokens", "3", "--temperature", "0"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines()[1] == _greedy(hf_dir, "Hi", 3)
