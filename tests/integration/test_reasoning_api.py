"""The gateway's reasoning_parser through the REST API against the real stack: a chat's output
answered as vLLM's "reasoning" and content, whole and streamed alike; completions untouched; a
structured output beside it refused. The random model writes no whole tag (a structured output,
which could lead it to, is refused here): it is kept to the tags' characters by allowed_token_ids,
and what it wrote is read back through /v1/completions with the same prompt and sampling, the
text the chat's answer must be split from. The tags split across tokens are fuzzed in
tests/unit/test_reasoning.py, through the same chunk-shaping code."""

from __future__ import annotations

from typing import Any

from redis.asyncio import Redis

from dlora.model.make_tiny import TinyOutput
from dlora.services.gateway.reasoning import split
from dlora.services.servers import Server
from tests.integration.conftest import Stack, run_stack
from tests.integration.test_gateway import post, stream


async def _raw(stack: Stack, chat: dict[str, Any]) -> str:
    """What the model writes for ``chat``, unread: the same prompt and sampling as a completion."""
    status, ids = await post(stack, "/tokenize", {"model": chat["model"], "messages": chat["messages"]})
    assert status == 200, ids
    body = {k: v for k, v in chat.items() if k != "messages"} | {"prompt": ids["tokens"]}
    status, resp = await post(stack, "/v1/completions", body)
    assert status == 200, resp
    return resp["choices"][0]["text"]


async def _answers(stack: Stack, chat: dict[str, Any]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The chat's message, and its streamed deltas."""
    status, resp = await post(stack, "/v1/chat/completions", chat)
    assert status == 200, resp
    events = await stream(stack, "/v1/chat/completions", {**chat, "stream": True})
    deltas = [e["choices"][0]["delta"] for e in events if isinstance(e, dict) and e.get("choices")]
    return resp["choices"][0]["message"], deltas


async def test_a_chat_answers_its_reasoning_apart(nats_server: Server, redis: Redis, tiny_llama: TinyOutput) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_llama.model)
    allowed = sorted(set(tok.encode("</think>ok", add_special_tokens=False)))
    chat = {
        "model": "lora-4",
        "messages": [{"role": "user", "content": "kalo?"}],
        "max_tokens": 24,
        "temperature": 0,
        "allowed_token_ids": allowed,
    }
    async with run_stack(nats_server, redis, tiny_llama, reasoning_parser="qwen3") as stack:
        raw = await _raw(stack, chat)
        message, deltas = await _answers(stack, chat)
        reasoning, content = split("qwen3", raw)
        assert message == {"role": "assistant", "content": content, "reasoning": reasoning}, raw
        assert reasoning and "".join(d.get("reasoning", "") for d in deltas) == reasoning
        assert "".join(d.get("content") or "" for d in deltas) == (content or "")
        # the template closed the think block (enable_thinking false): all content
        off = {**chat, "chat_template_kwargs": {"enable_thinking": False}}
        message, deltas = await _answers(stack, off)
        assert message == {"role": "assistant", "content": raw, "reasoning": None}
        assert "".join(d.get("content") or "" for d in deltas) == raw and not any("reasoning" in d for d in deltas)
        # a structured output would bind the reasoning too: refused, naming the field and the parser
        status, resp = await post(stack, "/v1/chat/completions", {**chat, "guided_regex": "ok"})
        assert status == 400 and resp["error"]["param"] == "guided_regex", resp
        assert "reasoning_parser (qwen3)" in resp["error"]["message"]
        # completions are not read (vLLM's parser serves chats alone), structured ones served
        status, resp = await post(stack, "/v1/completions", {"model": "lora-4", "prompt": "kalo", "guided_regex": "ok"})
        assert status == 200 and resp["choices"][0]["text"] == "ok", resp
