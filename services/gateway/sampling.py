"""A request body's sampling fields as the engine's ``SamplingParams``: the spec's ranges, the
fields dlora cannot honour (refused by name), logit_bias keys, response_format as a JSON Schema.
Pure: no I/O."""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from typing import Any

from dlora.common.messages import SamplingParams
from dlora.services.gateway.openai import APIError, Body, CompletionBody
from dlora.services.worker.engine.structured import JSON_OBJECT_SCHEMA, GrammarError, Grammars, check_schema

# The spec's ranges (OpenAI OpenAPI document, createCompletion / createChatCompletion requests).
RANGES: dict[str, tuple[float, float]] = {
    "temperature": (0.0, 2.0),
    "top_p": (0.0, 1.0),
    "n": (1, 128),
    "presence_penalty": (-2.0, 2.0),
    "frequency_penalty": (-2.0, 2.0),
    "best_of": (0, 20),
    "top_logprobs": (0, 20),
    "max_tokens": (0, math.inf),  # 0: a completion's echo alone
    "max_completion_tokens": (1, math.inf),
}
# The completions endpoint's logprobs is a count in [0, 5]; the chat endpoint's is a flag.
_COMPLETION_LOGPROBS = (0, 5)


def _check_ranges(body: Body) -> None:
    ranges = dict(RANGES)
    if isinstance(body, CompletionBody):
        ranges["logprobs"] = _COMPLETION_LOGPROBS
    else:  # a chat completion generates a token at least (only a completion's echo asks for none)
        ranges |= {"max_tokens": (1, math.inf), "max_completion_tokens": (1, math.inf)}
    for name, (low, high) in ranges.items():
        value = getattr(body, name, None)
        if value is not None and not low <= value <= high:
            span = f">= {low}" if high == math.inf else f"in [{low}, {high}]"
            raise APIError(400, f"{name} must be {span}, got {value}", param=name)


def _unsupported(body: Body) -> list[tuple[str, bool]]:
    """(what, set to something dlora cannot honour) for every field of the spec it does not serve;
    ``what`` begins with the field's name."""
    out: list[tuple[str, bool]] = []
    if isinstance(body, CompletionBody):
        out += [
            ("best_of other than n", (body.best_of or body.n or 1) != (body.n or 1)),
            ("suffix", body.suffix is not None),
        ]
    else:
        out += [
            ("top_logprobs without logprobs: true", body.top_logprobs is not None and not body.logprobs),
            ("tools", bool(body.tools)),
            ("tool_choice", body.tool_choice not in (None, "none", "auto")),
            ("functions", bool(body.functions)),
            ("function_call", body.function_call not in (None, "none", "auto")),
            ("audio", body.audio is not None),
            ("modalities", (body.modalities or ["text"]) != ["text"]),
            ("prediction", body.prediction is not None),
            ("web_search_options", body.web_search_options is not None),
            ("reasoning_effort", body.reasoning_effort is not None),
            ("verbosity", body.verbosity is not None),
            ("moderation", body.moderation is not None),
            ("prompt_cache_options", body.prompt_cache_options is not None),
        ]
    return out


def json_schema(response_format: Any, grammars: Grammars | None = None) -> str | None:
    """The JSON Schema (JSON text) a chat ``response_format`` asks for: None for text, any object
    for ``json_object``, the given ``json_schema.schema`` otherwise; checked by llguidance, and
    with ``grammars`` (the model's tokenizer's) as far as a worker's first mask.

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
        raise APIError(
            400, f"response_format type {kind!r} is not one of text, json_object, json_schema", param="response_format"
        )
    spec = response_format.get("json_schema")
    schema = spec.get("schema") if isinstance(spec, dict) else None
    if not isinstance(schema, dict):
        raise APIError(400, "response_format json_schema needs a 'schema' object", param="response_format")
    text = json.dumps(schema)
    try:
        if grammars is None:
            check_schema(text)
        else:  # tried as a worker will: one of nothing but a reference to itself passes the
            grammars.matcher(text, [])  # grammar's check and fails at its first mask
    except GrammarError as e:
        raise APIError(400, str(e), param="response_format") from None
    return text


_TOKEN_ID = re.compile(r"-?[0-9]{1,19}")  # int() refuses a string of over 4,300 digits (a 500)


def _logit_bias(raw: dict[str, float] | None) -> dict[int, float]:
    """OpenAI's logit_bias, its keys (token ids written as JSON strings) as integers.

    Raises:
        APIError(400): a key that is not an integer.
    """
    if bad := [k for k in raw or {} if not _TOKEN_ID.fullmatch(k)]:
        raise APIError(400, f"logit_bias keys must be token ids (integers), got {bad[0]!r}", param="logit_bias")
    return {int(k): v for k, v in (raw or {}).items()}


def sampling_params(
    body: Body, max_tokens: int, grammars: Grammars | None = None, defaults: Mapping[str, float] | None = None
) -> SamplingParams:
    """The engine's parameters for a request body (null fields at their defaults: the model's,
    ``defaults`` from its generation_config.json, where it has them); ``grammars``: the model's
    structured-output matchers, which try a response_format schema as a worker will.

    Raises:
        APIError(400): a value outside the spec's range, or a field dlora cannot honour, named.
    """
    _check_ranges(body)
    for what, unsupported in _unsupported(body):
        if unsupported:
            raise APIError(400, f"{what} is not supported (only its default)", param=what.split()[0])
    stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    if body.allowed_token_ids == []:  # as vLLM refuses it: nothing could be sampled
        raise APIError(400, "allowed_token_ids must not be empty", param="allowed_token_ids")
    model = defaults or {}

    def given(value: float | None, name: str, default: float) -> float:
        return value if value is not None else model.get(name, default)

    params = SamplingParams(
        max_tokens=max_tokens,
        temperature=given(body.temperature, "temperature", 1.0),
        top_p=given(body.top_p, "top_p", 1.0),
        top_k=int(given(body.top_k, "top_k", 0)),
        min_p=given(body.min_p, "min_p", 0.0),
        seed=body.seed,
        stop=stop,
        stop_token_ids=body.stop_token_ids or [],
        ignore_eos=bool(body.ignore_eos),
        skip_special_tokens=True if body.skip_special_tokens is None else body.skip_special_tokens,
        include_stop_str_in_output=bool(body.include_stop_str_in_output),
        min_tokens=body.min_tokens or 0,
        logit_bias=_logit_bias(body.logit_bias),
        presence_penalty=body.presence_penalty or 0.0,
        frequency_penalty=body.frequency_penalty or 0.0,
        repetition_penalty=given(body.repetition_penalty, "repetition_penalty", 1.0),
        prompt_logprobs=body.logprobs if isinstance(body, CompletionBody) and body.echo else None,
        logprobs=body.logprobs
        if isinstance(body, CompletionBody)
        else ((body.top_logprobs or 0) if body.logprobs else None),
        json_schema=None if isinstance(body, CompletionBody) else json_schema(body.response_format, grammars),
        allowed_token_ids=body.allowed_token_ids or [],
        bad_words=body.bad_words or [],
    )
    if (bad := params.invalid()) is not None:
        raise APIError(400, bad[1], param=bad[0])
    return params
