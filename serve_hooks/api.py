"""The HTTP API's request bodies (strict pydantic models), error shape and prompt helpers.

Every field an OpenAI client sends is declared; unknown fields, wrong types and absurd values
are refused with a 4xx that names the problem (see `serve_hooks.server`).
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from fastapi import Request
from fastapi.responses import Response
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from serve_hooks.sequence import SamplingParams

# --------------------------------------------------------------------------- request bodies


class _Strict(BaseModel):
    # strict: "5" is not a number and 1 is not a bool; forbid: a misspelt field is an error, not
    # ignored.
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


class StreamOptions(_Strict):
    include_usage: bool = False


class GreylensOptions(_Strict):
    """What a request wants from the hook (see serve_hooks.report for the answer's shape)."""

    # Top-n latents per token per SAE (0: none; None: the server's --top-n).
    features: int | None = Field(None, ge=0)
    probes: Annotated[list[str], Field(max_length=256)] | None = (
        None  # probe names (None: every probe)
    )
    paths: bool = False  # reasoning paths of generated tokens (needs a server started with --graph)


class _Sampling(_Strict):
    model: str | None = None
    temperature: float = Field(1.0, ge=0.0, le=100.0)  # OpenAI's default; 0 is greedy
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=0, le=2**31)  # extension: 0 = off
    seed: int | None = Field(None, ge=0, lt=2**63)
    stop: str | Annotated[list[str], Field(max_length=16)] | None = None
    stop_token_ids: Annotated[list[int], Field(max_length=64)] = []  # extension
    ignore_eos: bool = False  # extension
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int | None = None
    user: str | None = None  # accepted for compatibility, unused
    greylens: GreylensOptions | None = None  # extension: per-token features, probe scores, paths

    @field_validator("n")
    @classmethod
    def _one_choice(cls, n: int | None) -> int | None:
        if n is not None and n != 1:
            raise ValueError(f"only n=1 is supported, got {n}")
        return n


class CompletionRequest(_Sampling):
    prompt: str | list[int]
    max_tokens: int = Field(16, ge=1)  # OpenAI's default for completions

    @field_validator("prompt")
    @classmethod
    def _not_empty(cls, prompt: str | list[int]) -> str | list[int]:
        if len(prompt) == 0:
            raise ValueError("the prompt is empty")
        return prompt


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class Message(_Strict):
    role: Literal["system", "user", "assistant"]
    content: str | list[TextPart]
    name: str | None = None

    def text(self) -> str:
        return (
            self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)
        )


class ChatRequest(_Sampling):
    messages: Annotated[list[Message], Field(min_length=1)]
    max_tokens: int | None = Field(None, ge=1)  # None: up to the context limit
    max_completion_tokens: int | None = Field(None, ge=1)  # OpenAI's newer name for max_tokens


class APIError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.status, self.message, self.kind = status, message, kind


def error_response(status: int, message: str, kind: str = "invalid_request_error") -> Response:
    # json.dumps escapes non-ASCII, so an echoed bad string (a lone surrogate) cannot break encoding
    body = {"error": {"message": message, "type": kind, "code": status}}
    return Response(json.dumps(body), status_code=status, media_type="application/json")


async def parse_body(request: Request, model: type[_Strict]) -> Any:
    """The body validated in pydantic's JSON mode: one parser, so malformed JSON, NaN, deep nesting
    and bad UTF-8 all end as a 400 with the reason, like wrong types and unknown fields."""
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind != "application/json" and not kind.endswith("+json"):
        raise APIError(
            415,
            f"send the body as JSON with Content-Type: application/json (got {kind or 'none'!r})",
        )
    try:
        return model.model_validate_json(await request.body())
    except ValidationError as error:
        problems = [
            f"{'.'.join(map(str, e['loc'])) or 'body'}: {e['msg']}" for e in error.errors()[:4]
        ]
        raise APIError(400, "; ".join(problems)) from None


def sampling_params(body: _Sampling, max_tokens: int | None, max_model_len: int) -> SamplingParams:
    if max_tokens is not None and max_tokens > max_model_len:
        raise APIError(
            400, f"max_tokens={max_tokens} exceeds the context limit of {max_model_len} tokens"
        )
    stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    # max_tokens None: a placeholder the engine thread replaces once it knows the prompt length.
    try:
        return SamplingParams(
            temperature=body.temperature,
            top_p=body.top_p,
            top_k=body.top_k,
            seed=body.seed,
            max_tokens=max_tokens or max_model_len,
            stop=stop,
            stop_token_ids=list(body.stop_token_ids),
            ignore_eos=body.ignore_eos,
        )
    except ValueError as error:
        raise APIError(400, str(error)) from None


def chat_prompt(tokenizer: Any, messages: list[dict[str, str]]) -> tuple[str, bool]:
    """The prompt text for a conversation, and whether tokenizing it should add special tokens.

    With a chat template (SmolLM2 has one) the template writes every special token itself. Without
    one (the tiny test model) the fallback is one "role: content" line per message, then
    "assistant:", tokenized like a plain prompt (BOS first)."""
    if getattr(tokenizer, "chat_template", None):
        try:
            return tokenizer.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=True
            ), False
        except Exception as error:  # templates reject conversations with raise_exception(...)
            raise APIError(400, f"the chat template rejected the messages: {error}") from None
    return "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant:", True
