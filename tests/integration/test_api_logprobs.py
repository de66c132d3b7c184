"""Logprobs through the gateway as clients read them: a completion's and a chat's, with their
top alternatives, over characters split across tokens, and a run of bytes that make no character
streamed as it comes."""

from __future__ import annotations

import codecs
import math

import pytest

from dlora.model.token_bytes import token_string
from tests.integration.conftest import Stack
from tests.integration.test_gateway import PROMPTS, post, stream


async def test_completion_logprobs(stack: Stack) -> None:
    body = {"model": "lora-0", "prompt": PROMPTS[0], "max_tokens": 4, "temperature": 0, "logprobs": 2}
    status, resp = await post(stack, "/v1/completions", body)
    assert status == 200, resp
    choice = resp["choices"][0]
    lp = choice["logprobs"]
    assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["text_offset"]) == 4
    for token, logprob, top in zip(lp["tokens"], lp["token_logprobs"], lp["top_logprobs"]):
        assert logprob <= 0 and top[token] == logprob and 2 <= len(top) <= 3
        assert max(top.values()) == logprob  # greedy: the chosen token is the most likely
    # the streamed events carry the same numbers
    events = await stream(stack, "/v1/completions", body)
    streamed = [lp for e in events[:-1] for lp in (e["choices"][0]["logprobs"] or {}).get("token_logprobs", [])]
    # The same to float rounding: a later request's prefill starts from the prompt's cached
    # blocks, and a shorter matmul may round the 7th digit otherwise.
    assert streamed == pytest.approx(lp["token_logprobs"], abs=1e-5)
    # vLLM's return_tokens_as_token_ids: the same tokens, each named by its id, streamed too
    status, by_id = await post(stack, "/v1/completions", {**body, "return_tokens_as_token_ids": True})
    assert status == 200 and by_id["choices"][0]["text"] == choice["text"]
    named = by_id["choices"][0]["logprobs"]
    assert all(t.startswith("token_id:") and t[9:].isdigit() for t in named["tokens"])
    assert named["token_logprobs"] == pytest.approx(lp["token_logprobs"], abs=1e-5)
    assert named["text_offset"] == lp["text_offset"]
    events = await stream(stack, "/v1/completions", {**body, "return_tokens_as_token_ids": True})
    assert [t for e in events[:-1] for t in (e["choices"][0]["logprobs"] or {}).get("tokens", [])] == named["tokens"]


async def test_chat_logprobs_and_top_logprobs(stack: Stack) -> None:
    body = {
        "model": "lora-1",
        "messages": [{"role": "user", "content": "kalo"}],
        "max_tokens": 3,
        "temperature": 0,
        "logprobs": True,
        "top_logprobs": 4,
    }
    status, resp = await post(stack, "/v1/chat/completions", body)
    assert status == 200, resp
    content = resp["choices"][0]["logprobs"]["content"]
    assert (
        bytes(b for c in content for b in c["bytes"]).decode("utf-8", "replace")
        == resp["choices"][0]["message"]["content"]
    )
    for c in content:
        assert len(c["top_logprobs"]) == 4
        assert c["top_logprobs"][0]["logprob"] == c["logprob"]
        assert math.fsum(math.exp(t["logprob"]) for t in c["top_logprobs"]) <= 1 + 1e-6
    status, resp = await post(stack, "/v1/chat/completions", {**body, "logprobs": False})
    assert status == 400 and "top_logprobs" in resp["error"]["message"]
    status, resp = await post(stack, "/v1/chat/completions", {**body, "logprobs": False, "top_logprobs": 0})
    assert status == 200 and resp["choices"][0]["logprobs"] is None, resp  # 0 asks for none (vLLM)


async def test_logprobs_of_characters_split_over_tokens(stack: Stack) -> None:
    """The tiny model's tokenizer is byte-level BPE: sampled hot, it writes characters over several
    tokens. Their bytes rebuild the text (each alone decodes to U+FFFD: ollama #13497, vLLM #27300;
    never empty for a token that holds some: vLLM #9463), each token's text is vLLM's (""
    inside a character, the character whole where it ends: ``token_bytes.token_string``), no
    two alternatives merge but those inside a character, and text_offset counts characters."""
    split = 0
    for seed in range(6):
        body = {"model": "lora-0", "max_tokens": 12, "temperature": 2, "seed": seed}
        chat = {**body, "messages": [{"role": "user", "content": "é"}], "logprobs": True, "top_logprobs": 5}
        status, resp = await post(stack, "/v1/chat/completions", chat)
        assert status == 200, resp
        content = resp["choices"][0]["logprobs"]["content"]
        special = {"<s>", "</s>", "<pad>"}  # in the logprobs, not in the text (skip_special_tokens)
        data = bytes(b for c in content if c["token"] not in special for b in c["bytes"])
        # the text as the bytes make it (bytes that end it short of a character are not shown)
        text = codecs.getincrementaldecoder("utf-8")("replace").decode(data)
        assert text.removesuffix("\ufffd") == resp["choices"][0]["message"]["content"].removesuffix("\ufffd")
        said = [bytes(c["bytes"]) for c in content]
        assert [c["token"] for c in content] == [token_string(b, said[:i]) for i, b in enumerate(said)]
        split += sum(1 for c in content if c["token"] == "" and c["bytes"])
        assert all(len({(t["token"], tuple(t["bytes"])) for t in c["top_logprobs"]}) == 5 for c in content)
        status, resp = await post(stack, "/v1/completions", {**body, "prompt": "é", "logprobs": 5})
        lp, text = resp["choices"][0]["logprobs"], resp["choices"][0]["text"]
        assert lp["text_offset"] == sorted(lp["text_offset"]) and lp["text_offset"][0] == 0
        assert lp["text_offset"][-1] <= len(text) + 1
        for token, at in zip(lp["tokens"], lp["text_offset"]):  # a token's text is where it says
            assert "\ufffd" in token or token in special or text[at : at + len(token)] == token, (token, at, text)
        # alternatives inside a character share the key "" (as at vLLM; return_tokens_as_token_ids names them)
        assert all(len(top) >= 5 or "" in top for top in lp["top_logprobs"])
    assert split  # the case was met


async def test_a_run_of_bytes_that_make_no_character_streams_as_it_comes(stack: Stack) -> None:
    """A model that writes lone UTF-8 continuation bytes (each U+FFFD whole) or EOS under
    ignore_eos: the worker held all of it back, decoding a window as long as the output each
    token (O(n^2)), and the stream carried no text until the end (SGLang #34740's kind)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(stack.tiny.model)
    byte = tokenizer.encode("\u00e9")[1]  # é's second byte: alone, no character
    assert tokenizer.decode([byte]) == "\ufffd"
    for forced, text in ((byte, "\ufffd" * 120), (tokenizer.eos_token_id, "")):
        body = {"model": "lora-0", "prompt": PROMPTS[0], "max_tokens": 120, "logit_bias": {str(forced): 100}}
        events = await stream(stack, "/v1/completions", {**body, "ignore_eos": True, "return_token_ids": True})
        choices = [e["choices"][0] for e in events[:-1]]
        assert [t for c in choices for t in c["token_ids"]] == [forced] * 120
        assert "".join(c["text"] for c in choices) == text
        assert len("".join(c["text"] for c in choices[:60])) >= len(text) // 3  # not all at the end
