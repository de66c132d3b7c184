"""Public vLLM, SGLang and LoRAX bug reports replayed through the gateway against the real stack:
each test names the report and checks the answer its fix (or OpenAI's reference) gives."""

from __future__ import annotations

from tests.integration.conftest import Stack
from tests.integration.test_gateway import post


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
