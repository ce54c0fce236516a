"""One completions request on the engine: a row per (prompt, choice), turned into text pieces delivered to asyncio."""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import secrets
from typing import AsyncIterator

from gpt2_jax.infer.engine import Request, request_key
from gpt2_jax.infer.protocol import CompletionRequest
from gpt2_jax.infer.text import TextStream


class EngineError(RuntimeError):
    """The engine failed while generating (HTTP 500): not the client's fault."""


@dataclasses.dataclass
class Piece:
    index: int  # the choice: prompt i's choice j is i * n + j, as OpenAI numbers them
    text: str
    finish_reason: str | None  # set on the choice's last piece
    error: str | None = None


class Completion:
    """The engine rows of one request (prompt i's n choices are rows i * n ... i * n + n - 1), and
    the text pieces they produce, in order, as `pieces()`. The rows' callbacks run in the
    engine's thread: they turn tokens into text and check stop strings there, so a stop ends its
    row at once; the pieces cross to the event loop with call_soon_threadsafe."""

    def __init__(self, prompts: list[list[int]], request: CompletionRequest, max_tokens: int,
                 loop: asyncio.AbstractEventLoop):  # fmt: skip
        self.loop, self.queue = loop, asyncio.Queue()
        n = request.n or 1
        temperature = 1.0 if request.temperature is None else request.temperature
        top_p = 1.0 if request.top_p is None else request.top_p
        seed = secrets.randbits(64) if request.seed is None else request.seed
        self.rows = [
            Request(tokens, max_tokens, temperature, 0, top_p, request_key(seed, i * n + j),
                    on_tokens=functools.partial(self._on_tokens, i * n + j, TextStream(request.stops)))
            for i, tokens in enumerate(prompts) for j in range(n)
        ]  # fmt: skip
        self.prompt_tokens = sum(len(tokens) for tokens in prompts)
        self.used = [0] * len(self.rows)  # tokens each choice generated (up to its stop string)

    @property
    def completion_tokens(self) -> int:
        return sum(self.used)

    def cancel(self) -> None:
        """End every row at the next chunk boundary (a no-op for those already finished)."""
        for r in self.rows:
            r.cancelled = True

    async def pieces(self) -> AsyncIterator[Piece]:
        """Every piece of text, until each choice has had its last; EngineError if the engine failed."""
        ongoing = len(self.rows)
        while ongoing:
            piece = await self.queue.get()
            if piece.error is not None:
                raise EngineError(piece.error)
            ongoing -= piece.finish_reason is not None
            yield piece

    def _on_tokens(self, index: int, text: TextStream, row: Request, new: list[int]) -> bool:
        if row.finish_reason == "error":
            self._post(Piece(index, "", "error", row.error))
            return False
        piece, used = text.push(new)
        self.used[index] = len(row.tokens) - (len(new) - used)
        finish = "stop" if text.stopped else row.finish_reason
        if finish is not None and not text.stopped:
            piece += text.finish()
        self._post(Piece(index, piece, finish))
        return not text.stopped

    def _post(self, piece: Piece) -> None:
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, piece)
        except RuntimeError:  # the event loop has closed: nobody is waiting
            pass
