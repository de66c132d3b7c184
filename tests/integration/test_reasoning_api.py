"""The gateway's reasoning_parser through the REST API against the real stack: a chat's output
answered as vLLM's "reasoning" and content, whole and streamed alike; completions untouched; a
structured output beside it bound only after the reasoning (a model whose tokenizer writes
</think> as one token). The random model is kept to the tags' characters by allowed_token_ids, and
what it wrote is read back through /v1/completions with the same prompt and sampling, the text the
chat's answer must be split from. The tags split across tokens are fuzzed in
tests/unit/test_reasoning.py, through the same chunk-shaping code."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from redis.asyncio import Redis

from dlora.model.config import ModelConfig
from dlora.model.make_tiny import TinyOutput, make_tokenizer
from dlora.services.gateway.reasoning import ReasoningTokens, split
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
        assert message == {"role": "assistant", "content": content, "refusal": None, "reasoning": reasoning}, raw
        assert reasoning and "".join(d.get("reasoning", "") for d in deltas) == reasoning
        assert "".join(d.get("content") or "" for d in deltas) == (content or "")
        # the template closed the think block (enable_thinking false): all content
        off = {**chat, "chat_template_kwargs": {"enable_thinking": False}}
        message, deltas = await _answers(stack, off)
        assert message == {"role": "assistant", "content": raw, "refusal": None, "reasoning": None}
        assert "".join(d.get("content") or "" for d in deltas) == raw and not any("reasoning" in d for d in deltas)
        # completions are not read (vLLM's parser serves chats alone), structured ones served
        status, resp = await post(stack, "/v1/completions", {"model": "lora-4", "prompt": "kalo", "guided_regex": "ok"})
        assert status == 200 and resp["choices"][0]["text"] == "ok", resp


def _one_token_tag(tiny: TinyOutput, tmp: Path) -> TinyOutput:
    """``tiny``'s model whose tokenizer writes ``</think>`` as one token (an added one, not special,
    as R1's and Qwen3's): its BPE trained to one id fewer, the tag the last id."""
    from transformers import AutoTokenizer

    model = Path(shutil.copytree(tiny.model, tmp / "model"))
    vocab = ModelConfig.from_dir(model).vocab_size
    make_tokenizer(model, vocab - 1, seed=1)
    tok = AutoTokenizer.from_pretrained(model)
    tok.add_tokens(["</think>"])
    tok.save_pretrained(model)
    assert tok.encode("</think>", add_special_tokens=False) == [vocab - 1]
    return TinyOutput(model, tiny.adapters_dir, tiny.adapters)


async def test_a_structured_output_binds_only_the_answer_after_the_reasoning(
    nats_server: Server, redis: Redis, tiny_llama: TinyOutput, tmp_path: Path
) -> None:
    """vLLM applies a grammar once the reasoning has ended (was a 400 here). A seeded sample whose
    free output holds the tag, asked again with a regex: the same tokens up to and including the
    tag (seeded draws are keyed by position), then the regex's text, answered as the content."""
    from transformers import AutoTokenizer

    tiny = _one_token_tag(tiny_llama, tmp_path)
    tok = AutoTokenizer.from_pretrained(tiny.model)
    [tag] = tok.encode("</think>", add_special_tokens=False)
    chat = {
        "model": "lora-4",
        "messages": [{"role": "user", "content": "kalo?"}],
        "max_tokens": 16,
        "temperature": 1.0,
        "allowed_token_ids": sorted(set(tok.encode(" nole</think>ok", add_special_tokens=False))),
        "logit_bias": {str(tag): 4},  # (a random model's new id: rarely drawn else)
        "return_token_ids": True,
    }
    async with run_stack(nats_server, redis, tiny, reasoning_parser="qwen3") as stack:
        _, ids = await post(stack, "/tokenize", {"model": chat["model"], "messages": chat["messages"]})
        free = {k: v for k, v in chat.items() if k != "messages"} | {"prompt": ids["tokens"], "seed": 7, "n": 16}
        status, resp = await post(stack, "/v1/completions", free)
        assert status == 200, resp
        raw = next(c for c in resp["choices"] if tag in c["token_ids"][:-2])
        end = raw["token_ids"].index(tag) + 1
        asked = chat | {"seed": 7 + raw["index"], "guided_regex": "ok"}
        status, answer = await post(stack, "/v1/chat/completions", asked)
        assert status == 200, answer
        [choice] = answer["choices"]
        assert choice["token_ids"][:end] == raw["token_ids"][:end], (raw, choice)
        thought = raw["text"][: raw["text"].index("</think>")]
        assert choice["message"]["reasoning"] == split("qwen3", thought)[0]
        assert (choice["message"]["content"], choice["finish_reason"]) == ("ok", "stop"), choice
        counted = ReasoningTokens(tok.encode("<think>", add_special_tokens=False), [tag])  # usage's (vLLM's)
        counted.feed(choice["token_ids"])
        assert answer["usage"]["completion_tokens_details"] == {"reasoning_tokens": counted.count(done=True)}
        assert counted.count(done=True) >= end - 1 - len(tok.encode("<think>", add_special_tokens=False))
        only_ok = {"role": "assistant", "content": "ok", "refusal": None, "reasoning": None}
        # without thinking (the template closed the think block) the grammar binds from the start
        off = asked | {"chat_template_kwargs": {"enable_thinking": False}}
        status, answer = await post(stack, "/v1/chat/completions", off)
        assert status == 200, answer
        assert answer["choices"][0]["message"] == only_ok
        assert answer["usage"]["completion_tokens_details"] == {"reasoning_tokens": 0}
        # its reasoning not asked for: bound from the first token too, as vLLM (the model does not think)
        status, answer = await post(stack, "/v1/chat/completions", asked | {"include_reasoning": False})
        assert status == 200, answer
        assert answer["choices"][0]["message"] == only_ok
        assert answer["usage"]["completion_tokens"] <= len(tok.encode("ok", add_special_tokens=False)) + 1  # (and EOS)
