"""The OpenAI completions wire format: checking a request body (a bad one is a RequestError, HTTP 400) and the JSON bodies sent back."""

from __future__ import annotations

import json
import time
from typing import Literal

import pydantic
from pydantic import Field, StrictBool, StrictInt, StrictStr

from gpt2_jax.errors import UserError

MAX_STOPS = 4  # as OpenAI
MAX_CHOICES = 128  # n per prompt


class RequestError(UserError):
    """A request the server cannot serve, as the client sent it: HTTP 400 with this message."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


class CompletionRequest(pydantic.BaseModel):
    """POST /v1/completions. Unknown fields are ignored, as OpenAI does; null means the default."""

    model_config = pydantic.ConfigDict(extra="ignore")

    model: StrictStr | None = None  # one model is served; any name is accepted
    prompt: StrictStr | list[StrictStr]  # '' = unconditional (from <|endoftext|>)
    max_tokens: StrictInt | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, ge=0, le=1)
    n: StrictInt | None = Field(None, ge=1, le=MAX_CHOICES)
    stop: StrictStr | list[StrictStr] | None = None
    seed: StrictInt | None = None
    stream: StrictBool | None = False
    stream_options: dict | None = None
    # known to OpenAI, not served here: refused rather than silently ignored
    echo: StrictBool | None = None
    logprobs: StrictInt | None = None
    best_of: StrictInt | None = None
    suffix: StrictStr | None = None

    @pydantic.field_validator("stop")
    @classmethod
    def _stops(cls, stop):
        stops = [stop] if isinstance(stop, str) else stop or []
        if len(stops) > MAX_STOPS:
            raise ValueError(f"at most {MAX_STOPS} stop strings")
        if any(not s for s in stops):
            raise ValueError("stop strings must not be empty")
        return stops

    @pydantic.field_validator("prompt", mode="wrap")
    @classmethod
    def _prompt(cls, prompt, handler):
        try:
            prompt = handler(prompt)
        except pydantic.ValidationError:
            raise ValueError("must be a string or a list of strings (token ids are not accepted)") from None
        if isinstance(prompt, list) and not prompt:
            raise ValueError("the list of prompts is empty")
        return prompt

    @property
    def prompts(self) -> list[str]:
        return [self.prompt] if isinstance(self.prompt, str) else list(self.prompt)

    @property
    def stops(self) -> list[str]:
        return self.stop or []

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.get("include_usage"))


def parse_request(body: bytes) -> CompletionRequest:
    """The checked request in `body`, or a RequestError saying what is wrong with it."""
    try:
        data = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise RequestError(f"the request body is not JSON ({e})") from None
    if not isinstance(data, dict):
        raise RequestError("the request body must be a JSON object")
    try:
        request = CompletionRequest.model_validate(data)
    except pydantic.ValidationError as e:
        error = e.errors()[0]
        where = ".".join(str(p) for p in error["loc"] if not str(p).startswith(("str", "list[")))
        message = error["msg"].removeprefix("Value error, ")
        raise RequestError(f"{where or 'request'}: {message}", where.split(".")[0] or None) from None
    for field, off in (("echo", False), ("logprobs", None), ("best_of", 1), ("suffix", None)):
        if getattr(request, field) not in (None, off):
            raise RequestError(f"{field} is not supported by this server", field)
    return request


def error_body(message: str, kind: str = "invalid_request_error", param: str | None = None) -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": None}}


def choice(index: int, text: str, finish_reason: str | None) -> dict:
    return {"index": index, "text": text, "logprobs": None, "finish_reason": finish_reason}


def completion_body(id_: str, model: str, choices: list[dict], usage: dict | None,
                    created: int | None = None) -> dict:  # fmt: skip
    """A completion, or (with one choice and no usage) one chunk of a streamed one."""
    body = {"id": id_, "object": "text_completion", "created": int(created or time.time()), "model": model,
            "choices": choices}  # fmt: skip
    if usage is not None:
        body["usage"] = usage
    return body


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}  # fmt: skip


def models_body(model: str, created: int) -> dict:
    return {"object": "list", "data": [{"id": model, "object": "model", "created": created, "owned_by": "gpt2_jax"}]}


def sse(data: dict | Literal["[DONE]"]) -> str:
    """One server-sent event."""
    return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n"
