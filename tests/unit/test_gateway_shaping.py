"""Request shaping: an OpenAI body in, one GenerateRequest per choice out (or the 4xx that refuses
it), with the tiny model's real tokenizer and no servers."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import msgspec
import pytest

from dlora.common import subjects
from dlora.common.messages import AdapterEntry, SamplingParams
from dlora.services.gateway import openai, sampling, shaping
from dlora.services.gateway.openai import APIError, ChatBody, CompletionBody
from dlora.services.gateway.served_model import ServedModel
from dlora.services.gateway.shaping import Job

BASE = "model"
CONTEXT = 64
ADAPTER = AdapterEntry(name="sql", path="/adapters/sql", rank=8, created=0.0, version="v1")


@pytest.fixture(scope="module")
def served(tiny_llama) -> ServedModel:
    from transformers import AutoTokenizer

    from dlora.model.config import ModelConfig

    tok = AutoTokenizer.from_pretrained(tiny_llama.model)
    return ServedModel(tok, ModelConfig.from_dir(tiny_llama.model).vocab_size, CONTEXT)


def shape(served: ServedModel, body: dict[str, Any], chat: bool = False, adapter: AdapterEntry | None = None) -> Job:
    raw = json.dumps({"model": BASE} | body).encode()
    decoded = openai.decode_body(raw, ChatBody if chat else CompletionBody)
    return shaping.shape_request(
        decoded, adapter, served, base_name=BASE, request_id="cmpl-1", gateway_id="gw", now=1000.5
    )


def refused(served: ServedModel, body: dict[str, Any], chat: bool = False, **kw: Any) -> APIError:
    with pytest.raises(APIError) as e:
        shape(served, body, chat, **kw)
    return e.value


def test_logit_bias_past_the_vocabulary_and_min_tokens_past_an_echo_are_refused_by_name(served: ServedModel) -> None:
    e = refused(served, {"prompt": "kalo", "logit_bias": {"100000": 1}})
    assert (e.status, e.param) == (400, "logit_bias") and "outside the vocabulary" in e.message
    # a stop id no sample can be ran the request on past it without a word (vLLM #54195 refuses it)
    for chat, start in ((False, {"prompt": "kalo"}), (True, {"messages": [{"role": "user", "content": "kalo"}]})):
        e = refused(served, start | {"stop_token_ids": [3, 99999], "min_tokens": 1}, chat=chat)
        assert (e.status, e.param) == (400, "stop_token_ids") and "[99999]" in e.message, e.message
    e = refused(served, {"prompt": "kalo", "max_tokens": 0, "echo": True, "min_tokens": 1})
    assert (e.status, e.param) == (400, "min_tokens")


def test_too_many_choices_name_the_field_that_made_them(served: ServedModel) -> None:
    assert refused(served, {"prompt": ["kalo"] * 300, "max_tokens": 1}).param == "prompt"
    assert refused(served, {"prompt": ["kalo"] * 3, "n": 100, "max_tokens": 1}).param == "n"


def test_n_samples_of_one_prompt_take_consecutive_seeds(served: ServedModel) -> None:
    job = shape(served, {"prompt": "kalo remi", "n": 3, "seed": 7, "max_tokens": 5, "user": "ana"})
    ids = served.tokenizer.encode("kalo remi")
    assert [c.index for c in job.choices] == [0, 1, 2] and job.prompt_tokens == len(ids)
    reqs = [c.request for c in job.choices]
    assert [r.request_id for r in reqs] == ["cmpl-1-0", "cmpl-1-1", "cmpl-1-2"]
    assert [r.params.seed for r in reqs] == [7, 8, 9]
    assert all(
        r.prompt_token_ids == ids
        and r.params.max_tokens == 5
        and r.adapter is None
        and r.tenant == "ana"
        and r.created == 1000.5
        for r in reqs
    )
    assert reqs[1].reply_to == subjects.reply_inbox("cmpl-1-1", "gw") and reqs[0].priority == 0
    urgent = shape(served, {"prompt": "kalo", "n": 2, "max_tokens": 1, "priority": -3}, chat=False)
    assert [c.request.priority for c in urgent.choices] == [-3, -3]  # vLLM's priority, for every choice
    assert (job.shape.chat, job.shape.request_id, job.shape.model, job.shape.created) == (False, "cmpl-1", BASE, 1000)
    assert (job.adapter, job.stream, job.include_usage, job.token_ids_in_logprobs) == (None, False, False, False)
    assert shape(served, {"prompt": "kalo", "max_tokens": 1, "return_tokens_as_token_ids": True}).token_ids_in_logprobs


def test_the_models_generation_config_fills_what_a_request_leaves_out(served: ServedModel) -> None:
    """vLLM's --generation-config auto: the model's sampling values are the defaults; what the
    request gives wins; its max_new_tokens caps every request (vLLM's get_max_tokens: the least)."""
    model = dataclasses.replace(
        served, defaults={"temperature": 0.6, "top_k": 20, "repetition_penalty": 1.1, "max_tokens": 7}
    )

    def params(body: dict[str, Any], chat: bool = False) -> SamplingParams:
        request = shape(model, body, chat).choices[0].request
        assert request is not None
        return request.params

    p = params({"messages": [{"role": "user", "content": "kalo"}]}, chat=True)
    assert (p.temperature, p.top_k, p.repetition_penalty, p.top_p, p.max_tokens) == (0.6, 20, 1.1, 1.0, 7)
    p = params({"prompt": "kalo", "temperature": 0.0, "top_k": 0, "max_tokens": 3})
    assert (p.temperature, p.top_k, p.repetition_penalty, p.max_tokens) == (0.0, 0, 1.1, 3)
    assert params({"prompt": "kalo", "max_tokens": 12}).max_tokens == 7
    plain = shape(served, {"prompt": "kalo"}).choices[0].request  # a model without any: the API's own
    assert plain is not None and (plain.params.temperature, plain.params.top_k, plain.params.max_tokens) == (1.0, 0, 16)


def test_several_prompts_are_prompt_x_n_choices(served: ServedModel) -> None:
    job = shape(
        served, {"prompt": ["kalo", [5, 6, 7]], "n": 2, "stream": True, "stream_options": {"include_usage": True}}
    )
    assert [(c.index, c.request.request_id) for c in job.choices] == [
        (0, "cmpl-1-0"),
        (1, "cmpl-1-1"),
        (2, "cmpl-1-2"),
        (3, "cmpl-1-3"),
    ]
    assert job.choices[2].request.prompt_token_ids == [5, 6, 7]
    assert job.prompt_tokens == len(served.tokenizer.encode("kalo")) + 3  # each prompt once, not once per sample
    assert all(c.request.params.max_tokens == shaping.DEFAULT_COMPLETION_TOKENS for c in job.choices)
    assert all(c.request.params.seed is None for c in job.choices)
    assert (job.stream, job.include_usage) == (True, True)


def test_echo_gives_the_prompt_back_as_written_or_decoded(served: ServedModel) -> None:
    ids = served.tokenizer.encode("kalo remi")
    job = shape(served, {"prompt": ["kalo remi", ids], "echo": True, "max_tokens": 2})
    assert [c.echo for c in job.choices] == ["kalo remi", served.tokenizer.decode(ids, skip_special_tokens=True)]
    assert shape(served, {"prompt": "kalo", "max_tokens": 2}).choices[0].echo == ""  # no echo, no prefix
    # max_tokens 0 with echo: the prompt back and nothing to generate
    nothing = shape(served, {"prompt": "kalo", "echo": True, "max_tokens": 0})
    assert [(c.echo, c.request) for c in nothing.choices] == [("kalo", None)]


def test_a_chats_echo_is_its_last_message_where_that_has_the_replys_role(served: ServedModel) -> None:
    """vLLM's chat ``echo`` (refused as an unknown field): a continued message comes back whole."""
    user = {"role": "user", "content": "kalo"}
    parts = {"role": "assistant", "content": [{"type": "text", "text": "remi"}, {"type": "text", "text": "suta"}]}
    refusal = {"type": "refusal", "refusal": "b"}
    cont = {"add_generation_prompt": False, "continue_final_message": True}
    for messages, extra, echo in (
        ([user], {}, ""),  # the assistant's turn opened: the user's message is not the reply's
        ([user, {"role": "assistant", "content": "remi"}], cont, "remi"),
        ([user, parts], cont, "remi\nsuta"),  # text parts joined by newlines, as vLLM
        # every part the prompt renders (an output_text or refusal part was left out)
        ([user, {"role": "assistant", "content": [{"type": "output_text", "text": "a"}, refusal]}], cont, "a\nb"),
        ([user, {"role": "assistant", "content": "remi"}], {}, "remi"),
        ([user], {"add_generation_prompt": False}, "kalo"),  # the reply is the last message's role's
    ):
        job = shape(served, {"messages": messages, "echo": True, "n": 2, "max_tokens": 2} | extra, chat=True)
        assert [c.echo for c in job.choices] == [echo, echo], (messages, extra)
    assert shape(served, {"messages": [user], "echo": False, "max_tokens": 2}, chat=True).choices[0].echo == ""
    # the reply's role, as vLLM's: the last message's where no assistant turn is opened (an echoed
    # user message came back as the assistant's)
    roles = [
        shape(served, {"messages": [user], "max_tokens": 2} | extra, chat=True).shape.role
        for extra in ({}, {"add_generation_prompt": False})
    ]
    assert roles == ["assistant", "user"]
    tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}
    reading = dataclasses.replace(served, tool_call_parser="hermes")  # "auto" reads the calls in the text
    for choice in ("required", "auto"):  # a forced call's arguments, or text read for calls, would begin with it
        e = refused(reading, {"messages": [user], "echo": True, "tools": [tool], "tool_choice": choice}, chat=True)
        assert (e.status, e.param) == (400, "echo")


def test_the_model_names_the_base_or_a_registered_adapter(served: ServedModel) -> None:
    job = shape(served, {"model": "sql", "prompt": "kalo"}, adapter=ADAPTER)
    assert job.adapter == "sql"
    assert (job.choices[0].request.adapter, job.choices[0].request.adapter_version) == ("sql", "v1")
    assert job.shape.model == "sql"
    # unknown: a 404, before anything else in the body is looked at
    e = refused(served, {"model": "nope", "prompt": [], "temperature": 9})
    assert (e.status, e.param, e.code) == (404, "model", "model_not_found")
    assert e.message == "The model 'nope' does not exist or you do not have access to it."
    # the base model named by its path or Hub id, as vLLM's clients name it: told the name it has
    for path in (f"/srv/models/{BASE}", f"org/{BASE}/"):
        e = refused(served, {"model": path, "prompt": "kalo"})
        assert (e.status, e.code) == (404, "model_not_found")
        assert e.message.endswith(
            f"The base model is served as '{BASE}' (served_model_name; default its folder's name, not its path)."
        )
    assert "served as" not in refused(served, {"model": f"org/{BASE}-2", "prompt": "kalo"}).message
    # the base model's name means no adapter, whatever was passed
    assert shape(served, {"prompt": "kalo"}, adapter=ADAPTER).choices[0].request.adapter is None


def test_stop_logprobs_and_response_format(served: ServedModel) -> None:
    p = shape(served, {"prompt": "kalo", "stop": "\n", "logprobs": 2}).choices[0].request.params
    assert (p.stop, p.logprobs, p.include_stop_str_in_output) == (["\n"], 2, False)
    p = shape(served, {"prompt": "kalo", "stop": "\n", "include_stop_str_in_output": True}).choices[0].request.params
    assert p.include_stop_str_in_output
    msgs = [{"role": "user", "content": "kalo"}]
    p = (
        shape(
            served,
            {
                "messages": msgs,
                "stop": ["a", "b"],
                "logprobs": True,
                "top_logprobs": 3,
                "response_format": {"type": "json_object"},
            },
            chat=True,
        )
        .choices[0]
        .request.params
    )
    assert (p.stop, p.logprobs, json.loads(p.json_schema)) == (["a", "b"], 3, {"type": "object"})
    assert shape(served, {"messages": msgs}, chat=True).choices[0].request.params.logprobs is None
    named = {"name": "n", "schema": {"type": "object"}}
    for bad in (
        {"type": "yaml"},
        {"type": "json_schema"},
        {"type": "json_schema", "json_schema": {"schema": 3}},
        # OpenAI's and vLLM's 400s, taken without a word here
        {"type": "json_schema", "json_schema": {"schema": {"type": "object"}}},  # no name
        {"type": "json_schema", "json_schema": named | {"name": 5}},
        {"type": "json_schema", "json_schema": named | {"strict": "yes"}},
        {"type": "json_schema", "json_schema": named | {"schemas": {}}},
        {"type": "json_object", "schema": {}},
    ):
        e = refused(served, {"messages": msgs, "response_format": bad}, chat=True)
        assert (e.status, e.param) == (400, "response_format")
    e = refused(served, {"messages": msgs, "response_format": {"type": "yaml"}}, chat=True)
    assert e.message == "response_format type 'yaml' is not one of text, json_object, json_schema"


def test_sampling_params_map_and_refuse_unsupported() -> None:
    body = msgspec.convert(
        {"model": "m", "prompt": "x", "temperature": 0.5, "top_p": 0.9, "stop": "\n", "seed": 4}, CompletionBody
    )
    p = sampling.sampling_params(body, 7)
    assert (p.max_tokens, p.temperature, p.top_p, p.stop, p.seed) == (7, 0.5, 0.9, ["\n"], 4)
    body = msgspec.convert(
        {"model": "m", "prompt": "x", "logit_bias": {"5": -100, "7": 2.5}, "min_tokens": 7}, CompletionBody
    )
    assert (sampling.sampling_params(body, 7).logit_bias, sampling.sampling_params(body, 7).min_tokens) == (
        {5: -100.0, 7: 2.5},
        7,
    )
    for field, value in (("min_tokens", 8), ("min_tokens", -1), ("logit_bias", {"-3": 1.0})):
        body = msgspec.convert({"model": "m", "prompt": "x", field: value}, CompletionBody)
        with pytest.raises(APIError, match=field) as refused:
            sampling.sampling_params(body, 7)
        assert refused.value.param == field
    for field, value in (
        ("best_of", 2),
        ("suffix", "x"),
        ("logit_bias", {"x5": 1.0}),
        ("logit_bias", {"9" * 5000: 1.0}),  # past int()'s digit limit: was a 500
    ):
        body = msgspec.convert({"model": "m", "prompt": "x", field: value}, CompletionBody)
        with pytest.raises(APIError, match=field) as refused:
            sampling.sampling_params(body, 7)
        assert refused.value.param == field
    body = msgspec.convert({"model": "m", "prompt": "x", "temperature": 3}, CompletionBody)
    with pytest.raises(APIError, match=r"temperature must be in \[0, 2\], got 3.0."):
        sampling.sampling_params(body, 7)


@pytest.mark.parametrize(
    ("body", "chat", "param"),
    [
        ({"best_of": 2, "n": 1}, False, "best_of"),
        ({"suffix": "x"}, False, "suffix"),
        ({"top_logprobs": 2}, True, "top_logprobs"),
        ({"tools": [{"type": "function"}]}, True, "tools"),
        ({"repetition_penalty": 0}, False, "repetition_penalty"),
        ({"stop": ""}, False, "stop"),
        ({"stop": ["a", ""]}, True, "stop"),
        ({"stop": ["x" * 1025]}, False, "stop"),  # its text is held back and recorded every step
        ({"stop_token_ids": [-1]}, False, "stop_token_ids"),
        ({"top_k": -2}, False, "top_k"),
        ({"temperature": 2.5}, True, "temperature"),
        ({"max_tokens": 0}, True, "max_tokens"),  # a chat completion generates a token at least
        ({"max_completion_tokens": 0}, True, "max_completion_tokens"),
        ({"stream_options": {"include_usage": True}}, False, "stream_options"),  # without stream: true
        ({"seed": 1 << 64}, False, "seed"),
        ({"stop": [str(i) for i in range(300)]}, True, "stop"),
    ],
)
def test_every_refused_value_names_its_field(served: ServedModel, body: dict[str, Any], chat: bool, param: str) -> None:
    """The README's promise: a value out of range or unsupported is a 400 naming the field (the
    error's ``param`` is the field itself, as OpenAI's is, never a phrase)."""
    start = {"messages": [{"role": "user", "content": "kalo"}]} if chat else {"prompt": "kalo"}
    e = refused(served, start | body, chat=chat)
    assert (e.status, e.param) == (400, param), e.message


def test_the_samples_seeds_stay_within_64_bits(served: ServedModel) -> None:
    """Sample i draws from seed + i; at the top of the range that wraps, or the second choice of
    a valid seed failed on the worker mid-stream."""
    top = (1 << 63) - 1
    job = shape(served, {"prompt": "kalo", "seed": top, "n": 3, "temperature": 1.0})
    assert [c.request.params.seed for c in job.choices] == [top, -(1 << 63), -(1 << 63) + 1]
    assert all(c.request.params.invalid() is None for c in job.choices)


@pytest.mark.parametrize(
    ("raw", "param"),
    [
        (b'{"model": "m", "prompt": "x", "max_tokens": "3"}', "max_tokens"),
        (b'{"model": "m", "prompt": "x", "stream_options": {"q": 1}}', "stream_options"),
        (b'{"model": "m", "prompt": "x", "frobnicate": 1}', "frobnicate"),
        (b'{"model": "m", "prompt": "x", "priority": 1.5}', "priority"),
        (b'{"model": "m"}', "prompt"),  # a field missing (model may be: the base model)
    ],
)
def test_a_body_of_the_wrong_shape_names_the_field(raw: bytes, param: str) -> None:
    with pytest.raises(APIError) as e:
        openai.decode_body(raw, CompletionBody)
    assert (e.value.status, e.value.param) == (400, param)


def test_a_chats_prompt_cache_key_goes_with_its_requests(served: ServedModel) -> None:
    """OpenAI's prompt_cache_key (accepted and ignored before): the dispatcher routes requests that
    share it together (dispatcher/affinity.py)."""
    chat = {"messages": [{"role": "user", "content": "kalo"}], "max_tokens": 1, "n": 2}
    job = shape(served, {**chat, "prompt_cache_key": "conversation-7"}, chat=True)
    assert {c.request.prompt_cache_key for c in job.choices} == {"conversation-7"}
    assert shape(served, chat, chat=True).choices[0].request.prompt_cache_key == ""
    e = refused(served, {**chat, "prompt_cache_key": "k" * 1025}, chat=True)
    assert (e.status, e.param) == (400, "prompt_cache_key")


async def test_events_waiting_together_go_out_in_one_write_each_still_its_own_event(served: ServedModel) -> None:
    """A trial at 200 streams: one socket write per token cost the gateway's loop most of its time,
    and every endpoint answered hundreds of ms late. Events are held until the relay finds no more
    of the request's chunks waiting (``flush``): three chunks that came together are one write, and
    the client still reads one event per chunk, in order."""
    import aiohttp
    from aiohttp import web
    from aiohttp.test_utils import TestServer

    from dlora.common.messages import TokenChunk
    from dlora.model.token_bytes import TokenText
    from dlora.services.gateway.responses import ResponseWriter, RunningChoice

    job = shape(served, {"prompt": "kalo", "max_tokens": 4, "stream": True})
    writes: list[bytes] = []

    async def handler(request: web.Request) -> web.StreamResponse:
        choice = RunningChoice.of(job.choices[0])
        rid = choice.request.request_id if choice.request else ""
        writer = ResponseWriter(request, job, [choice], TokenText(served.tokenizer, served.vocab_size))
        chunks = [TokenChunk(request_id=rid, seq=i, token_ids=[5 + i], text=f"t{i}") for i in range(3)]
        for chunk in chunks:
            await writer.add(choice, chunk)
        assert writer.stream is not None
        real = writer.stream.write

        async def counted(data: bytes) -> None:
            writes.append(bytes(data))
            await real(data)

        writer.stream.write = counted  # type: ignore[method-assign]
        await writer.flush()
        await writer.add(choice, TokenChunk(request_id=rid, seq=3, token_ids=[9], text="!", finish_reason="length"))
        return await writer.finish(4)

    app = web.Application()
    app.router.add_post("/", handler)
    async with TestServer(app, host="127.0.0.1") as server, aiohttp.ClientSession() as session:
        async with session.post(server.make_url("/")) as resp:
            body = (await resp.read()).decode()
    assert [w.count(b"data: ") for w in writes] == [3, 2]  # the three held: one write; the last and its end
    assert writes[1].endswith(b"data: [DONE]\n\n")
    texts = [json.loads(line[6:])["choices"][0]["text"] for line in body.splitlines() if line.startswith("data: {")]
    assert texts == ["t0", "t1", "t2", "!"]
    assert body.rstrip().endswith("data: [DONE]")


def test_a_pythonic_reading_knows_the_requests_tools(served: ServedModel) -> None:
    """A list after text is calls only where it names one of the request's tools
    (tool_pythonic.PythonicReader.names): the names reach the reply's shape."""
    reading = dataclasses.replace(served, tool_call_parser="pythonic")
    user = {"role": "user", "content": "hi"}
    tools = [{"type": "function", "function": {"name": name}} for name in ("get_weather", "get_date")]
    job = shape(reading, {"messages": [user], "tools": tools}, chat=True)
    assert job.shape.tool_parser == "pythonic" and job.shape.tool_names == frozenset({"get_weather", "get_date"})
