"""More public vLLM and SGLang reports on /v1/completions and /v1/chat/completions, replayed
through the gateway against the real stack, a few per test (one stack each): the answer OpenAI
documents, or vLLM gives, or a 400 naming the field, and the next request served."""

from __future__ import annotations

from typing import Any

from tests.integration.conftest import Stack
from tests.integration.test_gateway import post, stream

COMPLETION = {"model": "lora-0", "prompt": "kalo remi", "max_tokens": 8, "temperature": 0}
CHAT = {"model": "lora-0", "messages": [{"role": "user", "content": "kalo remi"}], "max_tokens": 4, "temperature": 0}


def _usages(events: list[Any]) -> list[Any]:
    return [e.get("usage") for e in events[:-1]]


async def test_usage_comes_once_at_the_end_and_counts_every_choice(stack: Stack) -> None:
    """vLLM #7262 (``include_usage`` put a usage in every chunk): only the last event, with no
    choices, carries it (``continuous_usage_stats`` asks for the others). vLLM #8625 (streamed
    usage miscounted completion_tokens): with n = 2 it counts both choices' tokens and the prompt
    once, as the whole answer's usage does. vLLM #6521 (``echo`` with ``max_tokens: 0`` and
    ``logprobs`` took the server down): the prompt and its logprobs alone, and the next request
    served."""
    for path, body in (("/v1/chat/completions", CHAT), ("/v1/completions", COMPLETION)):
        asked = body | {"n": 2, "max_tokens": 4, "ignore_eos": True, "stream_options": {"include_usage": True}}
        events = await stream(stack, path, asked)
        usages = _usages(events)
        assert usages[-1] is not None and not events[-2]["choices"] and not any(usages[:-1]), usages
        status, whole = await post(stack, path, {k: v for k, v in asked.items() if k != "stream_options"})
        counts = ("prompt_tokens", "completion_tokens", "total_tokens")  # (the second hits the prefix cache)
        assert status == 200 and [usages[-1][k] for k in counts] == [whole["usage"][k] for k in counts], whole
        status, one = await post(stack, path, body | {"max_tokens": 1})
        assert (
            whole["usage"]["completion_tokens"] == 2 * 4
            and whole["usage"]["prompt_tokens"] == one["usage"]["prompt_tokens"]
        )
    echo = COMPLETION | {"echo": True, "max_tokens": 0, "logprobs": 1}
    status, answer = await post(stack, "/v1/completions", echo)
    assert status == 200 and answer["choices"][0]["text"] == COMPLETION["prompt"], answer
    lp = answer["choices"][0]["logprobs"]
    assert lp["token_logprobs"][0] is None and len(lp["tokens"]) == answer["usage"]["prompt_tokens"]
    assert answer["usage"]["completion_tokens"] == 0 and answer["choices"][0]["finish_reason"] == "length"
    status, served = await post(stack, "/v1/completions", COMPLETION)
    assert status == 200 and served["usage"]["completion_tokens"] == 8, served


async def test_stops_seeds_and_logit_bias_as_vllm_takes_them(stack: Stack) -> None:
    """vLLM #1973 and #2976 (which stop string ended it; kept with ``include_stop_str_in_output``)
    and #3672 (a stop string cut wrong, a stop token's text): the output ends before the stop
    string of a list that came first, ``stop_reason`` names it, and a stop token id ends the
    output with it. vLLM #7808 (independent samples of one seeded request): n choices of a
    ``seed`` differ, and the same request gives them again. vLLM #16529 and SGLang #7670 (a
    logit_bias id past the vocabulary crashed the engine): a 400 naming logit_bias; vLLM #1045
    (langchain sends ``logit_bias: {}``): taken; vLLM #3027 (a bias past -100 clamped): -1000
    bans the token, as -100 does."""
    status, full = await post(stack, "/v1/completions", COMPLETION | {"return_token_ids": True})
    assert status == 200, full
    text, ids = full["choices"][0]["text"], full["choices"][0]["token_ids"]
    stop = text[3:5]
    cut = text.index(stop)
    for include in (False, True):
        body = COMPLETION | {"stop": ["never said", stop], "include_stop_str_in_output": include}
        status, stopped = await post(stack, "/v1/completions", body)
        choice = stopped["choices"][0]
        assert (choice["finish_reason"], choice["stop_reason"]) == ("stop", stop), choice
        assert choice["text"] == text[: cut + len(stop) * include], (choice["text"], text)
    status, stopped = await post(stack, "/v1/completions", COMPLETION | {"stop_token_ids": [ids[2]]})
    choice = stopped["choices"][0]
    assert (choice["finish_reason"], choice["stop_reason"]) == ("stop", ids[2]), choice
    assert stopped["usage"]["completion_tokens"] == ids.index(ids[2]) + 1 and text.startswith(choice["text"])
    seeded = COMPLETION | {"temperature": 1.0, "seed": 5, "n": 3}
    status, first = await post(stack, "/v1/completions", seeded)
    status, again = await post(stack, "/v1/completions", seeded)
    texts = [c["text"] for c in first["choices"]]
    assert len(set(texts)) > 1 and texts == [c["text"] for c in again["choices"]], (texts, again)
    for path, body in (("/v1/completions", COMPLETION), ("/v1/chat/completions", CHAT)):
        status, refused = await post(stack, path, body | {"logit_bias": {"191222": -100, "5": 5}})
        assert status == 400 and refused["error"]["param"] == "logit_bias", refused
        status, served = await post(stack, path, body | {"logit_bias": {}})
        assert status == 200 and served["usage"]["completion_tokens"] > 0, served
    banned = COMPLETION | {"logit_bias": {str(ids[0]): -1000}, "return_token_ids": True}
    status, other = await post(stack, "/v1/completions", banned)
    assert status == 200 and ids[0] not in other["choices"][0]["token_ids"], other


async def test_requests_vllm_refuses_are_400s_naming_the_field(stack: Stack) -> None:
    """vLLM #42474 and #19861 (max_tokens past what the context leaves: vLLM answers 400, not a
    clamp): a 400 naming the field asked, in vLLM's words. vLLM #11629 (an image_url to a text
    model was a 500) and QwenLM/Qwen3-VL #213 (Qwen's ``{"type": "image"}`` part): a 400 naming
    messages. vLLM #9976 and SGLang #3429 (``suffix``, fill-in-the-middle, unserved): a 400
    naming it, never a completion that ignores it. Each time the next request is served."""
    context = 512  # the tiny model's
    for path, body, field in (
        ("/v1/completions", COMPLETION | {"max_tokens": context}, "max_tokens"),
        ("/v1/chat/completions", CHAT | {"max_tokens": context}, "max_tokens"),
        ("/v1/chat/completions", CHAT | {"max_completion_tokens": context + 1}, "max_completion_tokens"),
        ("/v1/completions", COMPLETION | {"suffix": "\n}"}, "suffix"),
    ):
        status, refused = await post(stack, path, body)
        assert status == 400 and refused["error"]["param"] == field, (body, refused)
        if field != "suffix":
            assert f"maximum context length is {context} tokens" in refused["error"]["message"], refused
    parts = [
        {"type": "text", "text": "what is this"},
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}},
    ]
    for content in (parts, [{"type": "input_audio", "input_audio": {"data": "AAAA", "format": "wav"}}]):
        status, refused = await post(
            stack, "/v1/chat/completions", CHAT | {"messages": [{"role": "user", "content": content}]}
        )
        assert status == 400 and refused["error"]["param"] == "messages", refused
        assert content[-1]["type"] in refused["error"]["message"], refused
    qwen = [{"type": "image", "image": "data:image;base64,AAAA"}, {"type": "text", "text": "what is this"}]
    status, refused = await post(
        stack, "/v1/chat/completions", CHAT | {"messages": [{"role": "user", "content": qwen}]}
    )
    assert status == 400 and "image" in refused["error"]["message"], refused
    status, served = await post(stack, "/v1/chat/completions", CHAT)
    assert status == 200 and served["usage"]["completion_tokens"] == 4, served
