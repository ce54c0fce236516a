"""CLI: serve a model over HTTP with the OpenAI completions API (FastAPI on uvicorn), decoding on the engine.

    python -m gpt2_jax.serve --hf out/hf --port 8000
    python -m gpt2_jax.serve --workdir runs/shakespeare --max_batch 16 --max_tokens_limit 256

    curl -s localhost:8000/v1/completions -H 'Content-Type: application/json' \\
        -d '{"prompt": "ROMEO:", "max_tokens": 32, "temperature": 0}'

POST /v1/completions (prompt: a string or a list of them; max_tokens, temperature, top_p, n, stop,
seed, stream, stream_options.include_usage), GET /v1/models, GET /health. A bad request gets HTTP
400 with an OpenAI-style JSON error. Requests that arrive together decode together; SIGTERM stops
taking connections, finishes the requests in flight, then exits 0. --port 0 picks a free port;
the first line printed says which.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import socket
import time
import uuid
from typing import Sequence

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from gpt2_jax.cli import ArgumentParser, run
from gpt2_jax.errors import UserError
from gpt2_jax.infer.completion import Completion, EngineError
from gpt2_jax.infer.engine import Engine
from gpt2_jax.infer.protocol import (
    RequestError,
    choice,
    completion_body,
    error_body,
    models_body,
    parse_request,
    sse,
    usage,
)
from gpt2_jax.interop.load import load_hf_folder, load_workdir
from gpt2_jax.interop.tokenizer import EOT, EOT_ID, get_tokenizer
from gpt2_jax.model import GPT2Config

DEFAULT_MAX_TOKENS = 16  # as OpenAI, when a request gives none
DISCONNECT_POLL_S = 0.5  # how often a non-streamed request checks that its client is still there


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = ArgumentParser(prog="python -m gpt2_jax.serve", description=__doc__.split("\n")[0])
    source = p.add_mutually_exclusive_group()
    source.add_argument("--workdir", metavar="DIR", help="training workdir (its newest usable checkpoint, or --step)")
    source.add_argument("--hf", metavar="DIR", help="Hugging Face model folder")
    p.add_argument("--step", type=int, metavar="N", help="checkpoint step for --workdir")
    p.add_argument("--host", default="127.0.0.1", metavar="H", help="address to listen on (default %(default)s)")
    p.add_argument("--port", type=int, default=8000, metavar="P", help="0 = any free port (default %(default)s)")
    p.add_argument("--max_batch", type=int, default=16, metavar="N",
                   help="most sequences decoding at once (default %(default)s)")
    p.add_argument("--max_tokens_limit", type=int, metavar="N",
                   help="largest max_tokens a request may ask for (default: the context - 1)")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                   help="compute dtype (default %(default)s)")
    args = p.parse_args(argv)
    if not (args.workdir or args.hf):
        raise UserError("give a model: --workdir DIR or --hf DIR")
    if args.step is not None and not args.workdir:
        raise UserError("--step applies to --workdir checkpoints; no --workdir was given")
    if args.max_batch < 1:
        raise UserError("--max_batch must be at least 1")
    if not 0 <= args.port < 65536:
        raise UserError(f"--port must be between 0 and 65535, not {args.port}")
    return args


def encode(text: str, max_tokens: int, config: GPT2Config) -> list[int]:
    """Prompt tokens ('' = <|endoftext|>); RequestError if they and max_tokens exceed the context."""
    tokens = get_tokenizer().encode(text, allowed_special={EOT}) or [EOT_ID]
    if len(tokens) + max_tokens > config.n_positions:
        raise RequestError(f"the prompt is {len(tokens)} tokens and max_tokens is {max_tokens}: together more than "
                           f"the model's context of {config.n_positions} tokens", "prompt")  # fmt: skip
    return tokens


def create_app(engine: Engine, model: str, config: GPT2Config, max_tokens_limit: int):
    """The FastAPI app serving `engine` (started and closed with the app) as model `model`."""

    @contextlib.asynccontextmanager
    async def lifespan(app):
        engine.start()
        yield
        engine.close()  # after uvicorn has waited for the requests in flight

    app = FastAPI(title="gpt2_jax", lifespan=lifespan)
    created = int(time.time())

    def bad(e: RequestError) -> JSONResponse:
        return JSONResponse(error_body(str(e), param=e.param), status_code=400)

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": model, **engine.load()}

    @app.get("/v1/models")
    async def models():
        return models_body(model, created)

    @app.post("/v1/completions")
    async def completions(request: Request):
        try:
            body = parse_request(await request.body())
            max_tokens = DEFAULT_MAX_TOKENS if body.max_tokens is None else body.max_tokens
            if max_tokens > max_tokens_limit:
                raise RequestError(f"max_tokens {max_tokens} is above this server's limit of {max_tokens_limit}",
                                   "max_tokens")  # fmt: skip
            prompts = [encode(p, max_tokens, config) for p in body.prompts]
        except RequestError as e:
            return bad(e)
        completion = Completion(prompts, body, max_tokens, asyncio.get_running_loop())
        engine.submit(completion.rows)
        id_ = f"cmpl-{uuid.uuid4().hex}"
        if body.stream:
            chunks = _chunks(completion, id_, model, body.include_usage)
            return StreamingResponse(chunks, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        try:
            texts, reasons = await _collect(completion, request)
        except EngineError as e:
            return JSONResponse(error_body(str(e), "server_error"), status_code=500)
        if texts is None:  # the client has gone
            return Response(status_code=499)
        choices = [choice(i, text, reason) for i, (text, reason) in enumerate(zip(texts, reasons))]
        return completion_body(id_, model, choices, usage(completion.prompt_tokens, completion.completion_tokens))

    return app


async def _collect(completion: Completion, request) -> tuple[list[str] | None, list[str | None]]:
    """Each choice's text and finish reason; (None, ...) if the client disconnects first (its rows
    are cancelled, freeing their batch slots)."""
    texts, reasons = [""] * len(completion.rows), [None] * len(completion.rows)

    async def gather():
        async for piece in completion.pieces():
            texts[piece.index] += piece.text
            reasons[piece.index] = piece.finish_reason

    task = asyncio.ensure_future(gather())
    try:
        while not (await asyncio.wait({task}, timeout=DISCONNECT_POLL_S))[0]:
            if await request.is_disconnected():
                task.cancel()
                return None, reasons
        task.result()  # raises the engine's error, if any
        return texts, reasons
    finally:
        completion.cancel()


async def _chunks(completion: Completion, id_: str, model: str, include_usage: bool):
    """The server-sent events of a streamed completion: a chunk per piece of text, the usage (if
    asked), then [DONE]. A client that disconnects cancels this generator, and so its rows."""
    created = int(time.time())
    try:
        async for piece in completion.pieces():
            if piece.text or piece.finish_reason:
                yield sse(completion_body(id_, model, [choice(piece.index, piece.text, piece.finish_reason)], None,
                                          created))  # fmt: skip
        if include_usage:
            yield sse(completion_body(id_, model, [], usage(completion.prompt_tokens, completion.completion_tokens),
                                      created))  # fmt: skip
        yield sse("[DONE]")
    except EngineError as e:
        yield sse(error_body(str(e), "server_error"))
    finally:
        completion.cancel()


def listen(host: str, port: int) -> socket.socket:
    """A socket bound to host:port (port 0: a free one), or a UserError saying why not."""
    try:
        info = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(info[0], socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(info[4])
    except OSError as e:
        raise UserError(f"cannot listen on {host}:{port} ({e.strerror or e})") from None
    return sock


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    sock = listen(args.host, args.port)
    if args.hf:
        loaded = load_hf_folder(args.hf, dtype=args.dtype)
    else:
        loaded = load_workdir(args.workdir, args.step, dtype=args.dtype)
    config = loaded.config
    limit = config.n_positions - 1 if args.max_tokens_limit is None else args.max_tokens_limit
    if not 1 <= limit < config.n_positions:
        raise UserError(f"--max_tokens_limit must be between 1 and {config.n_positions - 1} (the context is "
                        f"{config.n_positions} tokens)")  # fmt: skip
    app = create_app(Engine(config, loaded.params, args.max_batch), loaded.label, config, limit)
    host, port = sock.getsockname()[:2]
    print(f"serving {loaded.label} at http://{host}:{port}/v1", flush=True)
    server = uvicorn.Server(uvicorn.Config(app, log_level="info", timeout_graceful_shutdown=None))
    # uvicorn raises the SIGTERM again once it has drained; with this handler that ends nothing,
    # so a drained server exits 0 instead of dying of the signal
    signal.signal(signal.SIGTERM, lambda *_: None)
    server.run(sockets=[sock])
    return 0 if server.started else 1


def cli() -> int:
    """`python -m gpt2_jax.serve`: main() with user errors as one line and exit status 2."""
    return run(main)
