"""Chat rendering (``services/gateway/chat_template.py``): a chat request's messages to its
prompt's ids, through the model's template with vLLM's rendering options, or a plain transcript,
and the 4xx for messages a template cannot take; with the tiny model's tokenizer, no servers."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from dlora.services.gateway import chat_template, openai
from dlora.services.gateway.openai import APIError, ChatMessage
from dlora.services.gateway.served_model import ServedModel
from tests.unit.test_gateway_shaping import CONTEXT, refused, served, shape  # noqa: F401 - served: a fixture


def test_only_an_assistant_message_may_leave_out_its_content(served: ServedModel) -> None:  # noqa: F811 - served: the fixture imported
    for role in ("user", "system", "tool", "developer"):
        e = refused(served, {"messages": [{"role": role}]}, chat=True)
        assert (e.param, e.message) == ("messages", f"messages: a {role} message needs content")
    msgs = [{"role": "user", "content": "kalo"}, {"role": "assistant"}, {"role": "user", "content": "remi"}]
    assert shape(served, {"messages": msgs}, chat=True).choices


class _Chars:
    """A tokenizer without a chat template: one id per character."""

    def encode(self, text: str) -> list[int]:
        return [ord(c) for c in text]


def test_chat_prompt_without_a_template_is_a_transcript(served: ServedModel) -> None:  # noqa: F811 - served: the fixture imported
    msgs = [
        ChatMessage(role="system", content="be brief"),
        ChatMessage(role="user", content=[openai.ContentPart(type="text", text=t) for t in ("hi", "there")]),
    ]
    transcript = "system: be brief\nuser: hi\nthere\nassistant:"  # parts joined by newlines, as vLLM joins them
    assert chat_template.chat_prompt_ids(msgs, tokenizer=_Chars()) == [ord(c) for c in transcript]
    with pytest.raises(APIError, match="role"):
        chat_template.chat_prompt_ids([ChatMessage(role="robot", content="x")], tokenizer=_Chars())
    # the tiny model has no template either: the transcript, through its own tokenizer
    job = shape(served, {"messages": [{"role": "user", "content": "kalo"}], "n": 2}, chat=True)
    ids = served.tokenizer.encode("user: kalo\nassistant:")
    assert job.shape.chat and job.prompt_tokens == len(ids)
    assert [c.request.prompt_token_ids for c in job.choices] == [ids, ids] and [c.echo for c in job.choices] == ["", ""]
    e = refused(served, {"messages": [{"role": "user", "content": [{"type": "text"}]}]}, chat=True)
    assert (e.status, e.param) == (400, "messages") and "needs its text" in e.message
    image = [{"type": "image_url", "image_url": {}}]
    e = refused(served, {"messages": [{"role": "user", "content": image}]}, chat=True)
    assert (e.status, e.param) == (400, "messages") and "image_url" in e.message


def llama_style_tokenizer(model_dir: Path, out: Path):
    """The tiny model's tokenizer made Llama-like: it adds BOS itself, and its chat template writes
    {{ bos_token }} too (Llama-2/3 and Mistral checkpoints do both)."""
    from transformers import AutoTokenizer

    shutil.copytree(model_dir, out)
    tj = json.loads((out / "tokenizer.json").read_text())
    bos = {"SpecialToken": {"id": "<s>", "type_id": 0}}
    a, b = {"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}
    tj["post_processor"] = {
        "type": "TemplateProcessing",
        "single": [bos, a],
        "pair": [bos, a, b],
        "special_tokens": {"<s>": {"id": "<s>", "ids": [1], "tokens": ["<s>"]}},
    }
    (out / "tokenizer.json").write_text(json.dumps(tj))
    conf = json.loads((out / "tokenizer_config.json").read_text())
    conf["chat_template"] = (
        "{{ bos_token }}{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}[assistant] {% endif %}"
    )
    (out / "tokenizer_config.json").write_text(json.dumps(conf))
    return AutoTokenizer.from_pretrained(out)


def test_a_template_that_writes_bos_gets_one_bos(tiny_llama, tmp_path: Path) -> None:
    tok = llama_style_tokenizer(tiny_llama.model, tmp_path / "model")
    assert tok.encode("kalo")[0] == tok.bos_token_id  # the tokenizer adds one by itself
    msgs = [ChatMessage(role="system", content="be brief"), ChatMessage(role="user", content="kalo remi")]
    ids = chat_template.chat_prompt_ids(msgs, tok)
    plain = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "kalo remi"}]
    expected = tok.apply_chat_template(plain, tokenize=True, add_generation_prompt=True)["input_ids"]
    assert ids == list(expected) and ids[0] == tok.bos_token_id and ids[1] != tok.bos_token_id
    # and a chat request through shaping is given those ids
    model = ServedModel(tok, 1 << 16, CONTEXT)
    assert shape(model, {"messages": plain}, chat=True).choices[0].request.prompt_token_ids == list(expected)


def test_vllms_chat_rendering_options_reach_the_template(tiny_llama, tmp_path: Path) -> None:
    """add_generation_prompt, continue_final_message and chat_template_kwargs, vLLM's chat
    extensions (refused as unknown fields before), rendered as transformers renders them."""
    tok = llama_style_tokenizer(tiny_llama.model, tmp_path / "model")
    conf = json.loads((tmp_path / "model" / "tokenizer_config.json").read_text())
    tok.chat_template = conf["chat_template"].replace("[assistant] ", "[assistant{{ suffix | default('') }}] ")
    model = ServedModel(tok, 1 << 16, CONTEXT)
    plain = [{"role": "user", "content": "kalo"}, {"role": "assistant", "content": "remi"}]

    def ids(**options: Any) -> list[int]:
        return shape(model, {"messages": plain, **options}, chat=True).choices[0].request.prompt_token_ids

    for options in (
        {"add_generation_prompt": False},
        {"add_generation_prompt": False, "continue_final_message": True},
        {"chat_template_kwargs": {"suffix": "-x"}},
    ):
        rendering = {"add_generation_prompt": True} | options
        rendering |= rendering.pop("chat_template_kwargs", {})  # vLLM passes them as the template's own
        expected = tok.apply_chat_template(plain, tokenize=True, **rendering)["input_ids"]
        assert ids(**options) == list(expected), options
    assert ids(add_generation_prompt=False) != ids() != ids(chat_template_kwargs={"suffix": "-x"})
    assert ids(add_special_tokens=False) == ids()  # vLLM's chat default, accepted when sent
    continued = tok.decode(ids(add_generation_prompt=False, continue_final_message=True))
    assert continued.endswith("remi")  # left open for the model to go on
    for body, param in (
        ({"continue_final_message": True}, "continue_final_message"),  # with add_generation_prompt (default true)
        ({"chat_template_kwargs": {"tokenize": False}}, "chat_template_kwargs"),
        ({"add_special_tokens": True}, "add_special_tokens"),  # on top of the template's: as /tokenize says
    ):
        assert refused(model, {"messages": plain, **body}, chat=True).param == param
    # any last message may be continued, as vLLM lets it
    last_user = {"messages": plain[:1], "add_generation_prompt": False, "continue_final_message": True}
    assert tok.decode(shape(model, last_user, chat=True).choices[0].request.prompt_token_ids).endswith("kalo")
    # without a template: the transcript, left open or not opened
    # a tool message's tool_call_id reaches the template, as its name does
    tok.chat_template = "{% for m in messages %}{{ m['role'] }}:{{ m.get('tool_call_id', '-') }};{% endfor %}"
    tool = [{"role": "user", "content": "a"}, {"role": "tool", "content": "b", "tool_call_id": "call-7"}]
    assert tok.decode(shape(model, {"messages": tool}, chat=True).choices[0].request.prompt_token_ids).endswith(
        "user:-;tool:call-7;"
    )
    # one without it answers no call the spec can name (OpenAI requires it): refused, not rendered
    untied = [tool[0], {"role": "tool", "content": "b"}]
    assert "tool_call_id" in refused(model, {"messages": untied}, chat=True).message
    # function names as OpenAI takes them, each once (a call must say which it means)
    fn = {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}
    assert shape(model, {"messages": plain, "tools": [fn], "tool_choice": "required"}, chat=True).choices
    mcp = {"type": "function", "function": {"name": "weather.get:v2"}}  # a namespaced tool, as vLLM serves it
    assert shape(model, {"messages": plain, "tools": [mcp], "tool_choice": "required"}, chat=True).choices
    for name in ("", "a b", "x" * 65, "naïve"):
        bad = {"type": "function", "function": {"name": name}}
        assert refused(model, {"messages": plain, "tools": [bad]}, chat=True).param == "tools", name
    twice = {"messages": plain, "tools": [fn, fn], "tool_choice": "required"}
    assert "more than once" in refused(model, twice, chat=True).message
    # and so do the request's tools and an assistant's earlier calls (vLLM passes both, each call's
    # arguments parsed from their JSON text, so a template's tojson does not quote them twice)
    tok.chat_template = (
        "{% for t in tools or [] %}[{{ t.function.name }}]{% endfor %}"
        "{% for m in messages %}{{ m['role'] }}:"
        "{% for c in m.get('tool_calls') or [] %}{{ c.function.name }}{{ c.function.arguments | tojson }}{% endfor %};"
        "{% endfor %}"
    )
    call = {"id": "c", "type": "function", "function": {"name": "f", "arguments": '{"q": 1}'}}
    body = {
        "messages": [{"role": "user", "content": "a"}, {"role": "assistant", "tool_calls": [call]}],
        "tools": [{"type": "function", "function": {"name": "f"}}],
        "tool_choice": "none",
    }
    assert tok.decode(shape(model, body, chat=True).choices[0].request.prompt_token_ids).endswith(
        '[f]user:;assistant:f{"q": 1};'
    )
    transcript = chat_template.chat_prompt_ids(
        [ChatMessage(role="user", content="hi"), ChatMessage(role="assistant", content="yo")],
        _Chars(),
        chat_template.ChatTemplate(add_generation_prompt=False, continue_final_message=True),
    )
    assert transcript == [ord(c) for c in "user: hi\nassistant: yo"]


def test_what_a_real_template_reads_is_what_the_client_sent(tiny_llama, tmp_path: Path) -> None:
    """A trial with real templates: one that loops over each message's content parts (Idefics3,
    SmolVLM) got the parts joined into a string and rendered nothing of them; a developer message
    vanished under Qwen2.5's template (no such role) and broke Mistral's alternation; tool calls
    without a name or with arguments of another type reached the template and came back in
    Python's words; every tool showed ``"strict": null``; ``messages`` could be set as a kwarg."""
    tok = llama_style_tokenizer(tiny_llama.model, tmp_path / "model")
    model = ServedModel(tok, 1 << 16, 1024)  # room for a tool's JSON

    def rendered(body: dict[str, Any]) -> str:
        return tok.decode(shape(model, body, chat=True).choices[0].request.prompt_token_ids)

    tok.chat_template = (
        "{% for m in messages %}<{{ m['role'] }}>{% for p in m['content'] %}{% if p['type'] == 'text' %}"
        "{{ p['text'] }}|{% endif %}{% endfor %}{% endfor %}"
    )
    parts = [{"type": "text", "text": "list"}, {"type": "text", "text": "content"}]
    said = [{"role": "system", "content": "plain"}, {"role": "user", "content": parts}]
    assert rendered({"messages": said}).endswith("<system>plain|<user>list|content|")
    tok.chat_template = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"  # a string reader
    assert rendered({"messages": said}).endswith("<system>plain<user>list\ncontent")
    developer = [{"role": "developer", "content": "be brief"}, {"role": "user", "content": "hi"}]
    assert rendered({"messages": developer}).endswith("<system>be brief<user>hi")
    tok.chat_template = "You help developers. " + tok.chat_template  # the word in its text names no role
    assert rendered({"messages": developer}).endswith("<system>be brief<user>hi")
    tok.chat_template += "{% if messages[0]['role'] == 'developer' %}{% endif %}"  # one that knows the role
    assert rendered({"messages": developer}).endswith("<developer>be brief<user>hi")
    ipython = [developer[1], {"role": "ipython", "content": "42"}]  # Llama 3.1's tool-output role
    assert rendered({"messages": ipython}).endswith("hi<ipython>42")
    assert "unknown message role" in refused(model, {"messages": [{"role": " ", "content": "x"}]}, chat=True).message
    tok.chat_template = (
        "{% for t in tools or [] %}{{ t | tojson }}{% endfor %}{% for m in messages %}"
        "{% for c in m.get('tool_calls') or [] %}{{ c.function.name }}{{ c.function.arguments | tojson }}{% endfor %}"
        "{% endfor %}"
    )
    tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object", "default": None}}}
    text = rendered({"messages": developer, "tools": [tool], "tool_choice": "none"})
    assert "strict" not in text and '"default": null' in text  # the schema's own null stays
    for function, says in (
        ({"arguments": "{}"}, ".function.name must name the function"),
        ({"name": "f", "arguments": 5}, ".function.arguments must be a JSON object's text"),
        (None, " needs a function object"),
    ):
        call = {"id": "c", "type": "function", "function": function}
        history = [developer[1], {"role": "assistant", "tool_calls": [call]}]
        e = refused(model, {"messages": history}, chat=True)
        assert (e.param, e.message) == ("messages", f"messages[1].tool_calls[0]{says}")
    e = refused(model, {"messages": [developer[1], {"role": "assistant", "tool_calls": 5}]}, chat=True)
    assert e.message == "messages[1].tool_calls must be a list of tool calls"
    for arguments in (None, ""):  # none given: {} (as vLLM)
        call = {"id": "c", "type": "function", "function": {"name": "f", "arguments": arguments}}
        assert rendered({"messages": [developer[1], {"role": "assistant", "tool_calls": [call]}]}).endswith("f{}")
    kwargs = {"messages": developer, "chat_template_kwargs": {"messages": []}}
    assert refused(model, kwargs, chat=True).param == "chat_template_kwargs"
    tok.chat_template = "{{ 'Today is ' + (date_string | default('26 Jul 2024')) }}{{ messages[0].content }}"
    assert rendered({"messages": developer[1:]}).endswith("Today is 26 Jul 2024hi")
    typed = refused(model, {"messages": developer[1:], "chat_template_kwargs": {"date_string": 5}}, chat=True)
    assert typed.param == "chat_template_kwargs" and typed.message.startswith("chat_template_kwargs: ")
    tok.chat_template += "{{ raise_exception('no') if messages | length > 1 }}"  # the messages' fault, kwargs or not
    both = {"messages": developer, "chat_template_kwargs": {"date_string": "x"}}
    assert refused(model, both, chat=True).param == "messages"


def test_a_template_that_does_not_compile_is_named_once_and_refuses_each_chat(tiny_llama, tmp_path: Path) -> None:
    """A trial: the gateway started quietly on a template with a syntax error and answered every
    chat 400; now its start says why (template_problem), and the requests still say it."""
    broken = "{% for m in messages %}{{ m.content }{% endfor %}"
    assert "unexpected '}'" in (chat_template.template_problem(broken) or "")
    for fine in ("{% for m in messages %}{% generation %}{{ m.content }}{% endgeneration %}{% endfor %}", None):
        assert chat_template.template_problem(fine) is None  # transformers' own tags compile
    named = {"default": "{{ messages }}", "tool_use": broken}  # named templates (a helper): each checked
    assert (chat_template.template_problem(named) or "").startswith("tool_use: ")
    assert chat_template.template_problem({"default": "{{ messages }}"}) is None
    tok = llama_style_tokenizer(tiny_llama.model, tmp_path / "model")
    tok.chat_template = broken
    e = refused(ServedModel(tok, 1 << 16, CONTEXT), {"messages": [{"role": "user", "content": "hi"}]}, chat=True)
    assert (e.status, e.param) == (400, "messages") and "unexpected '}'" in e.message


def test_documents_reach_a_rag_template(tiny_llama, tmp_path: Path) -> None:
    """vLLM's chat field for RAG templates (a trial: refused as unknown, and reserved in the kwargs)."""
    tok = llama_style_tokenizer(tiny_llama.model, tmp_path / "model")
    tok.chat_template = (
        "{% for d in documents or [] %}[{{ d.title }}:{{ d.text }}]{% endfor %}{{ messages[0].content }}"
    )

    body = {"messages": [{"role": "user", "content": "q"}], "documents": [{"title": "t", "text": "x"}]}
    ids = shape(ServedModel(tok, 1 << 16, CONTEXT), body, chat=True).choices[0].request.prompt_token_ids
    assert tok.decode(ids).endswith("[t:x]q")


def test_an_assistants_refusal_part_is_its_text(served: ServedModel) -> None:  # noqa: F811 - served: the fixture imported
    """OpenAI's refusal content part, in a reply sent back as history: vLLM reads it as text
    (a trial: refused as non-text content)."""
    refusal = [{"type": "refusal", "refusal": "I can't"}]
    msgs = [
        {"role": "user", "content": "x"},
        {"role": "assistant", "content": refusal},
        {"role": "user", "content": "y"},
    ]
    ids = shape(served, {"messages": msgs}, chat=True).choices[0].request.prompt_token_ids
    assert ids == served.tokenizer.encode("user: x\nassistant: I can't\nuser: y\nassistant:")
    e = refused(served, {"messages": [msgs[0], {"role": "assistant", "content": [{"type": "refusal"}]}]}, chat=True)
    assert "a content part of type refusal needs its refusal" in e.message


def test_the_responses_apis_text_parts_are_text(served: ServedModel) -> None:  # noqa: F811 - served: the fixture imported
    """input_text / output_text, the Responses API's text parts, which clients moving between the
    two APIs send in chat messages: vLLM reads them as text (refused here before)."""
    msgs = [
        {"role": "user", "content": [{"type": "input_text", "text": "x"}]},
        {"role": "assistant", "content": [{"type": "output_text", "text": "z"}]},
        {"role": "user", "content": [{"type": "input_text", "text": "y"}, {"type": "text", "text": "w"}]},
    ]
    ids = shape(served, {"messages": msgs}, chat=True).choices[0].request.prompt_token_ids
    assert ids == served.tokenizer.encode("user: x\nassistant: z\nuser: y\nw\nassistant:")
    e = refused(served, {"messages": [{"role": "user", "content": [{"type": "input_text"}]}]}, chat=True)
    assert "a content part of type input_text needs its text" in e.message


def test_content_format_auto_string_openai(tiny_llama, tmp_path: Path) -> None:
    """A review of the parts reading: "" must be one empty part (templates read content[0]['text']),
    a tool result stays a string under "auto" (templates write it with |string), and the gateway's
    chat_template_content_format overrides the reading (vLLM's --chat-template-content-format)."""
    tok = llama_style_tokenizer(tiny_llama.model, tmp_path / "model")
    tok.chat_template = (
        "{% for m in messages %}<{{ m['role'] }}>{% if m['content'] is string %}{{ m['content'] }}"
        "{% elif m['content'] %}{{ m['content'][0]['text'] }}{% for p in m['content'] %}|{% endfor %}{% endif %}"
        "{% endfor %}"
    )
    msgs = [
        ChatMessage(role="system", content=""),
        ChatMessage(role="assistant", tool_calls=[{"id": "c", "type": "function", "function": {"name": "f"}}]),
        ChatMessage(role="tool", content="42", tool_call_id="c"),
    ]

    def text(content_format: str) -> str:
        return tok.decode(chat_template.chat_prompt_ids(msgs, tok, content_format=content_format))

    assert text("auto").endswith("<system>|<assistant><tool>42")  # no content: no part
    assert text("openai").endswith("<system>|<assistant><tool>42|")
    assert text("string").endswith("<system><assistant><tool>42")
    tool = openai.Tool(type="function", function=openai.ToolFunction(name="f"))
    given = chat_template.ChatTemplate.of(openai.ChatBody(model="m", messages=msgs, tools=[tool]))
    # as vLLM's model_dump(): description and parameters null where left out, strict only if set
    assert given.tools == [{"type": "function", "function": {"name": "f", "description": None, "parameters": None}}]


def test_content_reached_through_a_variable_or_a_macro_is_read_as_parts(tiny_llama, tmp_path: Path) -> None:
    """The content-format reading followed only ``for p in message.content``: a template that sets a
    variable from the content first, or hands it to a macro (Qwen3-VL's ``render_content``), got a
    string and rendered nothing of the message."""
    tok = llama_style_tokenizer(tiny_llama.model, tmp_path / "model")
    loop = "{% for p in c %}{% if p['type'] == 'text' %}{{ p['text'] }}|{% endif %}{% endfor %}"
    through_set = "{% for m in messages %}{% set c = m['content'] | default([]) %}<{{ m.role }}>" + loop
    through_set += "{% endfor %}"
    through_macro = (
        "{% macro render(c, vision=false) %}" + loop + "{% endmacro %}"
        "{% for m in messages %}<{{ m.role }}>{{ render(m.content, vision=true) }}{% endfor %}"
    )
    by_keyword = through_macro.replace("render(m.content, vision=true)", "render(vision=true, c=m.content)")
    msgs = [ChatMessage(role="user", content="hi")]
    for source in (through_set, through_macro, by_keyword):
        assert chat_template._template_reads(source) == (True, False)
        tok.chat_template = source
        assert tok.decode(chat_template.chat_prompt_ids(msgs, tok)).endswith("<user>hi|")
    # a variable set from something else, looped over, is not content
    other = "{% for m in messages %}{% set c = m['tool_calls'] %}{% for p in c %}{% endfor %}{{ m.content }}"
    other += "{% endfor %}"
    assert chat_template._template_reads(other) == (False, False)
