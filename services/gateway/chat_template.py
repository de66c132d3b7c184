"""Chat templates: a chat request's messages to the prompt's token ids, through the model's own
template (transformers' ``apply_chat_template``) with vLLM's rendering options, or a plain
transcript for a tokenizer without one. Pure: the tokenizer is passed in."""

from __future__ import annotations

import functools
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, cast

import jinja2
import jinja2.nodes
import msgspec

from dlora.services.gateway.openai import APIError, ChatMessage

if TYPE_CHECKING:
    from dlora.services.gateway.served_model import Tokenizer


class RenderingOptions(Protocol):
    """A body's chat rendering options (a chat request's, a /tokenize request's)."""

    add_special_tokens: bool | None
    add_generation_prompt: bool | None
    continue_final_message: bool | None
    chat_template_kwargs: dict[str, Any] | None


@dataclass(frozen=True)
class ChatTemplate:
    """How a conversation is rendered (vLLM's chat request extensions): with the assistant's turn
    opened after it (``add_generation_prompt``), or with its last message left open for the
    model to go on (``continue_final_message``, whoever wrote it, as vLLM lets it); ``kwargs`` go
    to the template."""

    add_generation_prompt: bool = True
    continue_final_message: bool = False
    kwargs: Mapping[str, Any] = field(default_factory=dict)
    tools: list[dict[str, Any]] | None = None  # the request's tools, for the template to render (as vLLM)
    documents: list[dict[str, str]] | None = None  # the request's documents, likewise
    # The history's call ids made this many characters long (0: as sent; ``_fitted``): Mistral's
    # templates refuse any but 9 (``call_ids.CALL_ID_LENGTHS``), so a client's own did (vLLM
    # cuts them in its mistral tokenizer mode).
    call_id_length: int = 0
    # The request's own chat_template_kwargs, apart from what its reasoning_effort added to
    # ``kwargs``: a template that refuses the effort is the effort's fault (``_blamed``).
    given_kwargs: Mapping[str, Any] = field(default_factory=dict)

    @classmethod
    def of(cls, body: RenderingOptions, call_id_length: int = 0) -> ChatTemplate:
        """Raises APIError(400): both options on (vLLM refuses it too), special tokens asked for on top
        of the template's (it places its own: vLLM would give a Llama template a second BOS), or
        a keyword the renderer sets itself."""
        if body.add_special_tokens:
            raise APIError(
                400, "add_special_tokens is for a prompt; a chat template places its own", param="add_special_tokens"
            )
        add = True if body.add_generation_prompt is None else body.add_generation_prompt
        cont = bool(body.continue_final_message)
        if add and cont:
            raise APIError(
                400,
                "continue_final_message and add_generation_prompt cannot both be true",
                param="continue_final_message",
            )
        kwargs = given = body.chat_template_kwargs or {}
        if reserved := sorted(set(kwargs) & _RENDERER_KWARGS):
            raise APIError(400, f"chat_template_kwargs may not set {', '.join(reserved)}", param="chat_template_kwargs")
        if (effort := getattr(body, "reasoning_effort", None)) is not None:
            kwargs = _with_effort(kwargs, effort)
        tools = getattr(body, "tools", None)
        tools = [_given(t) for t in msgspec.to_builtins(tools)] if tools else None
        return cls(add, cont, kwargs, tools, getattr(body, "documents", None), call_id_length, given)


# OpenAI's reasoning_effort values, and vLLM's "max" (DeepSeek V4's)
REASONING_EFFORTS = ("none", "minimal", "low", "medium", "high", "xhigh", "max")


def _with_effort(kwargs: dict[str, Any], effort: object) -> dict[str, Any]:
    """A chat's ``reasoning_effort`` given to its template, as vLLM does (``build_chat_params``):
    as the variable of that name (gpt-oss's and others' templates read it), and, unless the
    request sets it, ``enable_thinking`` false for "none", true for any other (templates that
    think only when asked, or skip it when told: Qwen3's, Gemma's). Was a 400: a client that sends
    it (the openai package's ``reasoning_effort=``) was refused where vLLM served it.

    Raises:
        APIError(400): not one of ``REASONING_EFFORTS`` (vLLM's pydantic refuses it too).
    """
    if effort not in REASONING_EFFORTS:
        why = f"reasoning_effort must be one of {', '.join(REASONING_EFFORTS)}, got {effort!r}"
        raise APIError(400, why, param="reasoning_effort")
    return {"enable_thinking": effort != "none"} | kwargs | {"reasoning_effort": effort}


def reply_role(messages: list[ChatMessage], add_generation_prompt: bool) -> str:
    """A chat reply's role, as vLLM's get_chat_request_role: the assistant's where its turn is
    opened, else the last message's (the message the model goes on with)."""
    return "assistant" if add_generation_prompt or not messages else messages[-1].role


def echoed(messages: list[ChatMessage], add_generation_prompt: bool) -> str:
    """What a chat request's ``echo`` puts before each choice's content, as vLLM: the last message's
    text (its text parts joined by newlines) where its role is the reply's (``reply_role``), else
    nothing."""
    last = messages[-1] if messages else None
    if last is None or last.role != reply_role(messages, add_generation_prompt):
        return ""
    if isinstance(last.content, list):  # as the prompt renders them (a refusal part is its text)
        return "\n".join((p.refusal if p.type == "refusal" else p.text) or "" for p in last.content)
    return last.content or ""


# What apply_chat_template takes from the renderer itself, not from a request's chat_template_kwargs.
_RENDERER_KWARGS = {
    "conversation",
    "messages",
    "tokenize",
    "add_generation_prompt",
    "continue_final_message",
    "return_dict",
    "return_tensors",
    "padding",
    "truncation",
    "max_length",
    "tools",
    "documents",
    "chat_template",
    "tokenizer_kwargs",
}


def _given(tool: dict[str, Any]) -> dict[str, Any]:
    """A tool as vLLM gives it to a template: ``strict`` only where the client set it (every tool
    showed ``"strict": null`` in the prompt; a trial); ``description`` and ``parameters`` null
    where left out, as vLLM's model_dump() writes them (templates test ``is not none`` and write
    ``parameters | tojson``)."""
    function = tool.get("function")
    if isinstance(function, dict) and function.get("strict") is None:
        return {**tool, "function": {k: v for k, v in function.items() if k != "strict"}}
    return tool


def _calls_for_template(calls: Any, where: str, id_length: int = 0) -> list[dict[str, Any]]:
    """An assistant's earlier tool calls (``where``: the message's place) as templates read them:
    each call's ``arguments`` parsed from its JSON text into an object, as vLLM passes them (a
    template writing ``arguments | tojson`` would otherwise quote the text a second time);
    arguments that are not JSON stay text, none or "" are ``{}`` (as vLLM).

    Raises:
        APIError(400): not a list of calls each with a function of a name (the field is free in
            the request's type: a template met ints and missing keys, and said so in Python's words),
            or arguments nested deeper than JSON is decoded."""
    if not isinstance(calls, list):
        raise APIError(400, f"{where}.tool_calls must be a list of tool calls", param="messages")
    out = []
    for j, call in enumerate(calls):
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(function, dict):
            raise APIError(400, f"{where}.tool_calls[{j}] needs a function object", param="messages")
        name, arguments = function.get("name"), function.get("arguments")
        if not isinstance(name, str) or not name:
            raise APIError(400, f"{where}.tool_calls[{j}].function.name must name the function", param="messages")
        if arguments is not None and not isinstance(arguments, (str, dict)):
            raise APIError(
                400, f"{where}.tool_calls[{j}].function.arguments must be a JSON object's text", param="messages"
            )
        parsed: Any = {} if not arguments else arguments
        if isinstance(parsed, str):
            try:
                parsed = json.loads(parsed)
            except ValueError:
                pass
            except RecursionError:  # deeper than json follows: was a 500 (vLLM answers 400)
                raise APIError(
                    400, f"{where}.tool_calls[{j}].function.arguments: JSON nested too deeply", param="messages"
                ) from None
        cut = {"id": _fitted(call["id"], id_length)} if id_length and isinstance(call.get("id"), str) else {}
        out.append({**call, "function": {**function, "arguments": parsed}} | cut)
    return out


def _fitted(call_id: str, length: int) -> str:
    """A history's call id made ``length`` characters long, as Mistral's templates take only those:
    its last ``length`` (as vLLM cuts them), or a shorter one filled (clients number their calls,
    "turn1_0", "1": the template refused the conversation), so a call and the tool message
    answering it still match. The fill starts with the id's length, then zeros: zeros alone made
    "1" and "01" one id, two calls the model could not tell apart, each answered twice."""
    if len(call_id) >= length:
        return call_id[-length:]
    return str(len(call_id)) + call_id.rjust(length - 1, "0")


def template_problem(source: object) -> str | None:
    """Why the chat template ``source`` does not compile, as transformers compiles it (its own
    extensions: loop controls, ``{% generation %}``); None when it does, or is no template.
    The gateway says so when it starts: every chat request would be refused with it (a trial saw
    only the 400s). Named templates (tokenizer_config.json's list) each, the first that does not
    compile named: each is rendered for some requests."""
    if isinstance(source, dict):
        named = ((name, template_problem(t)) for name, t in source.items())
        return next((f"{name}: {problem}" for name, problem in named if problem), None)
    if not isinstance(source, str):
        return None
    try:
        _compiled(source)
    except jinja2.TemplateError as e:
        return str(e)
    return None


def _compiled(source: str) -> jinja2.Template:
    """``source`` compiled by transformers (a private helper: plain jinja2 with loop controls where
    a release lacks it). Raises jinja2.TemplateError."""
    from transformers.utils import chat_template_utils

    compile_ = getattr(chat_template_utils, "_compile_jinja_template", None)
    if compile_ is not None:
        return cast(jinja2.Template, compile_(source))
    return jinja2.Environment(extensions=["jinja2.ext.loopcontrols"]).from_string(source)


@functools.lru_cache(maxsize=16)
def _template_reads(source: str) -> tuple[bool, bool]:
    """(whether the chat template ``source`` loops over a message's content, whether it names a
    developer role). The first: it takes content as OpenAI's list of parts, and a string joined
    from them would lose the text (Idefics3-style templates render nothing of it; vLLM detects the
    same: its "openai" content format). The second: the string "developer" in an expression (a
    role compared with it), not in the text the template writes ("You help developers"). A
    template that does not compile loops over nothing and names no role (rendering it says why)."""
    try:
        tree = _compiled(source).environment.parse(source)
    except jinja2.TemplateError:
        return False, False

    nodes = jinja2.nodes
    held: set[str] = set()  # variables holding a message's content (below)

    def content(node: jinja2.nodes.Node) -> bool:
        while isinstance(node, nodes.Filter) and node.node is not None:  # content | select(...)
            node = node.node
        if isinstance(node, nodes.Name):
            return node.name in held
        if isinstance(node, nodes.Getattr):
            return node.attr == "content"
        return isinstance(node, nodes.Getitem) and getattr(node.arg, "value", None) == "content"

    # Content reached through a variable: ``set c = message.content``, or a macro's parameter given
    # it (Qwen3-VL's ``render_content(message.content)``), followed to a fixed point. vLLM's
    # detection follows neither, and such a template got one string and rendered nothing of it.
    macros = {m.name: [a.name for a in m.args] for m in tree.find_all(nodes.Macro)}
    while True:
        found = {
            a.target.name for a in tree.find_all(nodes.Assign) if isinstance(a.target, nodes.Name) and content(a.node)
        }
        for call in tree.find_all(nodes.Call):
            params = macros.get(call.node.name, []) if isinstance(call.node, nodes.Name) else []
            found |= {name for name, arg in zip(params, call.args) if content(arg)}
            found |= {kw.key for kw in call.kwargs if kw.key in params and content(kw.value)}
        if found <= held:
            break
        held |= found
    loops = any(content(loop.iter) for loop in tree.find_all(nodes.For))
    return loops, any(c.value == "developer" for c in tree.find_all(nodes.Const))


def _selected(source: object, tools: list[dict[str, Any]] | None) -> object:
    """The template transformers renders where a tokenizer has several (tokenizer_config.json's
    list of named ones, e.g. Hermes 2 Pro's and Command R's): "tool_use" for a request with tools
    where there is one, else "default"; what is read of it (``_template_reads``) is read of that
    one, as vLLM resolves it first. Read as no template, one that looped over a message's content
    got the content as a string, and the message rendered as nothing. ``source`` as it is otherwise
    (no default: transformers refuses to render, saying so)."""
    if not isinstance(source, dict):
        return source
    if tools is not None and "tool_use" in source:
        return source["tool_use"]
    return source.get("default", source)


def _rendered(render: Callable[[], object]) -> object | None:
    """What ``render`` returns; None where the template raises (whatever it raises)."""
    try:
        return render()
    except Exception:  # noqa: BLE001 - whatever the template raises: it does not render
        return None


def _with_text_arguments(message: dict[str, Any], sent: list[Any]) -> dict[str, Any]:
    """``message`` (as rendered, holding an assistant's earlier calls) with each call's arguments as
    JSON text: the text the client sent (``sent``: its calls as sent), or the object it sent
    written as JSON ("{}" for none), for a template that writes them as a string."""
    calls = []
    for call, given in zip(message["tool_calls"], sent):
        text = given["function"].get("arguments")
        if not (isinstance(text, str) and text):
            text = json.dumps(call["function"]["arguments"], ensure_ascii=False)
        calls.append(call | {"function": call["function"] | {"arguments": text}})
    return message | {"tool_calls": calls}


def _blamed(renders: list[Callable[..., object]], template: ChatTemplate) -> str:
    """The field a template's refusal is the fault of: the kwargs where the conversation renders
    without them (a trial: a date_string of 5 was blamed on messages, in Python's words), the tools
    where it renders without them (Hermes 2 Pro's writes ``" - " + description``, and a tool
    without one was blamed on messages, which were fine), else the messages. Each of ``renders``
    (the history's call arguments as objects, and as text) is tried: a template that splices the
    text failed on the objects in every trial, and its tools' fault was blamed on the messages."""
    if template.kwargs and any(_rendered(render) is not None for render in renders):
        own = template.given_kwargs  # (it renders with the client's own: what reasoning_effort added is at fault)
        if own != template.kwargs and any(_rendered(functools.partial(r, **own)) is not None for r in renders):
            return "reasoning_effort"
        return "chat_template_kwargs"
    without_tools = {**template.kwargs, "tools": None}
    if template.tools and any(_rendered(functools.partial(r, **without_tools)) is not None for r in renders):
        return "tools"
    return "messages"


def _parts(text: str | None) -> list[dict[str, str]]:
    """A message's string content as OpenAI's parts: one text part ("" too, as vLLM: templates read
    ``content[0]['text']``); none for no content."""
    return [] if text is None else [{"type": "text", "text": text}]


# Content parts that are text: Chat Completions' own and the Responses API's input/output text,
# which clients moving between the two APIs send (vLLM reads all three as text).
_TEXT_PARTS = frozenset({"text", "input_text", "output_text"})

# How a message's content reaches a template (vLLM's --chat-template-content-format).
CONTENT_FORMATS = ("auto", "string", "openai")


def chat_prompt_ids(
    messages: list[ChatMessage],
    tokenizer: Tokenizer,
    template: ChatTemplate = ChatTemplate(),
    content_format: str = "auto",
) -> list[int]:
    """The prompt token ids for a conversation: the tokenizer's chat template rendered and
    tokenized as ``apply_chat_template(..., tokenize=True, add_generation_prompt=True)`` does (or
    as ``template`` says), so a template that writes ``{{ bos_token }}`` is not given a second BOS
    by the tokenizer; without a template, a plain "role: content" transcript ending with
    "assistant:" (or, continuing the final message, with it unterminated), tokenized as a prompt.

    Raises:
        APIError(400): no messages, a role other than OpenAI's without a template (or a blank
            one), a message other than an assistant's without content, a tool message without
            tool_call_id, tool calls outside an assistant's message or not a list of named
            functions, audio or non-text content, or a template that refuses the conversation
            (its reason).
    """
    if not messages:
        raise APIError(400, "messages must not be empty", param="messages")
    source = _selected(getattr(tokenizer, "chat_template", None), template.tools)
    loops, developer = _template_reads(source) if isinstance(source, str) else (False, False)
    plain = []
    for i, m in enumerate(messages):
        # Other roles are the template's to take or refuse (Llama 3.1's ipython: vLLM passes any);
        # the transcript knows OpenAI's.
        if m.role not in ("system", "user", "assistant", "tool", "developer") and not (source and m.role.strip()):
            raise APIError(400, f"unknown message role {m.role!r}", param="messages")
        if (m.tool_calls and m.role != "assistant") or m.function_call or m.audio is not None:
            field = "tool_calls" if m.tool_calls else "function_call" if m.function_call else "audio"
            raise APIError(400, f"messages: {field} in a {m.role} message is not supported", param="messages")
        if m.content is None and m.role != "assistant":  # only an assistant's turn may omit it (the spec)
            raise APIError(400, f"messages: a {m.role} message needs content", param="messages")
        if m.role == "tool" and not m.tool_call_id:  # the spec requires it: which call this answers
            raise APIError(
                400, "messages: a tool message needs the tool_call_id of the call it answers", param="messages"
            )
        parts = [] if isinstance(m.content, str) or m.content is None else m.content
        # An assistant's refusal part (OpenAI's, in a reply sent back as history) is its text, as
        # vLLM reads it (a trial: refused); so are the Responses API's text parts
        other = sorted({p.type for p in parts if p.type not in _TEXT_PARTS and p.type != "refusal"})
        if other:  # never dropped silently: the model would answer as if it were not there
            raise APIError(
                400,
                f"messages: content parts of type {', '.join(other)} are not supported (this model reads text only)",
                param="messages",
            )
        said_in = [p.refusal if p.type == "refusal" else p.text for p in parts]
        if bad := next((p.type for p, t in zip(parts, said_in) if not isinstance(t, str)), None):
            field = "refusal" if bad == "refusal" else "text"
            raise APIError(400, f"messages: a content part of type {bad} needs its {field}", param="messages")
        texts = [t for t in said_in if isinstance(t, str)]  # all of them, checked above
        # Text parts joined by newlines, as vLLM and llama.cpp join them (the "string" content format)
        content = m.content if isinstance(m.content, str) or m.content is None else "\n".join(texts)
        cut = template.call_id_length
        answers = _fitted(m.tool_call_id, cut) if cut and m.tool_call_id else m.tool_call_id
        named: dict[str, Any] = {k: v for k, v in (("name", m.name), ("tool_call_id", answers)) if v}
        if m.tool_calls is not None and (calls := _calls_for_template(m.tool_calls, f"messages[{i}]", cut)):
            named["tool_calls"] = calls  # an assistant's earlier calls, for the template to render (as vLLM)
        if thought := m.reasoning_content or m.reasoning:  # templates that render thinking read this key
            named["reasoning_content"] = thought
        # OpenAI's developer role is the system role of models trained before it (vLLM maps it
        # likewise): a template without one dropped the message, or refused the roles' order.
        role = "system" if m.role == "developer" and source and not developer else m.role
        # "auto": a tool result stays a string (templates write it with |string; SGLang does the same)
        if content_format == "openai" or (content_format == "auto" and loops and m.role != "tool"):
            # each part as sent, a string as one
            said: Any = [{"type": "text", "text": t} for t in texts] if parts else _parts(content)
        else:
            said = content or ""
        plain.append({"role": role, "content": said} | named)
    if source:

        def rendering(conversation: list[dict[str, Any]]) -> Callable[..., Any]:
            return functools.partial(
                tokenizer.apply_chat_template,  # type: ignore[attr-defined]  # not in the Protocol: optional
                conversation,
                tokenize=True,
                add_generation_prompt=template.add_generation_prompt,
                continue_final_message=template.continue_final_message,
                tools=template.tools,
                documents=template.documents,
            )

        render = rendering(plain)
        try:
            out = render(**template.kwargs)
        except Exception as e:  # noqa: BLE001 - jinja's raise_exception ("roles must alternate") and the like
            # DeepSeek's templates splice a call's arguments into the prompt with "+": objects
            # raised TypeError on every follow-up turn; such a template gets the client's text.
            # Only after a TypeError: arguments nested 500 deep broke a tojson template's
            # recursion, and the text went in as a quoted string, a 200 on a garbled prompt.
            renders = [render]
            if isinstance(e, TypeError):
                spliced = [
                    _with_text_arguments(p, m.tool_calls) if "tool_calls" in p else p for p, m in zip(plain, messages)
                ]
                if spliced != plain:
                    renders.append(rendering(spliced))
            out = _rendered(functools.partial(renders[-1], **template.kwargs)) if len(renders) > 1 else None
            if out is None:
                field = _blamed(renders, template)
                raise APIError(400, f"{field}: the model's chat template refused them: {e}", param=field) from None
        # a list of ids, or (transformers 5) an encoding holding them
        return list(out["input_ids"] if isinstance(out, Mapping) else out)
    # Without a template, tools are not rendered (a forced call's arguments are constrained all the
    # same), and an assistant's earlier calls are written as their JSON.
    texts = [m["content"] or (json.dumps(m["tool_calls"]) if "tool_calls" in m else "") for m in plain]
    lines = [f"{m['role']}: {text}\n" for m, text in zip(plain, texts)]
    if template.continue_final_message:
        lines[-1] = lines[-1].removesuffix("\n")
    opened = "assistant:" if template.add_generation_prompt else ""
    return list(tokenizer.encode("".join(lines) + opened))
