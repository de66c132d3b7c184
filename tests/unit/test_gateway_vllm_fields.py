"""The vLLM request fields a chat or completion body may carry beyond OpenAI's: structured outputs
(structured_outputs, guided_*), tools with a named tool_choice, cache_salt, and vLLM's fields taken
at their defaults. The shaping itself is tested in test_gateway_shaping."""

from __future__ import annotations

import copy
import dataclasses
import json
from typing import Any

import msgspec

from dlora.common.messages import SamplingParams
from dlora.services.gateway import chat_template
from dlora.services.gateway.openai import ChatMessage
from dlora.services.gateway.served_model import ServedModel
from tests.unit.test_gateway_shaping import refused, served, shape  # noqa: F401 - served: a fixture


def test_vllms_structured_output_fields_on_either_endpoint(served: ServedModel) -> None:  # noqa: F811 - served: the fixture imported
    """vLLM's structured_outputs and its older guided_* fields, on completions and chat alike, and
    response_format on completions (vLLM's CompletionRequest has it): one at a time, each named
    when refused."""
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    msgs = [{"role": "user", "content": "kalo"}]
    for extra, field, value in (
        ({"guided_json": schema}, "json_schema", json.dumps(schema)),
        ({"guided_json": json.dumps(schema)}, "json_schema", json.dumps(schema)),
        ({"structured_outputs": {"json": schema}}, "json_schema", json.dumps(schema)),
        ({"structured_outputs": {"json_object": True}}, "json_schema", '{"type": "object"}'),
        ({"response_format": {"type": "json_object"}}, "json_schema", '{"type": "object"}'),
        ({"guided_regex": "[0-9]+"}, "regex", "[0-9]+"),
        ({"structured_outputs": {"regex": "a|b"}}, "regex", "a|b"),
        ({"guided_choice": ["yes", "no"]}, "choice", ["yes", "no"]),
        ({"structured_outputs": {"choice": ["x"]}}, "choice", ["x"]),
        ({"guided_regex": "a", "guided_decoding_backend": "xgrammar"}, "regex", "a"),  # the backend: llguidance
        (
            {"structured_outputs": {"regex": "a", "disable_any_whitespace": True, "disable_fallback": True}},
            "regex",
            "a",
        ),
        ({"guided_grammar": 'root ::= "a"'}, "grammar", 'root ::= "a"'),
        ({"structured_outputs": {"grammar": 'start: "a"'}}, "grammar", 'start: "a"'),
    ):
        for body, chat in (({"prompt": "kalo", **extra}, False), ({"messages": msgs, **extra}, True)):
            params = shape(served, body, chat=chat).choices[0].request.params
            assert getattr(params, field) == value, (extra, chat)
    for extra, param, fragment in (
        ({"guided_regex": "a", "guided_choice": ["b"]}, "guided_choice", "at most one structured output"),
        ({"response_format": {"type": "json_object"}, "guided_json": schema}, "guided_json", "at most one"),
        ({"structured_outputs": {"regex": "a", "choice": ["b"]}}, "structured_outputs", "at most one"),
        ({"guided_regex": "(unclosed"}, "guided_regex", "regex cannot be"),
        ({"guided_grammar": "start: nowhere"}, "guided_grammar", "grammar cannot be"),
        ({"guided_choice": []}, None, None),  # empty: nothing asked, as vLLM's falsy check reads it
        ({"guided_choice": [], "guided_regex": "a"}, None, None),  # so beside another, one is asked
        # a structured_outputs naming no constraint ran free and answered 200 (a replayed vLLM
        # report); vLLM refuses it ("none are specified")
        ({"structured_outputs": {}}, "structured_outputs", "names no constraint"),
        ({"structured_outputs": {"choice": []}}, "structured_outputs", "names no constraint"),
        ({"structured_outputs": {"disable_fallback": True}}, "structured_outputs", "names no constraint"),
        ({"structured_outputs": {"json_object": False}}, "structured_outputs", "names no constraint"),
        # beside another constraint its backend options are served, as before (clients send them so)
        ({"guided_regex": "a", "structured_outputs": {"disable_fallback": True}}, None, None),
        ({"guided_json": {"type": "integer", "minimum": 5, "maximum": 1}}, "guided_json", "guided_json schema cannot"),
        ({"guided_whitespace_pattern": " "}, "guided_whitespace_pattern", "not supported"),
        ({"structured_outputs": {"regex": "a", "structural_tag": {}}}, "structured_outputs.structural_tag", "not"),
        ({"guided_choice": ["", "x"]}, "guided_choice", "guided_choice must hold non-empty strings"),
        ({"structured_outputs": {"json": "not json"}}, "structured_outputs", "not a JSON object"),
        # read in order: a schema-less json_schema is named before there are two (a review caught a
        # refactor that counted first)
        ({"response_format": {"type": "json_schema"}, "guided_regex": "a"}, "response_format", "needs a 'schema'"),
    ):
        if param is None:
            params = shape(served, {"prompt": "kalo", **extra}).choices[0].request.params
            assert params.choice == [] and params.regex == extra.get("guided_regex")
            continue
        e = refused(served, {"prompt": "kalo", **extra})
        assert (e.status, e.param) == (400, param) and fragment in e.message, (extra, e.message)


def test_auto_tools_without_a_parser_say_where_the_parser_is_set(served: ServedModel) -> None:  # noqa: F811 - served: the fixture imported
    """A fresh user's trial: tools with the default tool_choice under `make run` got a 400 naming
    "the gateway's tool_call_parser" with no word of where a gateway takes it (vLLM's own names its
    flags)."""
    tools = [{"type": "function", "function": {"name": "ping"}}]
    e = refused(served, {"messages": [{"role": "user", "content": "kalo"}], "tools": tools}, chat=True)
    assert (e.status, e.param) == (400, "tool_choice")
    assert "DLORA_GATEWAY_TOOL_CALL_PARSER" in e.message and "hermes" in e.message
    assert "granite-20b-fc" in e.message  # every parser the gateway takes (the list was written by hand)


def test_tools_named_or_required_constrain_the_output_auto_needs_a_parser(served: ServedModel) -> None:  # noqa: F811 - served: the fixture imported
    schema = {"type": "object", "properties": {"q": {"type": "integer"}}, "required": ["q"]}
    tools = [
        {"type": "function", "function": {"name": "lookup", "parameters": schema}},
        {"type": "function", "function": {"name": "ping"}},
    ]
    msgs = [{"role": "user", "content": "kalo"}]
    named = {"messages": msgs, "tools": tools, "tool_choice": {"type": "function", "function": {"name": "lookup"}}}
    job = shape(served, named, chat=True)
    assert job.shape.tool == "lookup" and json.loads(job.choices[0].request.params.json_schema) == schema
    job = shape(served, {**named, "tool_choice": {"type": "function", "function": {"name": "ping"}}}, chat=True)
    no_arguments = {"type": "object", "properties": {}}  # OpenAI's empty parameter list: {} alone
    assert json.loads(job.choices[0].request.params.json_schema) == no_arguments
    untyped = [  # {} or no type: an object still (as a schema {} took any value: the model wrote a number)
        {"type": "function", "function": {"name": "empty", "parameters": {}}},
        {"type": "function", "function": {"name": "props", "parameters": {"properties": {"q": {"type": "integer"}}}}},
    ]
    for name, expected in (
        ("empty", no_arguments),
        ("props", {"type": "object", "properties": {"q": {"type": "integer"}}}),
    ):
        body = {"messages": msgs, "tools": untyped, "tool_choice": {"type": "function", "function": {"name": name}}}
        assert json.loads(shape(served, body, chat=True).choices[0].request.params.json_schema) == expected
    job = shape(served, {"messages": msgs, "tools": tools, "tool_choice": "none"}, chat=True)
    assert job.shape.tool is None and job.choices[0].request.params.json_schema is None
    # "required": a list of calls of any of the tools, one at most without parallel calls
    required = {"messages": msgs, "tools": tools, "tool_choice": "required"}
    job = shape(served, required, chat=True)
    assert job.shape.tools_required and job.shape.tool is None
    listed = json.loads(job.choices[0].request.params.json_schema)
    assert listed["type"] == "array" and listed["minItems"] == 1 and "maxItems" not in listed
    assert [item["properties"]["name"]["enum"] for item in listed["items"]["anyOf"]] == [["lookup"], ["ping"]]
    # "auto" (the default with tools): served where the gateway has a tool_call_parser, unconstrained
    hermes = dataclasses.replace(served, tool_call_parser="hermes")
    for auto in ({"messages": msgs, "tools": tools}, {"messages": msgs, "tools": tools, "tool_choice": "auto"}):
        job = shape(hermes, auto, chat=True)
        assert job.shape.tool_parser == "hermes" and job.choices[0].request.params.json_schema is None
    assert shape(hermes, required, chat=True).shape.tool_parser == ""  # the others as they are
    # hermes: special tokens kept (some models' <tool_call> tags are special), unless the client says
    auto = {"messages": msgs, "tools": tools}
    assert not shape(hermes, auto, chat=True).choices[0].request.params.skip_special_tokens
    assert shape(hermes, {**auto, "skip_special_tokens": True}, chat=True).choices[0].request.params.skip_special_tokens
    llama = dataclasses.replace(served, tool_call_parser="llama3_json")
    assert shape(llama, auto, chat=True).choices[0].request.params.skip_special_tokens
    job = shape(served, {**required, "parallel_tool_calls": False}, chat=True)
    assert json.loads(job.choices[0].request.params.json_schema)["maxItems"] == 1
    odd = [{"type": "function", "function": {"name": "odd", "parameters": {"$defs": [1]}}}]  # not lifted: was a 500
    assert shape(served, {**required, "tools": [*tools, *odd]}, chat=True).shape.tools_required
    # an assistant's earlier call and the tool's answer are part of the conversation
    call = {"id": "c1", "type": "function", "function": {"name": "ping", "arguments": "{}"}}
    history = [
        *msgs,
        {"role": "assistant", "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "c1", "content": "ok"},
    ]
    ids = chat_template.chat_prompt_ids(msgspec.convert(history, list[ChatMessage]), served.tokenizer)
    assert '"name": "ping"' in served.tokenizer.decode(ids)  # without a template: the call as its JSON
    deep: dict[str, object] = {"type": "object"}
    for _ in range(300):
        deep = {"type": "object", "properties": {"a": deep}}
    deep_tools = [{"type": "function", "function": {"name": "deep", "parameters": deep}}]
    for body, fragment in (
        ({"messages": msgs, "tools": deep_tools, "tool_choice": "required"}, "recursion"),  # was a 500
        ({"messages": msgs, "tools": tools}, '"auto"'),  # the default with tools
        ({"messages": msgs, "tools": tools, "tool_choice": "auto"}, '"auto"'),
        ({"messages": msgs, "tool_choice": "required"}, "`tools` must be set"),
        ({"messages": msgs, "tool_choice": "auto"}, "`tools` must be set"),  # taken before (vLLM, OpenAI: 400)
        ({**named, "tool_choice": "required", "response_format": {"type": "json_object"}}, "at most one structured"),
        ({"messages": msgs, "tool_choice": named["tool_choice"]}, "`tools` must be set"),
        ({**named, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "not among the tools"),
        ({**named, "tool_choice": "sometimes"}, "tool_choice must be"),
        ({**named, "tool_choice": {"type": "function", "function": "lookup"}}, "tool_choice must be"),  # was a 500
        ({**named, "tool_choice": {"type": "function", "function": None}}, "tool_choice must be"),
        ({**named, "response_format": {"type": "json_object"}}, "at most one structured output"),
    ):
        e = refused(served, body, chat=True)
        assert e.status == 400 and fragment in e.message, (body, e.message)
    e = refused(
        served,
        {"messages": msgs, "tools": [{"type": "retrieval", "function": {"name": "x"}}], "tool_choice": "none"},
        chat=True,
    )
    assert (e.param, e.message) == ("tools", "tools of type 'retrieval' are not supported (only function)")
    e = refused(served, {"messages": [{"role": "user", "content": "x", "tool_calls": [call]}]}, chat=True)
    assert e.message == "messages: tool_calls in a user message is not supported"


def test_vllms_fields_at_their_defaults_are_taken_others_refused_by_name(served: ServedModel) -> None:  # noqa: F811 - served: the fixture imported
    defaults = {"spaces_between_special_tokens": True, "use_beam_search": False, "length_penalty": 1.0}
    assert shape(served, {"prompt": "kalo", **defaults}).choices[0].request is not None
    for field, value in (("use_beam_search", True), ("length_penalty", 2), ("spaces_between_special_tokens", "no")):
        e = refused(served, {"prompt": "kalo", field: value})
        assert (e.status, e.param) == (400, field) and "only its default" in e.message


class _SlowTokenizer:
    """``tokenizer`` with a slow transformers tokenizer's decode, which spaces added tokens apart
    by default."""

    def __init__(self, tokenizer: Any) -> None:
        self.encode, self.added_tokens_decoder = tokenizer.encode, {0: "<pad>", 1: "<s>"}

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        return " ".join(self.added_tokens_decoder.get(i, "x") for i in ids)


def test_spaces_between_special_tokens_false_is_taken_where_decode_spaces_nothing(served: ServedModel) -> None:  # noqa: F811 - served: the fixture imported
    """vLLM #1347, #33457: ``spaces_between_special_tokens: false`` asks that added tokens side by
    side be written without a space between them, as a Rust tokenizer's decode (the workers')
    writes them anyway: it was refused as a value "not supported"."""
    body = {"prompt": "kalo", "skip_special_tokens": False, "spaces_between_special_tokens": False}
    assert not served.spaces_added_tokens
    assert shape(served, body).choices[0].request is not None
    spaced = dataclasses.replace(served, tokenizer=_SlowTokenizer(served.tokenizer))  # type: ignore[arg-type]
    assert spaced.spaces_added_tokens
    e = refused(spaced, body)
    assert (e.status, e.param) == (400, "spaces_between_special_tokens") and "only its default" in e.message


def test_cache_salt_goes_with_the_request_and_must_not_be_empty(served: ServedModel) -> None:  # noqa: F811 - served: the fixture imported
    assert shape(served, {"prompt": "kalo", "cache_salt": "s3cret"}).choices[0].request.cache_salt == "s3cret"
    assert shape(served, {"prompt": "kalo"}).choices[0].request.cache_salt == ""
    for salt in ("", "x" * 1025):  # vLLM refuses an empty one; a long one is hashed into every block's key
        e = refused(served, {"prompt": "kalo", "cache_salt": salt})
        assert (e.status, e.param) == (400, "cache_salt") and "non-empty" in e.message


def test_a_request_id_names_the_response_not_the_requests_inside(served: ServedModel) -> None:  # noqa: F811 - served: the fixture imported
    """vLLM's request_id: the response's id carries it; the requests to the workers keep their
    own unique ids (two clients choosing the same one must not meet in the workers' records)."""
    job = shape(served, {"messages": [{"role": "user", "content": "kalo"}], "request_id": "trace-7", "n": 2}, chat=True)
    assert job.shape.request_id == "chatcmpl-trace-7"
    assert job.shape.call_ids == "1"  # tool calls' ids from dlora's own id (the helper's "cmpl-1"), not the client's
    assert len({c.request.request_id for c in job.choices}) == 2 and "trace-7" not in job.choices[0].request.request_id
    assert shape(served, {"prompt": "kalo", "request_id": "t"}).shape.request_id == "cmpl-t"
    for bad in ("", "x" * 257, "a\nb"):
        e = refused(served, {"prompt": "kalo", "request_id": bad})
        assert (e.status, e.param) == (400, "request_id"), bad


def test_a_reply_sent_back_as_the_client_dumped_it_is_history(served: ServedModel) -> None:  # noqa: F811 - served: the fixture imported
    """The openai package's message.model_dump() of a reply carries annotations (OpenAI's) and a
    reasoning parser's reasoning_content (vLLM's): sent back, they were 400s (unknown fields).
    The thinking goes to the template as reasoning_content; annotations are not rendered."""
    tokenizer = copy.copy(served.tokenizer)
    tokenizer.chat_template = (  # type: ignore[attr-defined]
        "{% for m in messages %}{{ m.role }}[{{ m.get('reasoning_content', '') }}]{{ m.content }}\n{% endfor %}"
    )
    dumped = {"role": "assistant", "content": "remi", "annotations": None, "refusal": None, "tool_calls": None}
    for thought in ({"reasoning_content": "hmm"}, {"reasoning": "hmm"}):
        history = [{"role": "user", "content": "kalo"}, dumped | thought | {"annotations": []}]
        ids = chat_template.chat_prompt_ids(msgspec.convert(history, list[ChatMessage]), tokenizer)
        assert "assistant[hmm]remi" in tokenizer.decode(ids)


def test_thousands_of_choices_are_served(served: ServedModel) -> None:  # noqa: F811 - served: the fixture imported
    """A guided_choice of 300 intents to classify into was a 400 ("at most 256", a cap borrowed
    from stop strings; vLLM caps none), and past 1,999 llguidance's parser failed every request at
    its first token ("Current row has 2001 items; max is 2000"): served as one lexeme, 5,000
    compile in 0.1 s (as a rule's alternatives, 50,000 took 10 s; as one lexeme 0.4 s)."""
    from dlora.services.worker.engine.structured import Grammars
    from tests.unit.test_token_bytes import byte_level

    labels = [f"intent-{i:04d}" for i in range(5_000)]
    for body in ({"guided_choice": labels}, {"structured_outputs": {"choice": labels}}):
        params = shape(served, {"prompt": "kalo", **body}).choices[0].request.params
        assert params.choice == labels
    hf = byte_level()
    grammars = Grammars(hf, len(hf), {hf.eos_token_id})
    for choices, text, ok in (
        (labels, labels[-1], True),
        (labels, "intent-5000", False),
        (["a", "ab"], "a", True),  # one a prefix of another: either
        (["a", "ab"], "ab", True),
        (['he said "hi"', "back\\slash", "new\nline", "ünï😀"], "ünï😀", True),
        (['he said "hi"', "back\\slash"], "back\\slash", True),
    ):
        matcher = grammars.matcher(SamplingParams(choice=choices), [])
        assert matcher is not None
        taken = matcher.consume_tokens(hf.encode(text, add_special_tokens=False))
        assert (taken and matcher.is_accepting()) is ok, (choices[:3], text)
