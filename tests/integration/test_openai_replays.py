"""Public vLLM and SGLang bug reports on /v1/chat/completions and /v1/completions, replayed through
the gateway against the real stack: each test names its reports and checks the answer OpenAI
documents, or vLLM gives after its fix, or a 400 naming the field."""

from __future__ import annotations

from typing import Any

import pytest

from tests.integration.conftest import Stack
from tests.integration.test_gateway import post, stream

COMPLETION = {"model": "lora-0", "prompt": "kalo remi", "max_tokens": 3, "temperature": 0}
CHAT = {"model": "lora-0", "messages": [{"role": "user", "content": "kalo remi"}], "max_tokens": 3, "temperature": 0}
# The random model writes exactly this when led by a regex: a 4-byte, a 3-byte and a 2-byte
# character, each split over byte-fallback tokens (<0xF0> <0x9F> <0x98> <0x80> ...).
MULTIBYTE = "😀日é"


def _chat_text(events: list[Any]) -> str:
    return "".join(e["choices"][0]["delta"].get("content") or "" for e in events[:-1] if e["choices"])


def _text(events: list[Any]) -> str:
    return "".join(e["choices"][0]["text"] for e in events[:-1] if e["choices"])


async def test_a_stream_writes_the_text_a_whole_answer_holds(stack: Stack) -> None:
    """vLLM #931 and #937 (streamed Chinese and emoji arrived as U+FFFD pairs, whole answers were
    right): a character split over tokens comes in one delta once complete, never as U+FFFD, and
    the deltas join to the whole answer, for chat and completions. vLLM #11089 (text held back
    while a stop string may be forming): the held text comes out, the stop string never does."""
    regex = {"max_tokens": 12, "structured_outputs": {"regex": MULTIBYTE}}
    status, whole = await post(stack, "/v1/chat/completions", CHAT | regex)
    assert status == 200 and whole["choices"][0]["message"]["content"] == MULTIBYTE, whole
    events = await stream(stack, "/v1/chat/completions", CHAT | regex)
    deltas = [e["choices"][0]["delta"].get("content") or "" for e in events[:-1] if e["choices"]]
    assert "\ufffd" not in "".join(deltas) and [d for d in deltas if d] == list(MULTIBYTE), deltas
    status, whole = await post(stack, "/v1/completions", COMPLETION | regex)
    assert status == 200 and whole["choices"][0]["text"] == MULTIBYTE, whole
    assert _text(await stream(stack, "/v1/completions", COMPLETION | regex)) == MULTIBYTE
    # stop strings: one never written (all held text flushed), one written (cut, named)
    for stop, reason in ((["zzz"], None), (["ta"], "ta")):
        body = COMPLETION | {"max_tokens": 6, "stop": stop}
        status, whole = await post(stack, "/v1/completions", body)
        assert status == 200, whole
        events = await stream(stack, "/v1/completions", body)
        assert _text(events) == whole["choices"][0]["text"]
        assert reason is None or reason not in whole["choices"][0]["text"]
        last = events[-2]["choices"][0]
        assert (last["finish_reason"], last["stop_reason"]) == (whole["choices"][0]["finish_reason"], reason)
        assert last["finish_reason"] == ("stop" if reason else "length")


async def test_logprobs_answer_in_openais_shape(stack: Stack) -> None:
    """vLLM #4795 and SGLang #4440 (chat ``logprobs: true`` without ``top_logprobs`` was an error):
    each token's logprob with ``top_logprobs: []``, as OpenAI answers, whole and streamed;
    ``top_logprobs`` without ``logprobs`` is refused naming it (vLLM's rule). vLLM #1967 (a
    completions stream broke on some of echo x logprobs): all four give the whole answer's text,
    logprobs exactly when asked, the prompt's first token's logprob null."""
    status, whole = await post(stack, "/v1/chat/completions", CHAT | {"logprobs": True})
    assert status == 200, whole
    content = whole["choices"][0]["logprobs"]["content"]
    assert len(content) == whole["usage"]["completion_tokens"] == 3
    assert all(e["top_logprobs"] == [] and e["logprob"] <= 0 and e["bytes"] for e in content), content
    events = await stream(stack, "/v1/chat/completions", CHAT | {"logprobs": True})
    parts = [e["choices"][0]["logprobs"] for e in events[:-1] if e["choices"]]
    streamed = [x for p in parts if p for x in p["content"]]
    # the same tokens; logprobs to float rounding (the stream's prompt comes from the prefix cache)
    assert [{**e, "logprob": pytest.approx(e["logprob"], abs=1e-5)} for e in content] == streamed
    status, refused = await post(stack, "/v1/chat/completions", CHAT | {"top_logprobs": 2})
    assert status == 400 and refused["error"]["param"] == "top_logprobs", refused
    for echo in (False, True):
        for logprobs in (None, 1):
            body = COMPLETION | {"echo": echo, "logprobs": logprobs}
            status, whole = await post(stack, "/v1/completions", body)
            assert status == 200, whole
            events = await stream(stack, "/v1/completions", body)
            assert _text(events) == whole["choices"][0]["text"]
            assert whole["choices"][0]["text"].startswith(COMPLETION["prompt"]) == echo
            parts = [e["choices"][0]["logprobs"] for e in events[:-1] if e["choices"]]
            if logprobs is None:
                assert whole["choices"][0]["logprobs"] is None and parts == [None] * len(parts)
                continue
            tokens = [t for p in parts for t in p["token_logprobs"]]
            assert tokens == pytest.approx(whole["choices"][0]["logprobs"]["token_logprobs"], abs=1e-5)
            assert len(tokens) == 3 + echo * whole["usage"]["prompt_tokens"] and (tokens[0] is None) == echo


async def test_an_empty_prompt_is_refused_and_the_workers_serve_on(stack: Stack) -> None:
    """vLLM #7632 and #7283 (``prompt: [""]`` failed an assert in the engine and took the server
    down): an empty prompt, in each form, and empty messages are a 400 naming the field, and the
    next request is served."""
    for path, body, field in (
        ("/v1/completions", COMPLETION | {"prompt": ""}, "prompt"),
        ("/v1/completions", COMPLETION | {"prompt": [""]}, "prompt"),
        ("/v1/completions", COMPLETION | {"prompt": [[]]}, "prompt"),
        ("/v1/completions", COMPLETION | {"prompt": []}, "prompt"),
        ("/v1/chat/completions", CHAT | {"messages": []}, "messages"),
    ):
        status, refused = await post(stack, path, body)
        assert status == 400 and refused["error"]["param"] == field, (body, refused)
        status, served = await post(stack, path, body | {"prompt": "kalo"} if field == "prompt" else CHAT)
        assert status == 200 and served["usage"]["completion_tokens"] == 3, served


async def test_continue_final_message_writes_on_from_the_assistants_text(stack: Stack) -> None:
    """vLLM #10111 (with ``continue_final_message`` the answer repeated the assistant's text though
    ``echo`` was false) and #19285 (the same request with ``echo`` twice, the second from the prefix
    cache, crashed the server): without echo the answer is the new text alone, with echo that text
    after the assistant's, the same both times. vLLM #8942's check: it and
    ``add_generation_prompt`` both true is a 400."""
    prefill = "kalo"
    body = CHAT | {"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": prefill}]}
    body |= {"continue_final_message": True, "add_generation_prompt": False}
    status, plain = await post(stack, "/v1/chat/completions", body)
    assert status == 200, plain
    new = plain["choices"][0]["message"]["content"]
    for _ in range(2):
        status, echoed = await post(stack, "/v1/chat/completions", body | {"echo": True})
        assert status == 200 and echoed["choices"][0]["message"]["content"] == prefill + new, echoed
    assert _chat_text(await stream(stack, "/v1/chat/completions", body | {"echo": True})) == prefill + new
    status, refused = await post(stack, "/v1/chat/completions", body | {"add_generation_prompt": True})
    assert status == 400 and refused["error"]["param"] == "continue_final_message", refused
