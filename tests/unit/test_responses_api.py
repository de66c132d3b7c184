"""The Responses API's body read as the chat that serves it (services/gateway/responses_api.py): the
refusals a body gets before the chat's checks, and the chat's named by the Responses fields. The
rest is tested through the real stack in tests/integration/test_responses_api.py."""

from __future__ import annotations

import json
from typing import Any

import msgspec
import pytest

from dlora.services.gateway import sampling
from dlora.services.gateway.openai import APIError, ChatBody
from dlora.services.gateway.responses_api import decode, renamed


def _refused(body: dict[str, Any]) -> APIError:
    with pytest.raises(APIError) as e:
        decode(json.dumps({"model": "m"} | body).encode())
    assert e.value.status == 400
    return e.value


def test_a_chat_refusal_of_the_named_function_is_named_by_the_responses_field() -> None:
    """A named tool_choice is flat in the Responses body ({"type": "function", "name": ...}) and
    nested in the chat's: a refusal naming tool_choice.function.name kept the chat's name, which
    the Responses body has not (tools[k].function.* were renamed, tool_choice's not)."""
    e = renamed(APIError(400, "tool_choice.function.name: must name a tool", param="tool_choice.function.name"))
    assert (e.param, e.message) == ("tool_choice.name", "tool_choice.name: must name a tool")
    assert renamed(APIError(400, "x", param="tool_choice")).param == "tool_choice"


def test_a_named_tool_choice_whose_name_is_no_string_is_refused_in_the_responses_shape() -> None:
    """It went on to the chat's check, whose refusal spelled the chat's nested shape
    ({"function": {"name": ...}}), a field the Responses body refuses."""
    tools = [{"type": "function", "name": "f", "parameters": {}}]
    e = _refused({"input": "x", "tools": tools, "tool_choice": {"type": "function", "name": 5}})
    assert e.param == "tool_choice" and '"function": {' not in e.message and '"name": ...' in e.message


@pytest.mark.parametrize("stream", [None, False])
def test_stream_options_without_stream_are_refused_as_the_chats(stream: bool | None) -> None:
    """The chat refuses stream_options without stream (as OpenAI and vLLM do); the Responses body
    took them silently, and they did nothing."""
    body = {"input": "x", "stream_options": {"include_obfuscation": False}}
    e = _refused(body | ({"stream": stream} if stream is not None else {}))
    assert (e.param, e.message) == ("stream_options", "stream_options is only allowed when stream is true")
    assert decode(json.dumps(body | {"stream": True}).encode())[1].stream


@pytest.mark.parametrize(
    ("item", "param", "what"),
    [
        ({"role": "user", "content": [{"type": "input_image", "image_url": "data:x"}]}, "input[0].content[0]", "image"),
        (
            {"role": "user", "content": [{"type": "input_text", "text": "a"}, {"type": "input_file", "file_id": "f"}]},
            "input[0].content[1]",
            "file",
        ),
        (
            {"type": "function_call_output", "call_id": "c", "output": [{"type": "input_image", "file_id": "f"}]},
            "input[0].output[0]",
            "image",
        ),
    ],
)
def test_an_image_or_file_part_is_refused_by_what_is_not_served(item: dict[str, Any], param: str, what: str) -> None:
    """It was refused by msgspec's "unknown field image_url" (or file_id): a client read a malformed
    body, not that the model reads text only."""
    e = _refused({"input": [item]})
    assert e.param == param and "unknown field" not in e.message, e.message
    assert e.message.startswith(f"{param}: {what} inputs") and "reads text only" in e.message


def test_chat_template_kwargs_reach_the_chat_as_vllms_responses_request_takes_them() -> None:
    """vLLM's ResponsesRequest takes chat_template_kwargs (vllm#43761) and hands them to the
    template and the reasoning parser: a Responses client of DeepSeek V3.1 (``deepseek_v3``, whose
    template thinks only when told ``thinking``) or of Qwen3 (``enable_thinking``) had no way to
    say so here, the body refusing it as an unknown field."""
    kwargs = {"thinking": True, "enable_thinking": False}
    body, chat = decode(json.dumps({"model": "m", "input": "x", "chat_template_kwargs": kwargs}).encode())
    assert body.chat_template_kwargs == kwargs and chat.chat_template_kwargs == kwargs
    assert decode(b'{"input": "x"}')[1].chat_template_kwargs is None


def test_an_answers_lone_reasoning_stays_before_the_next_users_message() -> None:
    """An answer cut short while thinking is one reasoning item; sent back (or put before the next
    input by previous_response_id) with the user's next message after it, the reasoning went to an
    assistant message after that user message, as if the model had answered the new question."""
    thought = {"type": "reasoning", "id": "rs_1", "summary": [], "content": [{"type": "reasoning_text", "text": "hm"}]}
    given = [{"role": "user", "content": "kalo"}, thought, {"role": "user", "content": "remi"}]
    _, chat = decode(json.dumps({"input": given}).encode())
    said = [(m.role, m.content, m.reasoning) for m in chat.messages]
    assert said == [("user", "kalo", None), ("assistant", "", "hm"), ("user", "remi", None)]
    # before an answer's message or call it stays that message's reasoning
    answer = {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "ok"}]}
    _, chat = decode(json.dumps({"input": [given[0], thought, answer]}).encode())
    assert [(m.role, m.reasoning) for m in chat.messages] == [("user", None), ("assistant", "hm")]


@pytest.mark.parametrize("value", ["in_memory", "24h", "in-memory", None])
def test_a_prompt_cache_retention_openai_takes_is_taken_by_the_chat_and_responses(value: str | None) -> None:
    """OpenAI's values (its API's in_memory and 24h), and "in-memory", which openai-python's types
    spelled: taken and echoed, as no policy changes what is cached here."""
    chat = msgspec.convert({"messages": [{"role": "user", "content": "x"}], "prompt_cache_retention": value}, ChatBody)
    assert sampling.sampling_params(chat, 7).max_tokens == 7
    _, served = decode(json.dumps({"model": "m", "input": "x", "prompt_cache_retention": value}).encode())
    assert served.prompt_cache_retention == value
    assert sampling.sampling_params(served, 7).max_tokens == 7


@pytest.mark.parametrize("value", ["forever", "1h", "", "IN_MEMORY"])
def test_a_prompt_cache_retention_openai_refuses_is_a_400_naming_it(value: str) -> None:
    """It was echoed whatever it said; OpenAI answers 400 in these words."""
    why = f"Invalid value: {value!r}. Supported values are: 'in_memory' and '24h'."
    chat = msgspec.convert({"messages": [{"role": "user", "content": "x"}], "prompt_cache_retention": value}, ChatBody)
    with pytest.raises(APIError) as e:
        sampling.sampling_params(chat, 7)
    assert (e.value.status, e.value.message, e.value.param) == (400, why, "prompt_cache_retention")
    _, served = decode(json.dumps({"model": "m", "input": "x", "prompt_cache_retention": value}).encode())
    with pytest.raises(APIError) as e:
        sampling.sampling_params(served, 7)
    assert (renamed(e.value).message, renamed(e.value).param) == (why, "prompt_cache_retention")


def test_a_null_max_output_tokens_leaves_the_chat_both_max_tokens_null() -> None:
    """As vLLM's Responses: null is the context's rest, which the chat's shaping gives a chat whose
    max_tokens and max_completion_tokens are null (``test_gateway_shaping``); 16 is a completion's."""
    for body in ({"input": "x", "max_output_tokens": None}, {"input": "x"}):
        _, served = decode(json.dumps({"model": "m"} | body).encode())
        assert (served.max_tokens, served.max_completion_tokens) == (None, None)
    _, served = decode(json.dumps({"model": "m", "input": "x", "max_output_tokens": 16.0}).encode())
    assert served.max_completion_tokens == 16 and type(served.max_completion_tokens) is int


def test_every_include_openai_documents_is_served_taken_or_refused_by_name() -> None:
    """``reasoning.encrypted_content`` was a 400: Codex sends it with each stateless request. vLLM
    takes it and answers no encrypted content; so does dlora, which keeps no reasoning state. The
    rest are served (logprobs) or refused naming the value and why; an unknown one lists them."""
    from typing import get_args

    from openai.types.responses import ResponseIncludable

    documented = get_args(ResponseIncludable)
    assert "reasoning.encrypted_content" in documented and "message.output_text.logprobs" in documented
    for name in documented:
        body = {"model": "m", "input": "x", "include": [name]}
        if name in ("reasoning.encrypted_content", "message.output_text.logprobs"):
            assert decode(json.dumps(body).encode())[0].include == [name]
            continue
        e = _refused(body)
        assert e.param == "include" and e.message.startswith(f"include {name!r} is not supported: "), e.message
    e = _refused({"input": "x", "include": ["reasoning.plain"]})
    assert "not a value OpenAI documents" in e.message and "file_search_call.results" in e.message
