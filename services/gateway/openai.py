"""The OpenAI-compatible surface: request bodies in, GenerateRequest fields out, and the response
and stream-chunk shapes back. Pure: no aiohttp, no NATS.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import msgspec

from dlora.common.messages import SamplingParams, TokenLogprob
from dlora.services.worker.engine.structured import JSON_OBJECT_SCHEMA, GrammarError, check_schema


class APIError(Exception):
    """A request the gateway refuses: HTTP status and an OpenAI-style error body."""

    def __init__(self, status: int, message: str, param: str | None = None, kind: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param = status, message, param
        self.kind = kind or {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
                             409: "invalid_request_error", 503: "service_unavailable"}.get(status, "server_error")

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": None}}


class StreamOptions(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    include_usage: bool | None = None
    include_obfuscation: bool | None = None  # no effect here: nothing is obfuscated


# Request bodies follow the OpenAI OpenAPI document field by field: a field the spec marks
# nullable is ``T | None`` here and null means its default; a field the spec does not have is
# refused by name ("unknown field"), as the OpenAI API refuses it. Ranges are checked in
# ``sampling_params`` (the spec's minimum and maximum). Fields of the spec that dlora cannot honour
# are declared ``Any`` so a value other than null or the default gets a 400 naming them.


class _Sampling(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    model: str
    max_tokens: int | None = None
    temperature: float | None = None  # [0, 2], default 1
    top_p: float | None = None  # [0, 1], default 1
    n: int | None = None  # [1, 128], default 1
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    user: str | None = None
    presence_penalty: float | None = None  # [-2, 2], default 0
    frequency_penalty: float | None = None  # [-2, 2], default 0
    logit_bias: dict[str, float] | None = None
    # vLLM extensions
    top_k: int | None = None
    ignore_eos: bool | None = None
    stop_token_ids: list[int] | None = None
    skip_special_tokens: bool | None = None
    repetition_penalty: float | None = None  # (0, 100], default 1


class CompletionBody(_Sampling, kw_only=True, forbid_unknown_fields=True):
    prompt: str | list[Any]  # a string, token ids, or a list of either (checked by the gateway)
    echo: bool | None = None
    best_of: int | None = None  # [0, 20], default 1
    logprobs: int | None = None  # [0, 5]
    suffix: str | None = None


class ContentPart(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    type: str
    text: str = ""
    # other part types (image_url, input_audio, file, refusal) carry one more field: named in the refusal
    image_url: Any = None
    input_audio: Any = None
    file: Any = None
    refusal: Any = None


class ChatMessage(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    role: str
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: Any = None
    tool_call_id: str | None = None
    function_call: Any = None
    audio: Any = None
    refusal: str | None = None


class ChatBody(_Sampling, kw_only=True, forbid_unknown_fields=True):
    messages: list[ChatMessage]
    max_completion_tokens: int | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = None  # [0, 20]
    response_format: Any = None
    # Metadata with no effect on the tokens: accepted and ignored.
    metadata: dict[str, str] | None = None
    store: bool | None = None
    service_tier: str | None = None
    safety_identifier: str | None = None
    prompt_cache_key: str | None = None
    prompt_cache_retention: str | None = None
    parallel_tool_calls: bool | None = None
    # In the spec, not served here: refused when set.
    tools: Any = None
    tool_choice: Any = None
    functions: Any = None
    function_call: Any = None
    audio: Any = None
    modalities: list[str] | None = None
    prediction: Any = None
    web_search_options: Any = None
    reasoning_effort: str | None = None
    verbosity: str | None = None
    moderation: Any = None
    prompt_cache_options: Any = None


def decode_body(raw: bytes, kind: type[msgspec.Struct]) -> Any:
    try:
        return msgspec.json.decode(raw, type=kind)
    except msgspec.ValidationError as e:
        raise APIError(400, f"invalid request: {e}") from None
    except msgspec.DecodeError as e:
        raise APIError(400, f"malformed JSON: {e}") from None


# The spec's ranges (OpenAI OpenAPI document, createCompletion / createChatCompletion requests).
RANGES: dict[str, tuple[float, float]] = {
    "temperature": (0.0, 2.0), "top_p": (0.0, 1.0), "n": (1, 128), "presence_penalty": (-2.0, 2.0),
    "frequency_penalty": (-2.0, 2.0), "best_of": (0, 20), "top_logprobs": (0, 20), "max_tokens": (0, math.inf),
    "max_completion_tokens": (0, math.inf),
}
# The completions endpoint's logprobs is a count in [0, 5]; the chat endpoint's is a flag.
_COMPLETION_LOGPROBS = (0, 5)


def _check_ranges(body: _Sampling) -> None:
    ranges = dict(RANGES)
    if isinstance(body, CompletionBody):
        ranges["logprobs"] = _COMPLETION_LOGPROBS
    for name, (low, high) in ranges.items():
        value = getattr(body, name, None)
        if value is not None and not low <= value <= high:
            span = f">= {low}" if high == math.inf else f"in [{low}, {high}]"
            raise APIError(400, f"{name} must be {span}, got {value}", param=name)


def _unsupported(body: _Sampling) -> list[tuple[str, bool]]:
    """(field, set to something dlora cannot honour) for every field of the spec it does not serve."""
    out = [("logit_bias", bool(body.logit_bias))]
    if isinstance(body, CompletionBody):
        out += [("best_of other than n", (body.best_of or body.n or 1) != (body.n or 1)),
                ("suffix", body.suffix is not None),
                ("echo with logprobs (prompt logprobs)", bool(body.echo) and body.logprobs is not None)]
    else:
        out += [("top_logprobs without logprobs: true", body.top_logprobs is not None and not body.logprobs),
                ("tools", bool(body.tools)), ("tool_choice", body.tool_choice not in (None, "none", "auto")),
                ("functions", bool(body.functions)), ("function_call", body.function_call not in (None, "none", "auto")),
                ("audio", body.audio is not None), ("modalities", (body.modalities or ["text"]) != ["text"]),
                ("prediction", body.prediction is not None), ("web_search_options", body.web_search_options is not None),
                ("reasoning_effort", body.reasoning_effort is not None), ("verbosity", body.verbosity is not None),
                ("moderation", body.moderation is not None), ("prompt_cache_options", body.prompt_cache_options is not None)]
    return out


def json_schema(response_format: Any) -> str | None:
    """The JSON Schema (JSON text) a chat ``response_format`` asks for: None for text, any object
    for ``json_object``, the given ``json_schema.schema`` otherwise.

    Raises:
        APIError(400): an unknown type, a missing or unusable schema (llguidance's reason).
    """
    if response_format is None:
        return None
    kind = response_format.get("type") if isinstance(response_format, dict) else None
    if kind == "text":
        return None
    if kind == "json_object":
        return JSON_OBJECT_SCHEMA
    if kind != "json_schema":
        raise APIError(400, f"response_format type {kind!r} is not one of text, json_object, json_schema",
                       param="response_format")
    spec = response_format.get("json_schema")
    schema = spec.get("schema") if isinstance(spec, dict) else None
    if not isinstance(schema, dict):
        raise APIError(400, "response_format json_schema needs a 'schema' object", param="response_format")
    text = json.dumps(schema)
    try:
        check_schema(text)
    except GrammarError as e:
        raise APIError(400, str(e), param="response_format") from None
    return text


def sampling_params(body: _Sampling, max_tokens: int) -> SamplingParams:
    """The engine's parameters for a request body (null fields at their defaults).

    Raises:
        APIError(400): a value outside the spec's range, or a field dlora cannot honour, named.
    """
    _check_ranges(body)
    for name, bad in _unsupported(body):
        if bad:
            raise APIError(400, f"{name} is not supported (only its default)", param=name)
    stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    params = SamplingParams(
        max_tokens=max_tokens, temperature=1.0 if body.temperature is None else body.temperature,
        top_p=1.0 if body.top_p is None else body.top_p, top_k=body.top_k or 0, seed=body.seed, stop=stop,
        stop_token_ids=body.stop_token_ids or [], ignore_eos=bool(body.ignore_eos),
        skip_special_tokens=True if body.skip_special_tokens is None else body.skip_special_tokens,
        presence_penalty=body.presence_penalty or 0.0, frequency_penalty=body.frequency_penalty or 0.0,
        repetition_penalty=1.0 if body.repetition_penalty is None else body.repetition_penalty,
        logprobs=body.logprobs if isinstance(body, CompletionBody) else (
            (body.top_logprobs or 0) if body.logprobs else None),
        json_schema=None if isinstance(body, CompletionBody) else json_schema(body.response_format),
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
        if m.tool_calls or m.function_call or m.audio is not None:
            field = "tool_calls" if m.tool_calls else "function_call" if m.function_call else "audio"
            raise APIError(400, f"messages: {field} in a {m.role} message is not supported", param="messages")
        parts = [] if isinstance(m.content, str) or m.content is None else m.content
        other = sorted({p.type for p in parts if p.type != "text"})
        if other:  # never dropped silently: the model would answer as if it were not there
            raise APIError(400, f"messages: content parts of type {', '.join(other)} are not supported "
                                "(this model reads text only)", param="messages")
        content = m.content if isinstance(m.content, str) or m.content is None else "".join(p.text for p in parts)
        plain.append({"role": m.role, "content": content or ""} | ({"name": m.name} if m.name else {}))
    if getattr(tokenizer, "chat_template", None):
        try:
            out = tokenizer.apply_chat_template(plain, tokenize=True, add_generation_prompt=True)
        except Exception as e:  # noqa: BLE001 - jinja's raise_exception ("roles must alternate") and the like
            raise APIError(400, f"messages: the model's chat template refused them: {e}", param="messages") from None
        # a list of ids, or (transformers 5) an encoding holding them
        return list(out["input_ids"] if isinstance(out, Mapping) else out)
    return list(tokenizer.encode("".join(f"{m['role']}: {m['content']}\n" for m in plain) + "assistant:"))


@dataclass
class Choice:
    """One choice of a response as it completes (one prompt x one of its ``n`` samples)."""

    index: int
    text: str = ""
    finish_reason: str | None = None
    logprobs: dict[str, Any] | None = None


def completion_logprobs(entries: list[TokenLogprob], decode: Callable[[int], str], offset: int) -> dict[str, Any]:
    """The completions endpoint's logprobs object for these tokens; ``offset``: characters of the
    choice's text before them (``text_offset`` counts from there). The chosen token is always in
    its position's ``top_logprobs``, so there may be one more than asked (as in vLLM)."""
    tokens = [decode(e.token_id) for e in entries]
    offsets = []
    for t in tokens:
        offsets.append(offset)
        offset += len(t)
    return {"tokens": tokens, "token_logprobs": [e.logprob for e in entries],
            "top_logprobs": [{decode(t): lp for t, lp in e.top} | {tok: e.logprob} for e, tok in zip(entries, tokens)],
            "text_offset": offsets}


def chat_logprobs(entries: list[TokenLogprob], decode: Callable[[int], str]) -> dict[str, Any]:
    """The chat endpoint's logprobs object: per token its text, log-probability, UTF-8 bytes and
    the ``top_logprobs`` alternatives."""
    def item(token_id: int, logprob: float) -> dict[str, Any]:
        token = decode(token_id)
        return {"token": token, "logprob": logprob, "bytes": list(token.encode())}

    return {"content": [item(e.token_id, e.logprob) | {"top_logprobs": [item(t, lp) for t, lp in e.top]}
                        for e in entries], "refusal": None}


def merge_logprobs(chat: bool, parts: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The logprobs objects of a choice's chunks as one (non-streamed responses)."""
    if not parts:
        return None
    if chat:
        return {"content": [c for p in parts for c in p["content"]], "refusal": None}
    return {k: [v for p in parts for v in p[k]] for k in ("tokens", "token_logprobs", "top_logprobs", "text_offset")}


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

    def full(self, choices: list[Choice], prompt_tokens: int, completion_tokens: int) -> dict[str, Any]:
        out = []
        for c in sorted(choices, key=lambda c: c.index):
            choice: dict[str, Any] = {"index": c.index, "logprobs": c.logprobs, "finish_reason": c.finish_reason}
            if self.chat:
                choice["message"] = {"role": "assistant", "content": c.text}
            else:
                choice["text"] = c.text
            out.append(choice)
        return {**self._head(False), "choices": out, "usage": usage(prompt_tokens, completion_tokens)}

    def chunk(self, text: str, finish_reason: str | None, first: bool = False, index: int = 0,
              logprobs: dict[str, Any] | None = None) -> dict[str, Any]:
        choice: dict[str, Any] = {"index": index, "logprobs": logprobs, "finish_reason": finish_reason}
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
