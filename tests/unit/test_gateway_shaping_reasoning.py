"""Request shaping beside the gateway's reasoning_parser: a structured output held back until the
reasoning ends, or bound from the first token where the prompt closed the think block."""

from __future__ import annotations

import copy
import dataclasses
import itertools

from dlora.services.gateway.served_model import ServedModel
from tests.unit.test_gateway_shaping import refused, served, shape

__all__ = ["served"]  # the fixture, shared


def test_a_reasoning_parser_reads_chats_alone_and_holds_structured_outputs_until_the_reasoning_ends(
    served: ServedModel,
) -> None:
    """vLLM holds a grammar back until the reasoning ends: a structured output beside the gateway's
    reasoning_parser binds what follows ``</think>`` (its token ids, as the tokenizer encodes it);
    without a parser, or thinking (qwen3's enable_thinking false), from the first token. Was a 400."""
    user = {"role": "user", "content": "hi"}
    thinks = dataclasses.replace(served, reasoning_parser="qwen3")
    end = served.tokenizer.encode("</think>", add_special_tokens=False)
    tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}
    off = {"chat_template_kwargs": {"enable_thinking": False}}
    for extra in [
        {"response_format": {"type": "json_object"}},
        {"guided_regex": "a+"},
        {"structured_outputs": {"choice": ["a"]}},
        {"tools": [tool], "tool_choice": "required"},
        {"tools": [tool], "tool_choice": {"type": "function", "function": {"name": "f"}}},
    ]:
        body = {"messages": [user], "max_tokens": 2} | extra
        for model, extra_body, after in [(thinks, {}, end), (served, {}, []), (thinks, off, [])]:
            [choice] = shape(model, body | extra_body, chat=True).choices
            assert choice.request is not None and choice.request.params.structured_outputs(), extra
            assert choice.request.params.structured_after_token_ids == after, (extra, extra_body)
    assert end and shape(thinks, {"messages": [user], "max_tokens": 2}, chat=True).choices[0].request.params == (
        shape(served, {"messages": [user], "max_tokens": 2}, chat=True).choices[0].request.params  # free text: none
    )
    e = refused(thinks, {"messages": [user], "max_tokens": 2, "echo": True}, chat=True)
    assert (e.status, e.param) == (400, "echo") and "reasoning_parser (qwen3)" in e.message
    job = shape(thinks, {"messages": [user], "max_tokens": 2}, chat=True)
    assert (job.shape.reasoning_parser, job.shape.thinking) == ("qwen3", True)
    hidden = {"messages": [user], "max_tokens": 2, "include_reasoning": False}
    assert shape(thinks, hidden, chat=True).shape.include_reasoning is False
    assert shape(served, hidden, chat=True).shape.include_reasoning is True  # no parser: nothing to hide
    assert shape(thinks, {"messages": [user], "max_tokens": 2} | off, chat=True).shape.thinking is False
    assert shape(thinks, {"prompt": "hi", "max_tokens": 2, "guided_regex": "a+"}).shape.reasoning_parser == ""


def test_a_continued_message_whose_reasoning_is_closed_binds_its_grammar_from_the_first_token(
    served: ServedModel,
) -> None:
    """continue_final_message on an assistant message that closed its think block: the output is
    content, and the grammar binds it from the first token (vLLM's reasoning_ended read from the
    prompt's ids). Held back until a ``</think>`` the output never writes, it bound nothing: the
    response_format's JSON was not enforced at all."""
    thinks = dataclasses.replace(served, reasoning_parser="qwen3")
    user = {"role": "user", "content": "hi"}
    body = {"max_tokens": 2, "response_format": {"type": "json_object"}, "continue_final_message": True}
    body |= {"add_generation_prompt": False}
    closed = {"role": "assistant", "content": "<think>\nok\n</think>\n\n"}
    job = shape(thinks, body | {"messages": [user, closed]}, chat=True)
    assert job.choices[0].request.params.structured_after_token_ids == []
    assert job.shape.thinking is False  # the output continues the content
    still = {"role": "assistant", "content": "<think>\nhm"}  # its reasoning goes on: held back as before
    job = shape(thinks, body | {"messages": [user, still]}, chat=True)
    assert job.choices[0].request.params.structured_after_token_ids == served.tokenizer.encode(
        "</think>", add_special_tokens=False
    )
    assert job.shape.thinking is True


def test_a_generation_prompt_that_closes_the_think_block_binds_the_grammar_from_the_first_token(
    served: ServedModel,
) -> None:
    """A template that closes the think block in its generation prompt (DeepSeek V3.1's
    ``thinking: false``, GLM-4.5's ``enable_thinking: false``): the output is content, and the
    grammar binds from the first token (vLLM reads the prompt, vllm-project/vllm #39138). Held back
    until a ``</think>`` the model never writes, the structured output went unenforced."""
    tokenizer = copy.deepcopy(served.tokenizer)
    tokenizer.chat_template = (
        "{% for m in messages %}<|{{ m.role }}|>{{ m.content }}{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>{% if thinking is defined and not thinking %}</think>"
        "{% else %}<think>\n{% endif %}{% endif %}"
    )
    thinks = dataclasses.replace(served, reasoning_parser="deepseek_r1", tokenizer=tokenizer)
    body = {"max_tokens": 2, "response_format": {"type": "json_object"}}
    body |= {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "<think>a</think>b"}]}
    body["messages"].append({"role": "user", "content": "again"})  # a history's closed block is not this turn's
    off = shape(thinks, body | {"chat_template_kwargs": {"thinking": False}}, chat=True)
    assert off.choices[0].request.params.structured_after_token_ids == [] and off.shape.thinking is False
    on = shape(thinks, body, chat=True)
    assert on.choices[0].request.params.structured_after_token_ids and on.shape.thinking is True


def test_a_close_tag_of_several_tokens_beside_a_reasoning_parser_is_said_at_start(served: ServedModel) -> None:
    """vLLM refuses to start a reasoning parser whose ``</think>`` is not one token; dlora serves it
    (the text parser still splits on the tag) and says at start that a structured output binds
    only once the model writes the tag in exactly the tokenizer's pieces."""
    from dlora.services.gateway.served_model import model_problems

    several = served.tokenizer.encode("</think>", add_special_tokens=False)
    assert len(several) > 1  # the tiny tokenizer's
    [(what, why)] = model_problems(dataclasses.replace(served, reasoning_parser="qwen3"))
    assert "structured output" in what and f"{len(several)} tokens" in why and "qwen3" in why
    assert model_problems(served) == []  # no parser: nothing to say
    one = copy.deepcopy(served.tokenizer)
    one.add_tokens(["</think>"])
    assert model_problems(dataclasses.replace(served, tokenizer=one, reasoning_parser="deepseek_r1")) == []


def test_a_structured_output_whose_reasoning_is_not_asked_for_binds_from_the_first_token(served: ServedModel) -> None:
    """``include_reasoning: false`` beside a structured output: current vLLM binds the grammar from
    the first token (``ChatCompletionRequest.resolve_reasoning_ended``), the output is the answer.
    dlora held it back until ``</think>``: the model thought unseen, billed, before the JSON came."""
    thinks = dataclasses.replace(served, reasoning_parser="deepseek_r1")
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "include_reasoning": False}
    job = shape(thinks, body | {"response_format": {"type": "json_object"}}, chat=True)
    assert job.choices[0].request.params.structured_after_token_ids == []
    assert (job.shape.thinking, job.shape.include_reasoning) == (False, False)  # all of it content
    free = shape(thinks, body, chat=True)  # free text: it thinks, its reasoning hidden
    assert (free.shape.thinking, free.shape.include_reasoning) == (True, False)


def test_reasoning_effort_reaches_the_template_as_vllm_gives_it(served: ServedModel) -> None:
    """vLLM hands ``reasoning_effort`` to the chat template (``build_chat_params``), with
    ``enable_thinking`` false for "none", true else, unless the request sets it; qwen3's reading
    follows (effort "none": all content). dlora refused the field (400)."""
    tokenizer = copy.deepcopy(served.tokenizer)
    tokenizer.chat_template = (
        "{% for m in messages %}{{ m.content }}{% endfor %}"
        "[{{ reasoning_effort | default('-') }}/{{ enable_thinking | default('-') }}]"
    )
    thinks = dataclasses.replace(served, reasoning_parser="qwen3", tokenizer=tokenizer)
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}

    def rendered(**extra: object) -> tuple[str, bool]:
        job = shape(thinks, body | extra, chat=True)
        return tokenizer.decode(job.choices[0].request.prompt_token_ids), job.shape.thinking

    assert rendered() == ("hi[-/-]", True)
    assert rendered(reasoning_effort="low") == ("hi[low/True]", True)
    assert rendered(reasoning_effort="none") == ("hi[none/False]", False)
    kept = {"enable_thinking": True, "reasoning_effort": "high"}  # the request's own enable_thinking wins
    assert rendered(reasoning_effort="none", chat_template_kwargs=kept) == ("hi[none/True]", True)
    hybrid = dataclasses.replace(thinks, reasoning_parser="deepseek_v3")  # thinks only when told, as vLLM's
    assert [shape(hybrid, body | extra, chat=True).shape.thinking for extra in ({}, {"reasoning_effort": "low"})] == [
        False,
        True,
    ]
    e = refused(thinks, body | {"reasoning_effort": "extreme"}, chat=True)
    assert (e.status, e.param) == (400, "reasoning_effort") and "minimal" in e.message


def test_a_template_that_refuses_a_reasoning_effort_blames_that_field(served: ServedModel) -> None:
    """A template that raises on the ``reasoning_effort`` it is given (gpt-oss-style templates
    check it) was a 400 naming ``chat_template_kwargs``, a field the client never sent: the effort
    rides in the template's kwargs. Its own kwargs still blamed where they are at fault."""
    tokenizer = copy.deepcopy(served.tokenizer)
    tokenizer.chat_template = (
        "{% if reasoning_effort is defined and reasoning_effort == 'max' %}{{ raise_exception('no max') }}{% endif %}"
        "{% if strict is defined %}{{ raise_exception('no strict') }}{% endif %}"
        "{% for m in messages %}{{ m.content }}{% endfor %}"
    )
    thinks = dataclasses.replace(served, reasoning_parser="qwen3", tokenizer=tokenizer)
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    e = refused(thinks, body | {"reasoning_effort": "max"}, chat=True)
    assert (e.status, e.param) == (400, "reasoning_effort"), e.message
    e = refused(
        thinks, body | {"reasoning_effort": "max", "chat_template_kwargs": {"enable_thinking": True}}, chat=True
    )
    assert e.param == "reasoning_effort", e.message
    e = refused(thinks, body | {"reasoning_effort": "low", "chat_template_kwargs": {"strict": 1}}, chat=True)
    assert e.param == "chat_template_kwargs", e.message


async def _answered(
    model: ServedModel, body: dict[str, object], ids: list[list[int]], order: list[int] | None = None
) -> str:
    """The response body a chat ``body`` gets whose one choice's chunks carry ``ids``, arriving in
    ``order`` (their indexes; None: as listed), as the relay takes them (``Gateway._relay``)."""
    import aiohttp
    from aiohttp import web
    from aiohttp.test_utils import TestServer

    from dlora.common.messages import TokenChunk
    from dlora.model.token_bytes import TokenText
    from dlora.services.gateway.responses import ResponseWriter, RunningChoice

    job = shape(model, body, chat=True)

    async def handler(request: web.Request) -> web.StreamResponse:
        choice = RunningChoice.of(job.choices[0])
        rid = choice.request.request_id if choice.request else ""
        writer = ResponseWriter(request, job, [choice], TokenText(model.tokenizer, model.vocab_size))
        for i in range(len(ids)) if order is None else order:
            last = "stop" if i == len(ids) - 1 else None
            text = model.tokenizer.decode(ids[i])
            chunk = TokenChunk(request_id=rid, seq=i, token_ids=ids[i], text=text, finish_reason=last)
            for taken in choice.replies.take(chunk):
                await writer.add(choice, taken)
        return await writer.finish(choice.completion_tokens)

    app = web.Application()
    app.router.add_post("/", handler)
    async with TestServer(app, host="127.0.0.1") as server, aiohttp.ClientSession() as session:
        async with session.post(server.make_url("/")) as resp:
            return (await resp.read()).decode()


async def test_usage_says_how_many_output_tokens_were_reasoning(served: ServedModel) -> None:
    """vLLM's usage beside a reasoning parser has OpenAI's ``completion_tokens_details``
    ``reasoning_tokens`` (the tokens between the tags), whole, in a stream's usage and in each
    event's (continuous_usage_stats); dlora said none, so a client could not budget its thinking."""
    import json

    thinks = dataclasses.replace(served, reasoning_parser="deepseek_r1")
    enc = served.tokenizer.encode
    start, end = thinks.reasoning_start, thinks.reasoning_end
    thought, answer = enc("kalo remi", add_special_tokens=False), enc("ok", add_special_tokens=False)
    ids = [start, thought[:1], thought[1:], end[:1], end[1:] + answer]  # the tags split across chunks too
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 32}
    whole = json.loads(await _answered(thinks, body, ids))
    assert whole["usage"]["completion_tokens_details"] == {"reasoning_tokens": len(thought)}
    assert whole["choices"][0]["message"]["reasoning"] == served.tokenizer.decode(thought)
    options = {"stream": True, "stream_options": {"include_usage": True, "continuous_usage_stats": True}}
    lines = (await _answered(thinks, body | options, ids)).splitlines()
    events = [json.loads(line[6:]) for line in lines if line.startswith("data: {")]
    said = [e["usage"]["completion_tokens_details"]["reasoning_tokens"] for e in events]
    assert said[0] == 0 and said[-1] == len(thought) and said == sorted(said)
    plain = json.loads(await _answered(served, body, ids))  # no parser: not said, as vLLM
    assert "completion_tokens_details" not in plain["usage"]


async def test_a_stream_s_reasoning_tokens_never_go_down_past_a_later_think(served: ServedModel) -> None:
    """An R1 output (its template opened ``<think>``) that writes ``<think>`` mid-reasoning: the
    tag is taken off the reasoning text, what precedes it kept, and usage counts those tokens too.
    The count jumped past the later tag: each event's continuous usage went 2, then 0."""
    import json

    thinks = dataclasses.replace(served, reasoning_parser="deepseek_r1")
    enc = served.tokenizer.encode
    start, end = thinks.reasoning_start, thinks.reasoning_end
    before, after = enc("kalo remi", add_special_tokens=False), enc("nole", add_special_tokens=False)
    ids = [[t] for t in before] + [start] + [[t] for t in after] + [end, enc("ok", add_special_tokens=False)]
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 32}
    options = {"stream": True, "stream_options": {"include_usage": True, "continuous_usage_stats": True}}
    lines = (await _answered(thinks, body | options, ids)).splitlines()
    events = [json.loads(line[6:]) for line in lines if line.startswith("data: {")]
    said = [e["usage"]["completion_tokens_details"]["reasoning_tokens"] for e in events]
    assert said == sorted(said) and said[-1] == len(before) + len(after), said
    whole = json.loads(await _answered(thinks, body, ids))
    assert whole["usage"]["completion_tokens_details"] == {"reasoning_tokens": len(before) + len(after)}
    assert whole["choices"][0]["message"]["reasoning"] == served.tokenizer.decode(before + after)


async def test_each_events_usage_counts_the_tokens_before_it_when_a_gap_fills(served: ServedModel) -> None:
    """Chunks after a gap wait for the one missing (lost around a NATS restart and sent again, or
    overtaken across a move); filled, they go out together, one event each. Each event's
    continuous usage said the tokens of all of them (the reply stream's count, taken first), so
    the events before the last counted tokens not yet sent, and ran ahead of their reasoning_tokens."""
    import json

    thinks = dataclasses.replace(served, reasoning_parser="deepseek_r1")
    enc = served.tokenizer.encode
    thought = enc("kalo remi nole", add_special_tokens=False)
    ids = [[t] for t in thought] + [thinks.reasoning_end, enc("ok", add_special_tokens=False)]
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 32}
    body |= {"stream": True, "stream_options": {"include_usage": True, "continuous_usage_stats": True}}

    async def usages(order: list[int] | None) -> list[dict[str, object]]:
        lines = (await _answered(thinks, body, ids, order)).splitlines()
        return [json.loads(line[6:])["usage"] for line in lines if line.startswith("data: {")]

    in_order = await usages(None)
    assert [u["completion_tokens"] for u in in_order[1:-1]] == list(itertools.accumulate(map(len, ids)))
    gap = [0, 2, 3, 1, *range(4, len(ids))]  # 1 comes after 2 and 3: the three go out together
    assert await usages(gap) == in_order


async def _failed(model: ServedModel, body: dict[str, object], texts: list[str]) -> list[dict[str, object]]:
    """The events of a chat stream whose one choice writes ``texts`` (a chunk each) and then fails
    on its worker, as the relay ends it (``Gateway._relay``: ``ResponseWriter.fail``)."""
    import json

    import aiohttp
    from aiohttp import web
    from aiohttp.test_utils import TestServer

    from dlora.common.messages import ErrorCode, TokenChunk
    from dlora.model.token_bytes import TokenText
    from dlora.services.gateway.responses import ResponseWriter, RunningChoice

    job = shape(model, body | {"stream": True}, chat=True)

    async def handler(request: web.Request) -> web.StreamResponse:
        choice = RunningChoice.of(job.choices[0])
        rid = choice.request.request_id if choice.request else ""
        writer = ResponseWriter(request, job, [choice], TokenText(model.tokenizer, model.vocab_size))
        chunks = [TokenChunk(request_id=rid, seq=i, token_ids=[5], text=t) for i, t in enumerate(texts)]
        chunks.append(TokenChunk(request_id=rid, seq=len(texts), error="worker lost", error_code=ErrorCode.INTERNAL))
        for chunk in chunks:
            for taken in choice.replies.take(chunk):
                if choice.replies.error is not None:
                    return await writer.fail(choice.replies)
                await writer.add(choice, taken)
        raise AssertionError("the stream did not fail")

    app = web.Application()
    app.router.add_post("/", handler)
    async with TestServer(app, host="127.0.0.1") as server, aiohttp.ClientSession() as session:
        async with session.post(server.make_url("/")) as resp:
            lines = (await resp.read()).decode().splitlines()
    return [json.loads(line[6:]) for line in lines if line.startswith("data: {")]


async def test_a_stream_that_fails_still_sends_the_text_its_parsers_held_back(served: ServedModel) -> None:
    """A stream that ended on a worker's error lost what the reasoning parser held back (up to 7
    characters that might begin ``</think>``) or the tool parser did (a possible ``<tool_call>``):
    the text the client had was not what the model wrote before the error, which vLLM (holding
    none) had sent. It goes out in an event before the error, the error last."""
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 32}
    thinks = dataclasses.replace(served, reasoning_parser="deepseek_r1")
    events = await _failed(thinks, body, ["kalo", " 2 </th"])
    said = [e["choices"][0]["delta"] for e in events if e.get("choices")]
    assert "".join(d.get("reasoning", "") for d in said) == "kalo 2 </th"
    assert all(e["choices"][0]["finish_reason"] is None for e in events if e.get("choices"))
    assert events[-1]["error"]["message"] and "choices" not in events[-1]
    calls = dataclasses.replace(served, tool_call_parser="hermes")
    tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}
    events = await _failed(calls, body | {"tools": [tool]}, ["Let me", " see <tool_"])
    assert "".join(e["choices"][0]["delta"].get("content", "") for e in events[:-1]) == "Let me see <tool_"
    events = await _failed(served, body, ["plain", " text"])  # nothing held: no event added
    assert [e["choices"][0]["delta"].get("content") for e in events[:-1]] == ["", "plain", " text"]
