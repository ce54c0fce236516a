"""The decoding engine: requests decode together in one batch on the device; new ones join between chunks.

    engine = Engine(config, params, max_batch=16).start()
    engine.submit([Request(prompt_tokens, max_tokens=32, on_tokens=callback), ...])  # any thread
    ...
    engine.close()  # finishes what was submitted, then stops

A `Batch` is the synchronous core (the `Sampler` of sampling.py runs one to completion); the
`Engine` runs one in a thread, admitting waiting requests at every chunk boundary (continuous
batching). Shapes come from buckets (decode.py): the batch has a power-of-two number of rows and
a cache of a multiple of 128 positions, prompts are prefilled at a power of two (or a multiple of
128) tokens, so the steps compile once per bucket at first use; a batch moves to another bucket
(its rows copied over) when the rows it holds need fewer or more.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import functools
import threading
import time
from typing import Callable

import jax
import numpy as np

from gpt2_jax.infer import decode
from gpt2_jax.interop.tokenizer import EOT_ID
from gpt2_jax.model import GPT2Config, init_cache

CHUNK = 32  # most decode steps per dispatch
# How long a chunk should take, about (its steps follow from the last chunk's time per step): long
# enough that the host's share per chunk (a dispatch, one copy back) is small, short enough that
# new requests do not wait long to join. A model whose step alone takes longer runs 1-step chunks.
CHUNK_SECONDS = 0.02


@dataclasses.dataclass(eq=False)
class Request:
    """One sequence to continue. `on_tokens(request, new_tokens)` is called from the engine's
    thread with each run of new tokens (request.tokens already holds them, and finish_reason is
    set if they are the last); returning False ends the request there (finish_reason 'stop').
    Setting `cancelled` from any thread ends it at the next chunk boundary."""

    prompt: list[int]
    max_tokens: int
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    key: np.ndarray | None = None  # PRNG key data (jax.random.key_data); None: key 0
    stop_at_eot: bool = True
    on_tokens: Callable[[Request, list[int]], bool | None] | None = None
    cancelled: bool = False
    tokens: list[int] = dataclasses.field(default_factory=list)  # generated so far
    finish_reason: str | None = None  # 'length', 'stop' (<|endoftext|> or on_tokens), 'cancelled', 'error'
    error: str | None = None

    @property
    def positions(self) -> int:
        """KV-cache positions this request needs."""
        return len(self.prompt) + self.max_tokens


class Batch:
    """Requests decoding together: the KV cache of `len(slots)` rows on the device, and on the
    host the request each slot holds (None: free). With `exact`, the batch has exactly as many
    rows as it was given (the Sampler's fixed batches) instead of a power of two. Each chunk
    of decode steps aims to take about `chunk_seconds`."""

    def __init__(self, config: GPT2Config, params, max_batch: int, rules: tuple = (), exact: bool = False,
                 chunk_seconds: float = CHUNK_SECONDS):  # fmt: skip
        self.config, self.params, self.max_batch, self.rules, self.exact = config, params, max_batch, rules, exact
        self.chunk_seconds = chunk_seconds
        self.slots: list[Request | None] = []
        self.cache, self.length = None, 0
        self.step_seconds = 0.0  # the last chunk's time per decode step
        self.peak = 0  # most rows active at once so far
        self.finished = collections.Counter()  # requests ended, by finish_reason
        self.shapes: set[str] = set()  # the prefill / decode shapes run so far: each compiled once

    @property
    def active(self) -> list[Request]:
        return [r for r in self.slots if r is not None]

    def _rows_for(self, n: int) -> int:
        return n if self.exact else decode.batch_bucket(n, self.max_batch)

    def admit(self, requests: list[Request]) -> None:
        """Prefill `requests` into free slots (at most max_batch rows in all), moving the batch to
        the bucket that holds them; each gets its first token."""
        if len(self.active) + len(requests) > self.max_batch:
            raise ValueError(f"{len(self.active)} + {len(requests)} rows exceed the batch's {self.max_batch}")
        for r in requests:  # past the cache's end a row would decode NaN logits into tokens
            if not (r.prompt and r.max_tokens >= 1 and r.positions <= self.config.n_positions):
                raise ValueError(f"a prompt of {len(r.prompt)} tokens and max_tokens {r.max_tokens} do not fit the "
                                 f"model's {self.config.n_positions} positions")  # fmt: skip
        self._resize(self.active + requests)
        free = [i for i, r in enumerate(self.slots) if r is None]
        groups = collections.defaultdict(list)  # prompts of one bucket prefill together
        for r in requests:
            groups[decode.prompt_bucket(self.config, len(r.prompt))].append(r)
        self.peak = max(self.peak, len(self.active) + len(requests))
        for bucket, group in groups.items():
            slots, free = free[: len(group)], free[len(group) :]
            self._prefill(bucket, group, slots)

    def step(self) -> None:
        """One chunk of decode steps for every active row; their new tokens go to their requests."""
        if not self.active:
            return
        for r in self.active:
            if r.cancelled:
                self._finish(r, "cancelled")
        self._resize(self.active)
        if not self.active:
            return
        steps = CHUNK if not self.step_seconds else int(np.clip(self.chunk_seconds / self.step_seconds, 1, CHUNK))
        start = time.perf_counter()
        self.shapes.add(f"decode {len(self.slots)}x{self.length}")
        self.cache, out = decode._decode(self.params, self.cache, self._rows(self.slots), np.int32(steps),
                                         config=self.config, rules=self.rules, chunk=CHUNK)  # fmt: skip
        out = np.asarray(out)  # the one transfer to the host per chunk
        ran = max(1, int((out >= 0).any(axis=0).sum()))
        self.step_seconds = (time.perf_counter() - start) / ran
        for r, row in zip(self.slots, out):
            if r is not None:
                self._deliver(r, row[row >= 0].tolist())

    def fail(self, error: BaseException, requests: list[Request]) -> None:
        """End every active request and `requests` with `error`, and start over with an empty batch."""
        for r in dict.fromkeys(self.active + [r for r in requests if r.finish_reason is None]):  # joined: in both
            r.error = f"{type(error).__name__}: {error}"
            self._finish(r, "error")
        self.slots, self.cache, self.length = [], None, 0

    def _resize(self, keep: list[Request]) -> None:
        """Move the batch to the bucket for `keep` (its active rows plus any about to join),
        copying the active rows over (to slots 0, 1, ...) if the bucket changes."""
        if not keep:
            self.slots, self.cache, self.length = [], None, 0
            return
        if self.exact and self.cache is not None:
            return  # a fixed batch (the Sampler's): finished rows idle in place, one shape to the end
        rows, length = self._rows_for(len(keep)), max(decode.cache_length(self.config, r.positions) for r in keep)
        if (rows, length) == (len(self.slots), self.length):
            return
        active = self.active
        if self.cache is None:
            self.cache = init_cache(self.config, rows, length)
        else:
            index = [self.slots.index(r) for r in active] + [0] * (rows - len(active))  # idle rows: any copy
            self.cache = decode._regroup(self.cache, np.asarray(index, np.int32), length=length)
        self.slots = active + [None] * (rows - len(active))
        self.length = length

    def _prefill(self, bucket: int, group: list[Request], slots: list[int]) -> None:
        k = self._rows_for(len(group))
        prompts = np.zeros((k, bucket), np.int32)
        lengths = np.ones(k, np.int32)  # padding rows: a 1-token prompt, written nowhere
        for j, r in enumerate(group):
            prompts[j, : len(r.prompt)], lengths[j] = r.prompt, len(r.prompt)
        padded = group + [None] * (k - len(group))
        self.shapes.add(f"prefill {k}x{bucket}")
        token, rows_cache = decode._prefill(self.params, prompts, lengths, self._rows(padded),
                                            config=self.config, rules=self.rules)  # fmt: skip
        where = np.asarray(slots + [len(self.slots)] * (k - len(group)), np.int32)  # past the end: dropped
        self.cache = decode._insert(self.cache, rows_cache, where)
        for r, slot, t in zip(group, slots, np.asarray(token).tolist()):
            self.slots[slot] = r
            self._deliver(r, [t])

    def _rows(self, requests: list[Request | None]) -> decode.Rows:
        """The device's view of `requests` (None: an idle row)."""
        live = [r or Request([EOT_ID], 0) for r in requests]
        key0 = _default_key()
        return decode.Rows(
            token=np.asarray([r.tokens[-1] if r.tokens else 0 for r in live], np.int32),
            count=np.asarray([len(r.tokens) for r in live], np.int32),
            remaining=np.asarray([r.max_tokens - len(r.tokens) if r.finish_reason is None else 0 for r in live],
                                 np.int32),  # fmt: skip
            stop_at_eot=np.asarray([r.stop_at_eot for r in live], bool),
            key=np.stack([key0 if r.key is None else r.key for r in live]),
            temperature=np.asarray([r.temperature for r in live], np.float32),
            top_k=np.asarray([r.top_k for r in live], np.int32),
            top_p=np.asarray([r.top_p for r in live], np.float32),
        )

    def _deliver(self, r: Request, new: list[int]) -> None:
        if r.stop_at_eot and EOT_ID in new:
            new = new[: new.index(EOT_ID) + 1]
        r.tokens.extend(new)
        if r.stop_at_eot and new and new[-1] == EOT_ID:
            r.finish_reason = "stop"
        elif len(r.tokens) >= r.max_tokens:
            r.finish_reason = "length"
        if r.on_tokens is not None and r.on_tokens(r, new) is False and r.finish_reason is None:
            r.finish_reason = "stop"
        if r.finish_reason is not None:
            self._free(r)

    def _finish(self, r: Request, reason: str) -> None:
        r.finish_reason = reason
        if r.on_tokens is not None and reason == "error":
            with contextlib.suppress(Exception):  # the error being reported matters more
                r.on_tokens(r, [])
        self._free(r)

    def _free(self, r: Request) -> None:
        self.finished[r.finish_reason] += 1
        if r in self.slots:
            self.slots[self.slots.index(r)] = None


class Engine:
    """A Batch decoding in a thread of its own: requests submitted from any thread wait in a
    queue and join the batch at the next chunk boundary, first come first served, while it has
    free rows. JAX work happens in this thread only, apart from the callers' key making."""

    def __init__(self, config: GPT2Config, params, max_batch: int = 16, rules: tuple = ()):
        self.batch = Batch(config, params, max_batch, rules)
        self._waiting: collections.deque[Request] = collections.deque()
        self._wake = threading.Condition()
        self._closing = False
        self._thread = threading.Thread(target=self._loop, name="gpt2_jax-engine", daemon=True)

    def start(self) -> Engine:
        self._thread.start()
        return self

    def submit(self, requests: list[Request]) -> None:
        with self._wake:
            if self._closing:
                raise RuntimeError("the engine is shutting down")
            self._waiting.extend(requests)
            self._wake.notify()

    def close(self, timeout: float | None = None) -> None:
        """Finish the requests submitted so far, then stop the thread."""
        with self._wake:
            self._closing = True
            self._wake.notify()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def load(self) -> dict:
        """Requests decoding and waiting now, the batch's rows, the most requests decoding at
        once so far, how many have ended (by finish_reason), and the shapes compiled so far."""
        b = self.batch  # read from other threads: dict.copy and sorted copy in C, atomically
        return {"active": len(b.active), "waiting": len(self._waiting), "rows": len(b.slots), "peak_active": b.peak,
                "finished": dict.copy(b.finished), "shapes": sorted(b.shapes)}  # fmt: skip

    def _loop(self) -> None:
        while True:
            with self._wake:
                while not (self._waiting or self.batch.active or self._closing):
                    self._wake.wait()
                if self._closing and not (self._waiting or self.batch.active):
                    return
                room = self.batch.max_batch - len(self.batch.active)
                joining = [self._waiting.popleft() for _ in range(min(room, len(self._waiting)))]
            for r in joining:
                if r.cancelled:  # gone before it started
                    r.finish_reason = "cancelled"
                    self.batch.finished["cancelled"] += 1
            joining = [r for r in joining if r.finish_reason is None]
            try:
                if joining:
                    self.batch.admit(joining)
                self.batch.step()
            except Exception as e:  # a failed step fails its requests, not the server
                self.batch.fail(e, joining)


@functools.lru_cache(maxsize=1)
def _default_key() -> np.ndarray:
    return np.asarray(jax.random.key_data(jax.random.key(0)))


def request_key(seed: int, stream: int = 0) -> np.ndarray:
    """PRNG key data for a request: any int `seed` (all 64 bits count: jax.random.key keeps
    only 32 without x64), folded with `stream` (e.g. the choice's index)."""
    seed %= 1 << 64
    key = jax.random.fold_in(jax.random.key(seed & 0xFFFFFFFF), seed >> 32)
    return np.asarray(jax.random.key_data(jax.random.fold_in(key, stream)))
