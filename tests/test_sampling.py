"""KV-cache sampling: greedy equals the uncached argmax loop; top-k / top-p restrict the support."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from compile_count import compilations

from gpt2_jax.infer.sampling import Sampler, SamplingConfig, sample_next
from gpt2_jax.interop.tokenizer import EOT_ID
from gpt2_jax.model import GPT2, GPT2Config, init_params


def _model(seed=0, scale=4.0):
    config = GPT2Config.from_preset("tiny", n_positions=48)
    params = init_params(config, jax.random.key(seed))
    # larger weights than GPT-2's init, so greedy continuations vary instead of repeating one token
    params = jax.tree_util.tree_map(lambda x: x * scale if x.ndim == 2 else x, params)
    return config, params


def _prompt(batch=2, length=5, seed=0):
    return np.random.RandomState(seed).randint(0, 50257, (batch, length)).astype(np.int32)


def test_greedy_matches_the_uncached_argmax_loop():
    config, params = _model()
    prompt = _prompt()
    got = Sampler(config, params, SamplingConfig(temperature=0)).generate(prompt, 12, jax.random.key(0))
    # uncached: rerun the whole sequence each step (fixed length, so it compiles once; the
    # model is causal, so the zeros after position t do not change logits at t)
    forward = jax.jit(lambda seq: GPT2(config).apply({"params": params}, seq))
    seq = np.zeros((2, 17), np.int32)
    seq[:, :5] = prompt
    for t in range(5, 17):
        seq[:, t] = np.asarray(forward(jnp.asarray(seq))[:, t - 1].argmax(-1))
    assert got == seq[:, 5:].tolist()
    assert len(set(got[0])) > 1


def test_greedy_equals_transformers_generate_token_for_token(tmp_path):
    import torch
    from hf_reference import hf_model, save_folder

    from gpt2_jax.interop.hf import load_hf

    reference = hf_model(n_positions=64, scale=0.5)
    config, params = load_hf(save_folder(reference, tmp_path / "hf"))
    prompt = _prompt(batch=2, length=8, seed=3)
    ours = Sampler(config, params, SamplingConfig(temperature=0)).generate(prompt, 48, jax.random.key(0),
                                                                         stop_at_eot=False)  # fmt: skip
    with torch.no_grad():
        theirs = reference.generate(torch.as_tensor(prompt, dtype=torch.long), max_new_tokens=48, min_new_tokens=48,
                                    do_sample=False, pad_token_id=EOT_ID)  # fmt: skip
    assert ours == theirs[:, 8:].tolist()
    assert len(set(ours[0])) > 10  # a varied continuation, not one repeated token


def test_top_k_1_and_tiny_top_p_are_greedy():
    config, params = _model()
    prompt = _prompt()
    greedy = Sampler(config, params, SamplingConfig(temperature=0)).generate(prompt, 8, jax.random.key(0))
    for sampling in (SamplingConfig(temperature=1.0, top_k=1), SamplingConfig(temperature=1.0, top_p=1e-6)):
        assert Sampler(config, params, sampling).generate(prompt, 8, jax.random.key(3)) == greedy


def test_same_seed_same_samples_other_seed_other_samples():
    config, params = _model()
    sampler = Sampler(config, params, SamplingConfig(temperature=1.0))
    a = sampler.generate(_prompt(), 10, jax.random.key(1))
    assert a == sampler.generate(_prompt(), 10, jax.random.key(1))
    assert a != sampler.generate(_prompt(), 10, jax.random.key(2))


def test_top_k_and_top_p_restrict_the_support():
    logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]] * 2000))
    keys = jax.random.key(0)
    top2 = np.asarray(sample_next(logits, keys, SamplingConfig(top_k=2)))
    assert set(top2.tolist()) == {0, 1}
    top_p = np.asarray(sample_next(logits, keys, SamplingConfig(top_p=0.7)))  # 0.5 + 0.3 reach 0.7
    assert set(top_p.tolist()) == {0, 1}
    full = np.asarray(sample_next(logits, keys, SamplingConfig()))
    assert set(full.tolist()) == {0, 1, 2, 3}
    np.testing.assert_allclose(np.bincount(full, minlength=4) / 2000, [0.5, 0.3, 0.15, 0.05], atol=0.04)


def _eot_params(config, params):
    """Make <|endoftext|> the argmax everywhere: ln_f outputs a constant vector e_0, and only
    EOT's embedding points along it."""
    params = jax.tree_util.tree_map(lambda x: x, params)
    params["ln_f"] = {"scale": jnp.zeros(config.n_embd), "bias": jnp.zeros(config.n_embd).at[0].set(1.0)}
    params["wte"] = params["wte"].at[:, 0].set(0.0).at[EOT_ID, 0].set(100.0)
    return params


def test_generation_stops_at_end_of_text_unless_asked_to_continue():
    config, params = _model()
    params = _eot_params(config, params)
    sampler = Sampler(config, params, SamplingConfig(temperature=0))
    assert sampler.generate(_prompt(), 10, jax.random.key(0)) == [[EOT_ID], [EOT_ID]]
    assert sampler.generate(_prompt(), 4, jax.random.key(0), stop_at_eot=False) == [[EOT_ID] * 4] * 2


def test_lengths_beyond_the_context_are_refused():
    config, params = _model()
    sampler = Sampler(config, params)
    with pytest.raises(ValueError, match="between 1 and 47"):
        sampler.generate(_prompt(length=2), 48, jax.random.key(0))
    with pytest.raises(ValueError, match="exceed the 48-token context"):
        sampler.generate(_prompt(length=40), 9, jax.random.key(0))


def test_a_new_sampler_other_settings_or_other_params_of_the_same_shapes_compile_nothing():
    config, params = _model()
    prompt = _prompt(batch=3)  # a batch size used only here: the first sampler compiles
    sampling = SamplingConfig(temperature=0.7, top_k=5)
    with compilations() as compiled:
        first = Sampler(config, params, sampling).generate(prompt, 6, jax.random.key(0))
    # the count can see compilations: the steps' names, as the generate test expects them
    assert {"jit(_prefill)", "jit(_decode)"} <= set(compiled)
    other = jax.tree_util.tree_map(lambda x: -x, params)  # other values, same shapes (params are traced)
    with compilations() as compiled:
        again = Sampler(config, params, sampling).generate(prompt, 6, jax.random.key(0))
        Sampler(config, other, sampling).generate(prompt, 6, jax.random.key(0))
        # the settings are arrays on the device, not compile-time constants
        for other_sampling in (SamplingConfig(temperature=0.0), SamplingConfig(temperature=1.3, top_p=0.5)):
            Sampler(config, params, other_sampling).generate(prompt, 6, jax.random.key(0))
    assert compiled == []
    assert again == first


def test_a_second_rouge_eval_compiles_nothing():
    """rouge_eval runs at every evaluation during training, with new params of the same shapes."""
    pytest.importorskip("rouge_score")
    from gpt2_jax.infer.rouge import rouge_eval

    config, params = _model()
    rows = [{"prompt": "Anna: Hi Ben! Lunch on Monday?", "completion": " Anna asks Ben to lunch."},
            {"prompt": "Ben: Sure.", "completion": " Ben agrees."}]  # fmt: skip
    rouge_eval(config, params, rows, max_new_tokens=5)
    trained = jax.tree_util.tree_map(lambda x: 0.9 * x, params)
    with compilations() as compiled:
        rouge_eval(config, trained, rows, max_new_tokens=5)
    assert compiled == []


@pytest.mark.parametrize("bad", [dict(temperature=-1), dict(top_k=-2), dict(top_p=0.0), dict(top_p=1.5)])
def test_bad_sampling_settings_are_refused(bad):
    with pytest.raises(ValueError):
        SamplingConfig(**bad)


# --- the engine: rows of different lengths and settings in one batch, joining between chunks --


def _run(batch, requests):
    """Admit `requests` as rows free up (first come first served), one decode step per chunk,
    until all have finished."""
    waiting = list(requests)
    while waiting or batch.active:
        room = batch.max_batch - len(batch.active)
        if waiting and room:
            batch.admit(waiting[:room])
            waiting = waiting[room:]
        batch.step()
    return [r.tokens for r in requests]


def test_rows_that_join_between_chunks_generate_what_each_generates_alone():
    from gpt2_jax.infer.engine import Batch, Request, request_key

    config, params = _model()
    lengths, max_tokens = [2, 5, 9, 3, 12, 1], [10, 6, 14, 8, 5, 9]
    prompts = [_prompt(1, n, seed=n)[0].tolist() for n in lengths]
    sampled = dict(temperature=0.8, top_k=20, top_p=0.9)

    def requests(keys=(1, 2)):
        out = [Request(p, m) for p, m in zip(prompts, max_tokens)]
        out[1] = Request(prompts[1], max_tokens[1], key=request_key(keys[0]), **sampled)
        out[4] = Request(prompts[4], max_tokens[4], key=request_key(keys[1]), temperature=1.5)
        return out

    alone = [_run(Batch(config, params, 1), [r])[0] for r in requests()]
    greedy = Sampler(config, params, SamplingConfig(temperature=0))
    for i in (0, 2, 3, 5):
        assert alone[i] == greedy.generate(np.array([prompts[i]]), max_tokens[i], jax.random.key(0))[0]
    batch = Batch(config, params, max_batch=4, chunk_seconds=0.0)  # one step per chunk: rows join and leave
    batch.step_seconds = 1.0  # mid-flight (the first chunk too)
    assert _run(batch, requests()) == alone  # 4 rows at most: the last two wait, then join
    assert batch.peak == 4 and dict(batch.finished) == {"length": 6}
    # the same buckets again, other tokens and seeds: nothing compiles
    prompts[:] = [_prompt(1, n, seed=n + 100)[0].tolist() for n in lengths]
    batch = Batch(config, params, max_batch=4, chunk_seconds=0.0)
    batch.step_seconds = 1.0
    with compilations() as compiled:
        again = _run(batch, requests(keys=(3, 4)))
    assert compiled == [] and again != alone


def test_a_sampler_batch_keeps_one_shape_while_its_rows_finish_at_different_times():
    """generate --num_samples and ROUGE run fixed batches (exact=True): rows that finish early
    idle in place, so the batch decodes in one shape to the end instead of one per row count."""
    from gpt2_jax.infer.engine import Batch, Request

    config, params = _model()
    batch = Batch(config, params, max_batch=4, exact=True, chunk_seconds=0.0)
    batch.step_seconds = 1.0  # one step per chunk, so rows end in different chunks
    requests = [Request(_prompt(1, 3, seed=i)[0].tolist(), m) for i, m in enumerate((2, 4, 6, 8))]
    batch.admit(requests)
    while batch.active:
        batch.step()
    assert [len(r.tokens) for r in requests] == [2, 4, 6, 8]
    assert sorted(s for s in batch.shapes if s.startswith("decode")) == [f"decode 4x{batch.length}"]
