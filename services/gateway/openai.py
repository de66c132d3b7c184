"""The OpenAI-compatible surface: request bodies in, GenerateRequest fields out, and the response
and stream-chunk shapes back. Pure: no aiohttp, no NATS.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import msgspec

from dlora.common.messages import SamplingParams


class APIError(Exception):
    """A request the gateway refuses: HTTP status and an OpenAI-style error body."""

    def __init__(self, status: int, message: str, param: str | None = None, kind: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param = status, message, param
        self.kind = kind or {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
                             409: "invalid_request_error", 503: "service_unavailable"}.get(status, "server_error")

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": None}}


class StreamOptions(msgspec.Struct, kw_only=True):
    include_usage: bool = False


class _Sampling(msgspec.Struct, kw_only=True):
    model: str
    max_tokens: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    user: str | None = None
    # vLLM extensions
    top_k: int = 0
    ignore_eos: bool = False
    stop_token_ids: list[int] = []
    # Accepted only at their no-op values.
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logprobs: Any = None
    logit_bias: dict[str, float] | None = None


class CompletionBody(_Sampling, kw_only=True):
    prompt: str | list[int | str]
    max_tokens: int | None = 16
    echo: bool = False
    best_of: int | None = None
    suffix: str | None = None


class ContentPart(msgspec.Struct, kw_only=True):
    type: str
    text: str = ""


class ChatMessage(msgspec.Struct, kw_only=True):
    role: str
    content: str | list[ContentPart] | None = None


class ChatBody(_Sampling, kw_only=True):
    messages: list[ChatMessage]
    max_completion_tokens: int | None = None


def decode_body(raw: bytes, kind: type[msgspec.Struct]) -> Any:
    try:
        return msgspec.json.decode(raw, type=kind)
    except msgspec.ValidationError as e:
        raise APIError(400, f"invalid request: {e}") from None
    except msgspec.DecodeError as e:
        raise APIError(400, f"malformed JSON: {e}") from None


def sampling_params(body: _Sampling, max_tokens: int) -> SamplingParams:
    unsupported = [
        ("n", body.n != 1), ("presence_penalty", body.presence_penalty != 0), ("logprobs", body.logprobs not in (None, False)),
        ("frequency_penalty", body.frequency_penalty != 0), ("logit_bias", bool(body.logit_bias)),
    ]
    if isinstance(body, CompletionBody):
        unsupported += [("echo", body.echo), ("best_of", body.best_of not in (None, 1)), ("suffix", body.suffix is not None)]
    for name, bad in unsupported:
        if bad:
            raise APIError(400, f"{name} is not supported (only its default)", param=name)
    if not 0.0 <= body.temperature <= 2.0:
        raise APIError(400, f"temperature must be in [0, 2], got {body.temperature}", param="temperature")
    stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    params = SamplingParams(
        max_tokens=max_tokens, temperature=body.temperature, top_p=body.top_p, top_k=body.top_k, seed=body.seed,
        stop=stop, stop_token_ids=body.stop_token_ids, ignore_eos=body.ignore_eos,
    )
    if (problem := params.problem()) is not None:
        raise APIError(400, problem)
    return params


def chat_prompt_ids(messages: list[ChatMessage], tokenizer: Any) -> list[int]:
    """The prompt token ids for a conversation: the tokenizer's chat template rendered and
    tokenized as ``apply_chat_template(..., tokenize=True, add_generation_prompt=True)`` does, so a
    template that writes ``{{ bos_token }}`` is not given a second BOS by the tokenizer; without a
    template, a plain "role: content" transcript ending with "assistant:", tokenized as a prompt."""
    if not messages:
        raise APIError(400, "messages must not be empty", param="messages")
    plain = []
    for m in messages:
        if m.role not in ("system", "user", "assistant", "tool", "developer"):
            raise APIError(400, f"unknown message role {m.role!r}", param="messages")
        content = m.content if isinstance(m.content, str) or m.content is None else "".join(
            p.text for p in m.content if p.type == "text"
        )
        plain.append({"role": m.role, "content": content or ""})
    if getattr(tokenizer, "chat_template", None):
        out = tokenizer.apply_chat_template(plain, tokenize=True, add_generation_prompt=True)
        # a list of ids, or (transformers 5) an encoding holding them
        return list(out["input_ids"] if isinstance(out, Mapping) else out)
    return list(tokenizer.encode("".join(f"{m['role']}: {m['content']}\n" for m in plain) + "assistant:"))


@dataclass
class Shape:
    """What a response looks like: completion or chat, for one request."""

    chat: bool
    request_id: str
    model: str
    created: int

    @classmethod
    def new(cls, chat: bool, request_id: str, model: str) -> Shape:
        return cls(chat, request_id, model, int(time.time()))

    def _head(self, streaming: bool) -> dict[str, Any]:
        obj = ("chat.completion.chunk" if streaming else "chat.completion") if self.chat else "text_completion"
        return {"id": self.request_id, "object": obj, "created": self.created, "model": self.model}

    def full(self, text: str, finish_reason: str | None, prompt_tokens: int, completion_tokens: int) -> dict[str, Any]:
        choice: dict[str, Any] = {"index": 0, "logprobs": None, "finish_reason": finish_reason}
        if self.chat:
            choice["message"] = {"role": "assistant", "content": text}
        else:
            choice["text"] = text
        return {**self._head(False), "choices": [choice], "usage": usage(prompt_tokens, completion_tokens)}

    def chunk(self, text: str, finish_reason: str | None, first: bool = False) -> dict[str, Any]:
        choice: dict[str, Any] = {"index": 0, "logprobs": None, "finish_reason": finish_reason}
        if self.chat:
            choice["delta"] = ({"role": "assistant"} if first else {}) | ({"content": text} if text or first else {})
        else:
            choice["text"] = text
        return {**self._head(True), "choices": [choice]}

    def usage_chunk(self, prompt_tokens: int, completion_tokens: int) -> dict[str, Any]:
        return {**self._head(True), "choices": [], "usage": usage(prompt_tokens, completion_tokens)}


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}
