"""Public vLLM, SGLang and LoRAX bug reports replayed through the gateway against the real stack:
each test names the report and checks the answer its fix (or OpenAI's reference) gives."""

from __future__ import annotations

from typing import Any

import pytest

from tests.integration.conftest import Stack
from tests.integration.test_gateway import post


def _same_logprobs(got: list[dict[str, Any]], want: list[dict[str, Any]]) -> bool:
    """The same tokens and alternatives, their logprobs to float rounding (a later prefill starts
    from cached blocks, and a shorter matmul may round the 7th digit otherwise)."""

    def flat(entries: list[dict[str, Any]]) -> tuple[list[Any], list[float]]:
        named = [(e["token"], e["bytes"], [(t["token"], t["bytes"]) for t in e["top_logprobs"]]) for e in entries]
        return named, [lp for e in entries for lp in (e["logprob"], *(t["logprob"] for t in e["top_logprobs"]))]

    (names, lps), (want_names, want_lps) = flat(got), flat(want)
    return names == want_names and lps == pytest.approx(want_lps, abs=1e-5)


async def test_spaces_between_special_tokens_false_is_served(stack: Stack) -> None:
    """vLLM #1347 and #33457 (spaces put around added tokens; the advice: send
    ``spaces_between_special_tokens: false``): the tiny Llama's Rust tokenizer writes added
    tokens side by side as they are, so the field at false asks for what is served, and was a 400."""
    eos = stack.gateway.tokenizer.eos_token_id
    body = {
        "model": "lora-0",
        "prompt": "kalo remi",
        "max_tokens": 3,
        "temperature": 0,
        "logit_bias": {str(eos): 100},  # EOS every step, each written out: none ends the request
        "ignore_eos": True,
        "skip_special_tokens": False,
        "spaces_between_special_tokens": False,
    }
    status, resp = await post(stack, "/v1/completions", body)
    assert status == 200, resp
    assert resp["choices"][0]["text"] == "</s>" * 3


async def test_a_response_gives_its_output_logprobs_when_included(stack: Stack) -> None:
    """vLLM #23225 (the Responses API's logprobs always empty): ``include:
    ["message.output_text.logprobs"]`` with ``top_logprobs`` gives each output token's logprob and
    alternatives, the chat's, whole and streamed (each delta its tokens'), where it was a 400."""
    from tests.integration.test_responses_api import _client, _events

    asked = {"model": "lora-1", "input": "kalo remi?", "temperature": 0, "max_output_tokens": 6}
    asked |= {"include": ["message.output_text.logprobs"], "top_logprobs": 2, "store": False}
    chat = {"model": "lora-1", "messages": [{"role": "user", "content": "kalo remi?"}], "temperature": 0}
    status, expected = await post(
        stack, "/v1/chat/completions", chat | {"max_tokens": 6, "logprobs": True, "top_logprobs": 2}
    )
    assert status == 200, expected
    want = expected["choices"][0]["logprobs"]["content"]
    assert len(want) == 6 and all(len(e["top_logprobs"]) == 2 for e in want)
    client = _client(stack)
    try:
        resp = await client.responses.create(**asked)  # the openai package reads them as its Logprob
        assert _same_logprobs([lp.model_dump() for lp in resp.output[0].content[0].logprobs], want)
    finally:
        await client.close()
    events = await _events(stack, asked | {"stream": True})
    deltas = [d for name, d in events if name == "response.output_text.delta"]
    assert _same_logprobs([e for d in deltas for e in d["logprobs"]], want)
    [done] = [d for name, d in events if name == "response.output_text.done"]
    assert _same_logprobs(done["logprobs"], want)
    assert done["logprobs"] == events[-1][1]["response"]["output"][0]["content"][0]["logprobs"]
    # not asked for: none, as before; top_logprobs alone asks for alternatives of nothing
    status, plain = await post(stack, "/v1/responses", {**asked, "include": None, "top_logprobs": None})
    assert status == 200 and plain["output"][0]["content"][0]["logprobs"] == []
    status, refused = await post(stack, "/v1/responses", {**asked, "include": None})
    assert status == 400 and refused["error"]["param"] == "top_logprobs", refused
