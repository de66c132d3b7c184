"""Chat rendering of a tool conversation's history (``services/gateway/chat_template.py``): call
ids as a Mistral template takes them, arguments as objects or, for a template that splices them,
as the client's text, named ``tool_use`` templates, and refusals naming the field at fault
(``tools``, ``chat_template_kwargs``, ``messages``); with the tiny model's tokenizer, no servers."""

from __future__ import annotations

from pathlib import Path

import pytest

from dlora.services.gateway import chat_template
from dlora.services.gateway.openai import APIError, ChatMessage
from dlora.services.gateway.served_model import ServedModel
from tests.unit.test_chat_template import llama_style_tokenizer
from tests.unit.test_gateway_shaping import CONTEXT, refused, served, shape  # noqa: F401 - served: a fixture


def test_a_historys_call_ids_are_cut_to_what_a_mistral_template_takes(tiny_llama, tmp_path: Path) -> None:
    """Mistral's templates raise unless each call id is 9 alphanumeric characters; a client's own
    ids (OpenAI's "call_..." or another server's) are cut to their last 9 with the mistral parser,
    as vLLM cuts them; without it they reach the template as sent."""
    tok = llama_style_tokenizer(tiny_llama.model, tmp_path / "model")
    tok.chat_template = (
        "{% for m in messages %}{% for c in m.tool_calls or [] %}"
        "{% if c.id | length != 9 %}{{ raise_exception('Tool call IDs should be alphanumeric, length 9!') }}"
        "{% endif %}[{{ c.id }}]{% endfor %}{% if m.tool_call_id %}({{ m.tool_call_id }}){% endif %}{% endfor %}"
    )
    call = {"id": "call_0123456789abc", "type": "function", "function": {"name": "f", "arguments": "{}"}}
    msgs = [
        ChatMessage(role="user", content="hi"),
        ChatMessage(role="assistant", tool_calls=[call]),
        ChatMessage(role="tool", content="42", tool_call_id="call_0123456789abc"),
    ]
    ids = chat_template.chat_prompt_ids(msgs, tok, chat_template.ChatTemplate(call_id_length=9))
    assert tok.decode(ids).endswith("[456789abc](456789abc)")
    with pytest.raises(APIError, match="length 9"):
        chat_template.chat_prompt_ids(msgs, tok)
    # the gateway's mistral parser cuts them on the way in, and its answers' ids are 9 characters
    model = ServedModel(tok, 1 << 16, 1024, tool_call_parser="mistral")
    history = [{"role": "user", "content": "hi"}, {"role": "assistant", "tool_calls": [call]}]
    body = {"messages": history, "tools": [TOOL]}
    job = shape(model, body, chat=True)
    assert tok.decode(job.choices[0].request.prompt_token_ids).endswith("[456789abc]")
    assert job.shape.call_id_length == 9


TOOL = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}


def test_named_templates_are_read_as_the_one_rendered(tiny_llama, tmp_path: Path) -> None:
    """A tokenizer_config.json that lists named templates (Hermes 2 Pro's, Command R's: "default"
    and "tool_use") was read as having none that loops over content: a "default" that loops got
    the message as a string, and the user's text rendered as nothing (a helper, replaying real
    model directories; vLLM resolves the named template first)."""
    tok = llama_style_tokenizer(tiny_llama.model, tmp_path / "model")
    loop = "{% for m in messages %}<{{ m.role }}>{% for p in m['content'] %}{{ p['text'] }}|{% endfor %}{% endfor %}"
    tok.chat_template = {"default": loop, "tool_use": loop + "tools"}
    msgs = [ChatMessage(role="user", content="hi")]
    assert tok.decode(chat_template.chat_prompt_ids(msgs, tok)).endswith("<user>hi|")
    tools = [{"type": "function", "function": {"name": "f"}}]
    asked = chat_template.ChatTemplate(tools=tools)
    assert tok.decode(chat_template.chat_prompt_ids(msgs, tok, asked)).endswith("<user>hi|tools")
    tok.chat_template = {"default": "{{ messages[0].content }}", "tool_use": loop}  # only tool_use loops
    assert tok.decode(chat_template.chat_prompt_ids(msgs, tok)).endswith("hi")
    assert tok.decode(chat_template.chat_prompt_ids(msgs, tok, asked)).endswith("<user>hi|")


def test_a_tool_the_template_cannot_write_is_blamed_on_tools(tiny_llama, tmp_path: Path) -> None:
    """Hermes 2 Pro's tool_use template writes each tool as ``" - " + tool.description``: a tool
    without a description (optional in OpenAI's schema, null as vLLM gives it) was refused as
    "messages: ... can only concatenate str (not "NoneType") to str", naming messages that were
    fine (a helper, replaying history reports with real templates). The tools are named where the
    conversation renders without them; the messages still where it does not either."""
    tok = llama_style_tokenizer(tiny_llama.model, tmp_path / "model")
    tok.chat_template = (
        "{% for t in tools or [] %}{{ t.function.name + ' - ' + t.function.description }}{% endfor %}"
        "{% for m in messages %}{{ m.content }}{% endfor %}"
        "{{ raise_exception('no user') if messages[0].role != 'user' }}"
    )
    model = ServedModel(tok, 1 << 16, 1024)
    undescribed = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}
    body = {"messages": [{"role": "user", "content": "hi"}], "tools": [undescribed], "tool_choice": "none"}
    e = refused(model, body, chat=True)
    assert (e.status, e.param) == (400, "tools") and e.message.startswith("tools: the model's chat template refused")
    described = {"type": "function", "function": {"name": "f", "description": "d"}}
    assert tok.decode(shape(model, body | {"tools": [described]}, chat=True).choices[0].request.prompt_token_ids)
    # the messages' fault too: they do not render without the tools either
    assert refused(model, body | {"messages": [{"role": "system", "content": "x"}]}, chat=True).param == "messages"


def test_a_historys_short_call_ids_are_filled_to_what_a_mistral_template_takes(tiny_llama, tmp_path: Path) -> None:
    """Ids are the client's to make (OpenAI's spec: any string): agents that number their calls
    ("turn1_0", "1") sent them back and Mistral's template refused the conversation (a helper,
    replaying mlx-lm #1375's kind), while longer ids were cut to fit. Short ones are filled with
    their length and zeros to the length the mistral parser serves, the call and its answer alike."""
    tok = llama_style_tokenizer(tiny_llama.model, tmp_path / "model")
    tok.chat_template = (
        "{% for m in messages %}{% for c in m.tool_calls or [] %}"
        "{% if c.id | length != 9 %}{{ raise_exception('Tool call IDs should be alphanumeric, length 9!') }}"
        "{% endif %}[{{ c.id }}]{% endfor %}{% if m.tool_call_id %}({{ m.tool_call_id }}){% endif %}{% endfor %}"
    )
    calls = [{"id": i, "type": "function", "function": {"name": "f", "arguments": "{}"}} for i in ("turn1_0", "1")]
    msgs = [
        ChatMessage(role="user", content="hi"),
        ChatMessage(role="assistant", tool_calls=calls),
        ChatMessage(role="tool", content="42", tool_call_id="turn1_0"),
        ChatMessage(role="tool", content="43", tool_call_id="1"),
    ]
    ids = chat_template.chat_prompt_ids(msgs, tok, chat_template.ChatTemplate(call_id_length=9))
    assert tok.decode(ids).endswith("[70turn1_0][100000001](70turn1_0)(100000001)")
    # without the mistral parser they reach the template as sent
    with pytest.raises(APIError, match="length 9"):
        chat_template.chat_prompt_ids(msgs, tok)


def test_a_calls_arguments_nested_too_deeply_are_refused_by_name(served: ServedModel) -> None:  # noqa: F811 - served: the fixture imported
    """A history's call whose arguments are JSON nested deeper than json.loads follows (200 KB of
    brackets, within the body's limit) raised RecursionError out of the rendering: a 500 "internal
    error" (a helper; vLLM answers it 400)."""
    deep = "[" * 100_000 + "]" * 100_000
    call = {"id": "c", "type": "function", "function": {"name": "f", "arguments": deep}}
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "tool_calls": [call]}]
    e = refused(served, {"messages": msgs}, chat=True)
    assert (e.status, e.param) == (400, "messages")
    assert e.message == "messages[1].tool_calls[0].function.arguments: JSON nested too deeply"


def test_a_template_that_splices_arguments_as_text_gets_the_clients_text(tiny_llama, tmp_path: Path) -> None:
    """A history's call arguments are given to templates as objects (vLLM's way: they write
    ``arguments | tojson``), but DeepSeek's V3/R1 templates (and the R1 distills') splice them
    into the prompt with ``+``: every follow-up turn of a tool conversation was a 400 "can only
    concatenate str (not "dict") to str" (a helper, replaying mlx-lm #1065 / SGLang #9898's kind).
    Such a template gets the arguments as the client's JSON text; one that takes objects still
    gets objects."""
    tok = llama_style_tokenizer(tiny_llama.model, tmp_path / "model")
    tok.chat_template = (
        "{% for m in messages %}{% for c in m.tool_calls or [] %}"
        "{{ '<call>' + c['function']['name'] + '\\n```json\\n' + c['function']['arguments'] + '\\n```' }}"
        "{% endfor %}{% if m.role != 'assistant' %}<{{ m.role }}>{{ m.content }}{% endif %}{% endfor %}"
    )
    calls = [
        {"id": "a", "type": "function", "function": {"name": "f", "arguments": '{"city": "Paris"}'}},
        {"id": "b", "type": "function", "function": {"name": "g", "arguments": {"tz": "CET"}}},
        {"id": "c", "type": "function", "function": {"name": "h"}},
    ]
    msgs = [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": None, "tool_calls": calls},
        {"role": "tool", "tool_call_id": "a", "content": "22C"},
    ]
    model = ServedModel(tok, 1 << 16, 1024)
    text = tok.decode(shape(model, {"messages": msgs}, chat=True).choices[0].request.prompt_token_ids)
    spliced = '<call>f\n```json\n{"city": "Paris"}\n```<call>g\n```json\n{"tz": "CET"}\n```<call>h\n```json\n{}\n```'
    assert text.endswith("<user>hi" + spliced + "<tool>22C")
    arguments = "c['function']['arguments']"
    tok.chat_template = tok.chat_template.replace(f"+ {arguments} +", f"+ {arguments} | tojson +")
    text = tok.decode(shape(model, {"messages": msgs}, chat=True).choices[0].request.prompt_token_ids)
    assert '```json\n{"city": "Paris"}\n```' in text  # objects, written once (not a quoted string)
    tok.chat_template += "{{ raise_exception('no') }}"  # a refusal of both is the template's reason, as before
    e = refused(model, {"messages": msgs}, chat=True)
    assert (e.param, e.message) == ("messages", "messages: the model's chat template refused them: no")


def test_a_splicing_templates_refusal_of_the_tools_still_names_tools(tiny_llama, tmp_path: Path) -> None:
    """A template that splices a call's arguments with ``+`` refuses the history's objects; where it
    refused the tools as well (a tool without a description, Hermes-style), the trial without the
    tools was made with the objects again, failed on them, and the refusal named the messages,
    which render (a review of 0304aea)."""
    tok = llama_style_tokenizer(tiny_llama.model, tmp_path / "model")
    tok.chat_template = (
        "{% for t in tools or [] %}{{ t.function.name + ' - ' + t.function.description }}{% endfor %}"
        "{% for m in messages %}{% for c in m.tool_calls or [] %}{{ c.function.name + c.function.arguments }}"
        "{% endfor %}{{ m.content }}{% endfor %}{{ prefix + '' if prefix is defined }}"
    )
    model = ServedModel(tok, 1 << 16, 1024)
    call = {"id": "a", "type": "function", "function": {"name": "f", "arguments": '{"x": 1}'}}
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": None, "tool_calls": [call]}]
    undescribed = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}
    body = {"messages": msgs, "tools": [undescribed], "tool_choice": "none"}
    assert refused(model, body, chat=True).param == "tools"
    described = {"type": "function", "function": {"name": "f", "description": "d"}}
    kwargs = {"chat_template_kwargs": {"prefix": 5}}  # int + str: the kwargs' fault
    assert refused(model, body | {"tools": [described]} | kwargs, chat=True).param == "chat_template_kwargs"


def test_short_call_ids_that_differ_only_in_leading_zeros_stay_apart(tiny_llama, tmp_path: Path) -> None:
    """Filled with zeros alone, "1" and "01" (and "0001") became one id, 000000001: the model saw
    two calls and two answers under it and could not tell which answered which (a review of
    137e02b). Each short id is filled to its own 9 characters."""
    tok = llama_style_tokenizer(tiny_llama.model, tmp_path / "model")
    tok.chat_template = (
        "{% for m in messages %}{% for c in m.tool_calls or [] %}[{{ c.id }}]{% endfor %}"
        "{% if m.tool_call_id %}({{ m.tool_call_id }}){% endif %}{% endfor %}"
    )
    sent = ["1", "01", "0001", "", "00000001"]
    calls = [{"id": i, "type": "function", "function": {"name": "f", "arguments": "{}"}} for i in sent]
    msgs = [ChatMessage(role="user", content="hi"), ChatMessage(role="assistant", tool_calls=calls)]
    text = tok.decode(chat_template.chat_prompt_ids(msgs, tok, chat_template.ChatTemplate(call_id_length=9)))
    fitted = text[text.index("[") :].strip("[]").split("][")
    assert len(set(fitted)) == len(sent) and all(len(f) == 9 for f in fitted), fitted


def test_a_template_that_takes_objects_and_fails_on_them_is_not_given_text(tiny_llama, tmp_path: Path) -> None:
    """The text arguments are for a template that splices them with ``+`` (a TypeError on objects).
    One that writes ``arguments | tojson`` and failed on them otherwise (nested 600 deep: past
    the recursion its tojson has, though json.loads read them) was given the text instead, and
    wrote it as a quoted string: a 200 on a prompt the model was never meant to see (a review of
    0304aea). Its refusal stands, naming the messages."""
    tok = llama_style_tokenizer(tiny_llama.model, tmp_path / "model")
    tok.chat_template = (
        "{% for m in messages %}{% for c in m.tool_calls or [] %}<{{ c.function.arguments | tojson }}>"
        "{% endfor %}{{ m.content }}{% endfor %}"
    )
    deep = '{"a": ' + "[" * 600 + "]" * 600 + "}"
    call = {"id": "a", "type": "function", "function": {"name": "f", "arguments": deep}}
    msgs = [ChatMessage(role="user", content="hi"), ChatMessage(role="assistant", tool_calls=[call])]
    with pytest.raises(APIError, match="recursion") as e:
        tok.decode(chat_template.chat_prompt_ids(msgs, tok))
    assert e.value.param == "messages"
