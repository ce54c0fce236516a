"""The evaluation hook: at each evaluation step, one eval row from small evaluators (val and train loss, ROUGE, a sample).

Each evaluator is `evaluator(state) -> (row part, console text)`; Evaluate joins their parts
into one row of metrics.jsonl and one console message.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import numpy as np

from gpt2_jax.data import loader
from gpt2_jax.infer.sampling import Sampler, SamplingConfig
from gpt2_jax.interop.tokenizer import get_tokenizer
from gpt2_jax.parallel import sharding
from gpt2_jax.train.metrics import MetricsWriter
from gpt2_jax.train.trainer import Trainer, to_host


def _mean_loss(trainer: Trainer, state, it, n: int) -> tuple[float, int]:
    """(token-weighted mean loss, tokens) of the eval step over the next `n` batches of `it`."""
    t = trainer
    results = to_host([t.eval_fn(state, loader.to_global_batch(next(it), t.eval_batch_sharding)) for _ in range(n)])
    tokens = sum(float(r["tokens"]) for r in results)
    return sum(float(r["loss"]) * float(r["tokens"]) for r in results) / max(tokens, 1.0), int(tokens)


def _rows(trainer: Trainer) -> tuple[int, int]:
    """(process index, count) for this process's rows of every eval batch."""
    p = trainer.p
    return sharding.process_batch_slice(trainer.eval_batch_sharding, (p.eval_batch_size, p.block_size))


class ValidationLoss:
    """Loss over the first `batches` batches of the val split (all of it if <= 0)."""

    def __init__(self, trainer: Trainer, batches: int):
        self.trainer, self.batches = trainer, batches

    def __call__(self, state) -> tuple[dict, str]:
        t, p = self.trainer, self.trainer.p
        index, count = _rows(t)
        it = loader.make_eval_iterator(p.data_path, block_size=p.block_size, global_batch_size=p.eval_batch_size,
                                       process_index=index, process_count=count, vocab_size=p.model.vocab_size)  # fmt: skip
        n = it.num_batches if self.batches <= 0 else min(self.batches, it.num_batches)
        loss, tokens = _mean_loss(t, state, it, n)
        row = {"val_loss": loss, "val_ppl": math.exp(min(loss, 700.0)), "val_tokens": tokens}
        return row, f"val_loss {loss:.4f}, val_ppl {row['val_ppl']:.2f}"


class TrainLoss:
    """Loss (eval step: no dropout) over `batches` batches of the train split, as nanoGPT reports
    beside the validation loss: the same shuffled batches at every evaluation, read by an iterator
    of its own, so the training iterator's position is untouched."""

    def __init__(self, trainer: Trainer, batches: int):
        self.trainer, self.batches = trainer, batches

    def __call__(self, state) -> tuple[dict, str]:
        t, p = self.trainer, self.trainer.p
        index, count = _rows(t)
        # Another seed than training's: not just the first batches the run trained on.
        it = loader.make_train_iterator(p.data_path, block_size=p.block_size, global_batch_size=p.eval_batch_size,
                                        seed=t.c.seed + 1, process_index=index, process_count=count,
                                        vocab_size=p.model.vocab_size)  # fmt: skip
        loss, tokens = _mean_loss(t, state, it, self.batches)
        return {"train_loss": loss, "train_tokens": tokens}, f"train_loss {loss:.4f}"


class Rouge:
    """ROUGE-1/2/L F of greedy completions of held-out prompt/completion rows (rouge.path)."""

    def __init__(self, model_config, rows: list[dict], max_new_tokens: int):
        self.model_config, self.rows, self.max_new_tokens = model_config, rows, max_new_tokens

    def __call__(self, state) -> tuple[dict, str]:
        from gpt2_jax.infer.rouge import rouge_eval

        with nn.logical_axis_rules(()):
            scores, _ = rouge_eval(self.model_config, state.params, self.rows, self.max_new_tokens)
        row = {**{k: scores[k] for k in ("rouge1", "rouge2", "rougeL")}, "rouge_mean_len": scores["mean_len"]}
        return row, ", ".join(f"{k} {row[k]:.3f}" for k in ("rouge1", "rouge2", "rougeL"))


class Sample:
    """The fixed prompt continued by the current parameters, with the same random key every
    time, so successive samples differ only by what training changed."""

    def __init__(self, model_config, prompt: tuple, length: int, temperature: float, top_k: int, seed: int):
        self.sampler = Sampler(model_config, None, SamplingConfig(temperature, top_k))
        self.prompt, self.length, self.seed = prompt, length, seed

    def __call__(self, state) -> tuple[dict, str]:
        self.sampler.params = state.params
        with nn.logical_axis_rules(()):  # one sequence: nothing to split over the batch axes
            rows = self.sampler.generate(np.array([self.prompt]), self.length, jax.random.key(self.seed),
                                         stop_at_eot=False)  # fmt: skip
        text = get_tokenizer().decode(list(self.prompt[1:]) + rows[0])
        return {"sample": text}, "\n--- sample ---\n" + text + "\n--------------"


class Evaluate:
    """A state hook: runs the evaluators, writes their row ('eval') and message, and restarts the
    throughput clock so evaluation time is not counted as training time."""

    def __init__(self, evaluators: list, writer: MetricsWriter, summary: dict, restart_clock):
        self.evaluators, self.writer, self.summary, self.restart_clock = evaluators, writer, summary, restart_clock

    def __call__(self, step: int, state) -> None:
        row, message = {}, f"step {step}:"
        for evaluator in self.evaluators:
            part, text = evaluator(state)
            row.update(part)
            message += text if text.startswith("\n") else (" " if message.endswith(":") else ", ") + text
        if "sample" in row:
            self.writer.text(step, "sample", row["sample"])
        self.writer.write(step, row, "eval")
        self.writer.print(message)
        self.summary.update(row)
        self.restart_clock(step)


def evaluators(trainer: Trainer) -> list:
    """The evaluators this run's config asks for (samples and ROUGE on one process only:
    TODO(multi-host) gather sampled tokens across processes)."""
    c, p = trainer.c, trainer.p
    n_train = c.eval_batches
    if n_train <= 0:  # all of val: as many train batches as val has, not the whole train split
        n_train = math.ceil(loader.num_windows(p.data_path, p.block_size, "val") / p.eval_batch_size)
    out = [ValidationLoss(trainer, c.eval_batches), TrainLoss(trainer, n_train)]
    single = jax.process_count() == 1
    if c.rouge.path and single:
        from gpt2_jax.data.pairs import read_pairs

        out.append(Rouge(p.model, read_pairs(c.rouge.path)[: c.rouge.examples], c.rouge.max_new_tokens))
    if p.prompt and single:
        out.append(Sample(p.model, p.prompt, c.sample.length, c.sample.temperature, c.sample.top_k, c.seed))
    return out
