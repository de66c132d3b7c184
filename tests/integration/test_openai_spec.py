"""The gateway against the OpenAI API's own request types (the official ``openai`` package's
``CompletionCreateParams`` / chat ``CompletionCreateParams``): every field the spec declares
nullable takes null as its default, every field is known (served, or refused by name), and every
range the spec gives is the range accepted. Inputs that cannot be honoured get a 4xx naming them."""

from __future__ import annotations

import math
import types
import typing

import pytest
from openai.types import completion_create_params
from openai.types.chat import completion_create_params as chat_create_params

from tests.integration.conftest import Stack
from tests.integration.test_gateway import post

ENDPOINTS = {
    "/v1/completions": (
        completion_create_params.CompletionCreateParamsBase,
        {"model": "lora-0", "prompt": "kalo remi", "max_tokens": 2},
    ),
    "/v1/chat/completions": (
        chat_create_params.CompletionCreateParamsBase,
        {"model": "lora-0", "messages": [{"role": "user", "content": "kalo"}], "max_tokens": 2},
    ),
}
REQUIRED = {"model", "prompt", "messages"}
# The OpenAPI document's minimum and maximum for each numeric field (createCompletionRequest,
# createChatCompletionRequest), written down here apart from the gateway's own table.
SPEC_RANGES = {
    "/v1/completions": {
        "temperature": (0.0, 2.0),
        "top_p": (0.0, 1.0),
        "n": (1, 128),
        "best_of": (0, 20),
        "presence_penalty": (-2.0, 2.0),
        "frequency_penalty": (-2.0, 2.0),
        "logprobs": (0, 5),
        "max_tokens": (0, math.inf),
    },
    "/v1/chat/completions": {
        "temperature": (0.0, 2.0),
        "top_p": (0.0, 1.0),
        "n": (1, 128),
        "presence_penalty": (-2.0, 2.0),
        "frequency_penalty": (-2.0, 2.0),
        "top_logprobs": (0, 20),
    },
}


def _fields(params: type) -> dict[str, object]:
    return typing.get_type_hints(params, include_extras=True)


def _nullable(annotation: object) -> bool:
    args = typing.get_args(annotation)
    if typing.get_origin(annotation) in (typing.Required, typing.NotRequired):
        return _nullable(args[0])
    return typing.get_origin(annotation) in (typing.Union, types.UnionType) and type(None) in args


def _range_error(resp: dict, field: str) -> bool:
    message = resp.get("error", {}).get("message", "")
    return field in message and "must be" in message


@pytest.mark.parametrize("path", ENDPOINTS)
async def test_every_spec_field_is_known_and_null_means_the_default(stack: Stack, path: str) -> None:
    params, base = ENDPOINTS[path]
    fields = {k: v for k, v in _fields(params).items() if k not in REQUIRED}
    assert len(fields) > 10  # the walk covers the spec, not an empty type
    failures = []
    for field, annotation in fields.items():
        status, resp = await post(stack, path, {**base, field: None})
        message = resp.get("error", {}).get("message", "")
        if "unknown field" in message:
            failures.append(f"{field}: not known to the gateway ({message})")
        elif _nullable(annotation) and status != 200:
            failures.append(f"{field}: nullable in the spec, but null gave {status} {message}")
    assert not failures, "\n".join(failures)


@pytest.mark.parametrize("path", ENDPOINTS)
async def test_the_spec_ranges_are_the_accepted_ranges(stack: Stack, path: str) -> None:
    params, base = ENDPOINTS[path]
    ranges = SPEC_RANGES[path]
    assert set(ranges) <= set(_fields(params))  # the table names fields the spec has
    if path == "/v1/chat/completions":
        base = {**base, "logprobs": True}  # top_logprobs needs it
    for field, (low, high) in ranges.items():
        integral = isinstance(low, int) and not isinstance(low, bool) and field not in ("temperature", "top_p")
        step = 1 if integral else 0.01
        inside = [low] + ([high] if high != math.inf else [])
        outside = [low - step] + ([high + step] if high != math.inf else [])
        for value in inside:  # served, or refused as a feature, never as out of range
            status, resp = await post(stack, path, {**base, field: value})
            message = resp.get("error", {}).get("message", "")
            # best_of other than n; best_of 0, below n, as vLLM refuses it
            feature = "not supported" in message or "greater than or equal to n" in message
            assert status == 200 or (status == 400 and feature and f"{field} must be in" not in message), (
                field,
                value,
                resp,
            )
        for value in outside:
            status, resp = await post(stack, path, {**base, field: value})
            assert status == 400 and _range_error(resp, field), (field, value, resp)


async def test_the_issue_examples(stack: Stack) -> None:
    base = ENDPOINTS["/v1/completions"][1]
    assert (await post(stack, "/v1/completions", {**base, "temperature": None}))[0] == 200
    status, resp = await post(stack, "/v1/completions", {**base, "top_p": 0, "temperature": 1})
    assert status == 200 and resp["usage"]["completion_tokens"] == 2


async def test_input_that_cannot_be_honoured_is_refused_by_name(stack: Stack) -> None:
    chat = ENDPOINTS["/v1/chat/completions"][1]
    image = {
        "role": "user",
        "content": [
            {"type": "text", "text": "what is this"},
            {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}},
        ],
    }
    cases = [
        ("/v1/chat/completions", {**chat, "messages": [image]}, "image_url"),
        (
            "/v1/chat/completions",
            {
                **chat,
                "messages": [
                    {
                        "role": "user",
                        "content": [{"type": "input_audio", "input_audio": {"data": "AAAA", "format": "wav"}}],
                    }
                ],
            },
            "input_audio",
        ),
        ("/v1/chat/completions", {**chat, "tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
        ("/v1/chat/completions", {**chat, "modalities": ["text", "audio"]}, "modalities"),
        ("/v1/completions", {**ENDPOINTS["/v1/completions"][1], "suffix": "end"}, "suffix"),
        ("/v1/completions", {**ENDPOINTS["/v1/completions"][1], "bogus_option": 1}, "bogus_option"),
        ("/v1/chat/completions", {**chat, "messages": [{"role": "user", "content": "x", "weird": 1}]}, "weird"),
    ]
    for path, body, name in cases:
        status, resp = await post(stack, path, body)
        assert 400 <= status < 500 and name in resp["error"]["message"], (name, status, resp)
    # an assistant's earlier tool call, and the tool's answer, are part of a conversation
    call = {"id": "1", "type": "function", "function": {"name": "f", "arguments": "{}"}}
    history = [
        {"role": "user", "content": "x"},
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "1", "content": "y"},
    ]
    assert (await post(stack, "/v1/chat/completions", {**chat, "messages": history}))[0] == 200
    # metadata that changes no token is accepted
    status, _ = await post(
        stack,
        "/v1/chat/completions",
        {**chat, "metadata": {"k": "v"}, "store": False, "user": "u", "service_tier": "auto"},
    )
    assert status == 200
