"""OpenAI's Responses API (``POST /v1/responses``, the openai package's ``client.responses.create``)
as the chat it is served as: its body read and rendered as a ``ChatBody`` (``to_chat``), so every
check, template, structured output, tool and reasoning parser is the chat's; a refusal named by
the Responses field (``renamed``). The answer's shape is ``responses_shape``'s. Pure: no aiohttp.

Responses are stored as OpenAI stores them (``store``, true by default) in Redis
(``responses_store``), which puts the conversation a ``previous_response_id`` names, and the items
``item_reference``s name, into ``input`` before this module reads it. ``background`` runs it for
nobody connected (``background``), stored; its stream resumable. ``conversation`` (OpenAI's Conversations API) is not
served. Hosted tools (web search, file search, MCP...) are not served: functions only.
"""

from __future__ import annotations

import re
from typing import Any

import msgspec

from dlora.common.undecodable import field_of
from dlora.services.gateway.openai import (
    APIError,
    ChatBody,
    ChatMessage,
    StreamOptions,
    Tool,
    decode_body,
)
from dlora.services.gateway.structured_outputs import StructuredOutputs


class ResponsesStreamOptions(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    include_obfuscation: bool | None = None  # no effect here: nothing is obfuscated


class TextConfig(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    format: dict[str, Any] | None = None  # text, json_object, json_schema (checked by ``chat_format`` and the chat)
    verbosity: str | None = None  # the chat's verbosity: refused when set, as there


class Reasoning(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    effort: str | None = None  # the chat's reasoning_effort: to the template, as there
    summary: str | None = None  # none is made: refused when set
    generate_summary: str | None = None  # its older name


class ResponsesBody(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """OpenAI's ResponseCreateParams, with the vLLM extensions its chat body also takes."""

    model: str | None = None  # None: the base model, as the chat's
    input: str | list[dict[str, Any]]  # a string (one user message) or items (``_messages``)
    instructions: str | None = None  # a system message first
    max_output_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    tools: list[dict[str, Any]] | None = None  # functions in the flat shape (``_tool``)
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    text: TextConfig | None = None
    stream: bool | None = None
    stream_options: ResponsesStreamOptions | None = None
    user: str | None = None
    metadata: dict[str, str] | None = None
    store: bool | None = None  # None: true, as OpenAI's default (``responses_store``)
    service_tier: str | None = None
    safety_identifier: str | None = None
    prompt_cache_key: str | None = None
    prompt_cache_retention: str | None = None  # checked by the chat (sampling.CACHE_RETENTIONS), echoed
    reasoning: Reasoning | None = None
    truncation: str | None = None  # "disabled" (the default) only
    include: list[str] | None = None  # OUTPUT_LOGPROBS served, ENCRYPTED_REASONING taken (``refuse_include``)
    top_logprobs: int | None = None  # [0, 20] alternatives of each token's logprob, with OUTPUT_LOGPROBS
    previous_response_id: Any = None  # a string (``responses_store.ResponsesStore.prepared`` checks it)
    # Run for nobody connected (``background``): only stored (``store``); streamed, its events kept.
    background: bool | None = None
    # Need a service dlora has not: refused when set.
    conversation: Any = None
    prompt: Any = None
    max_tool_calls: Any = None
    context_management: Any = None
    # vLLM's extensions of its ResponsesRequest, as the chat takes them
    top_k: int | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    repetition_penalty: float | None = None
    ignore_eos: bool | None = None
    skip_special_tokens: bool | None = None
    include_stop_str_in_output: bool | None = None
    priority: int | None = None
    cache_salt: str | None = None
    request_id: str | None = None
    structured_outputs: StructuredOutputs | None = None
    # to the template and the reasoning parser, as the chat's (vllm#43761): thinking on or off
    chat_template_kwargs: dict[str, Any] | None = None


class _Part(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """A text part of an input message: input_text (the user's), output_text (an earlier answer's,
    sent back as the openai package dumps it), refusal."""

    type: str
    text: str | None = None
    refusal: str | None = None
    annotations: Any = None
    logprobs: Any = None


class _Message(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    role: str
    content: str | list[_Part]
    type: str = "message"
    id: str | None = None  # an earlier answer's message item, sent back whole
    status: str | None = None
    phase: str | None = None  # (the openai package's model_dump() of an answer's item has it, null)


class _FunctionCall(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    type: str
    call_id: str
    name: str
    arguments: str
    id: str | None = None
    status: str | None = None
    # An answer's call as the openai package's model_dump() sends it back: these null (none are made here)
    namespace: str | None = None
    caller: Any = None
    async_: bool | None = msgspec.field(default=None, name="async")
    async_dumped: bool | None = msgspec.field(default=None, name="async_")  # model_dump()'s name for it


class _FunctionCallOutput(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    type: str
    call_id: str
    output: str | list[_Part]
    id: str | None = None
    status: str | None = None


class _ReasoningText(msgspec.Struct, kw_only=True):
    type: str
    text: str = ""


class _ReasoningItem(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    type: str
    id: str | None = None
    summary: list[_ReasoningText] | None = None
    content: list[_ReasoningText] | None = None
    encrypted_content: Any = None
    status: str | None = None


class _FunctionTool(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    type: str
    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


_ITEMS: dict[str, type[msgspec.Struct]] = {"message": _Message, "function_call": _FunctionCall}
_ITEMS |= {"function_call_output": _FunctionCallOutput, "reasoning": _ReasoningItem}
_PARTS = {"message": "content", "function_call_output": "output"}  # an item's field that holds content parts
# Fields of a Responses body that need what dlora does not serve, and why (each refused by name).
_UNSERVED = {
    "conversation": "conversations are not stored here; send the whole conversation in input",
    "prompt": "stored prompt templates are not served",
    "max_tool_calls": "hosted tools are not served, so there are no tool calls to bound",
    "context_management": "context management is not served",
}
# The chat's names in a refusal, as the Responses body spells them (``renamed``).
_NAMES = {
    "max_completion_tokens": "max_output_tokens",
    "response_format": "text.format",
    "reasoning_effort": "reasoning.effort",
    "verbosity": "text.verbosity",
    "messages": "input",
}


_MESSAGES = re.compile(r"\bmessages(\[\d+\])?")


def _convert(value: Any, kind: Any, where: str) -> Any:
    try:
        return msgspec.convert(value, kind)
    except msgspec.ValidationError as e:
        field = field_of(str(e))
        raise APIError(
            400, f"invalid request: {e} (in {where})", param=f"{where}.{field}" if field else where
        ) from None


# The part types an input message's content (or a function's output) may hold: the chat's text
# parts (it reads each) and an earlier answer's refusal
_TEXT = frozenset({"text", "input_text", "output_text", "refusal"})


def _refuse_non_text(parts: Any, where: str) -> None:
    """An image, file or audio part refused by its name: its fields (image_url, file_id...) are
    none of a text part's, and the refusal said "unknown field image_url", not what is not served."""
    for j, part in enumerate(parts if isinstance(parts, list) else []):
        kind = part.get("type") if isinstance(part, dict) else None
        if isinstance(kind, str) and kind not in _TEXT:
            what = {"input_image": "image", "input_file": "file", "input_audio": "audio"}.get(kind, kind)
            why = f"{where}[{j}]: {what} inputs (parts of type {kind}) are not served: this model reads text only"
            raise APIError(400, why, param=f"{where}[{j}]")


def _content(parts: str | list[_Part]) -> str | list[dict[str, Any]]:
    """A content as the chat's: its parts handed on as they are, which the chat reads (text,
    input_text, output_text, refusal), checks (a part without its text, an image) and joins by
    newlines, as vLLM joins them: one conversation renders one prompt, sent either way."""
    if isinstance(parts, str):
        return parts
    return [{"type": p.type, "text": p.text, "refusal": p.refusal} for p in parts]


def _messages(body: ResponsesBody) -> list[dict[str, Any]]:
    """The conversation as chat messages: ``instructions`` as a system message first; a string
    input one user message; a function_call item an assistant message's tool call (calls in a row,
    and text just before them, one message, as a chat sends them); its output a tool message; an
    earlier answer's reasoning item the next assistant message's reasoning (followed by no answer
    of its own, a turn of reasoning alone, in its place).

    Raises:
        APIError(400): an item of no type served, or not of its type's shape; a function_call_output
            whose call_id no function_call before it made (OpenAI's "No tool call found for
            function call output with call_id ...": rendered, it answered a call never made).
    """
    out: list[dict[str, Any]] = [{"role": "system", "content": body.instructions}] if body.instructions else []
    if isinstance(body.input, str):
        return [*out, {"role": "user", "content": body.input}]
    reasoning, called = "", set[str]()
    for i, raw in enumerate(body.input):
        where = f"input[{i}]"
        kind = raw.get("type", "message") if isinstance(raw, dict) else None
        kind = kind if isinstance(kind, str) else None  # (a list there is no key of _ITEMS: a TypeError)
        if kind == "item_reference":
            raise APIError(400, "item_reference needs a stored response (responses_store)", f"{where}.type")
        if kind not in _ITEMS:
            raise APIError(400, f"input items of type {kind!r} are not supported", f"{where}.type")
        if (parts := _PARTS.get(kind)) is not None:
            _refuse_non_text(raw.get(parts), f"{where}.{parts}")
        item = _convert(raw, _ITEMS[kind], where)
        if isinstance(item, _ReasoningItem):
            reasoning += "".join(t.text for t in item.content or [])
            continue
        answer = isinstance(item, _FunctionCall) or isinstance(item, _Message) and item.role == "assistant"
        if reasoning and not answer:  # an answer of reasoning alone (cut short): its own turn, in its place
            out.append({"role": "assistant", "content": "", "reasoning": reasoning})
            reasoning = ""
        last = out[-1] if out else {}
        if isinstance(item, _Message):
            out.append({"role": item.role, "content": _content(item.content)})
        elif isinstance(item, _FunctionCall):
            called.add(item.call_id)
            function = {"name": item.name, "arguments": item.arguments}
            call = {"id": item.call_id, "type": "function", "function": function}
            if last.get("role") == "assistant" and not reasoning:
                last["tool_calls"] = [*last.get("tool_calls", []), call]
            else:
                out.append({"role": "assistant", "content": None, "tool_calls": [call]})
        elif item.call_id not in called:
            why = f"No tool call found for function call output with call_id {item.call_id}."
            raise APIError(400, why, param="input")
        else:
            out.append({"role": "tool", "tool_call_id": item.call_id, "content": _content(item.output)})
        if reasoning and out[-1]["role"] == "assistant":
            out[-1]["reasoning"], reasoning = reasoning, ""
    if reasoning:  # an answer's reasoning last, with nothing after it
        out.append({"role": "assistant", "content": "", "reasoning": reasoning})
    return out


def _tool(raw: Any, where: str) -> dict[str, Any]:
    kind = raw.get("type") if isinstance(raw, dict) else None
    if kind != "function":
        raise APIError(400, f"tools of type {kind!r} are not supported (only function)", f"{where}.type")
    tool = _convert(raw, _FunctionTool, where)
    function = {"name": tool.name, "description": tool.description, "parameters": tool.parameters}
    return {"type": "function", "function": function | {"strict": tool.strict}}


def _tool_choice(choice: str | dict[str, Any] | None) -> str | dict[str, Any] | None:
    """OpenAI's Responses tool_choice as the chat's: a named function flat there, nested here."""
    if not isinstance(choice, dict):
        return choice
    if choice.get("type") != "function" or set(choice) != {"type", "name"} or not isinstance(choice["name"], str):
        # (a name not a string went on to the chat's check, which spelled its own nested shape)
        why = 'tool_choice must be "none", "auto", "required" or {"type": "function", "name": ...}'
        raise APIError(400, why, param="tool_choice")
    return {"type": "function", "function": {"name": choice["name"]}}


def chat_format(fmt: dict[str, Any] | None) -> dict[str, Any] | None:
    """text.format as the chat's response_format: json_schema's fields flat there, nested here."""
    if fmt is None or fmt.get("type") == "text" and set(fmt) == {"type"}:
        return None
    if fmt.get("type") != "json_schema":
        return fmt  # json_object, or what the chat's check refuses in its words
    spec = {k: v for k, v in fmt.items() if k != "type"}
    return {"type": "json_schema", "json_schema": spec}


def refuse_unserved(body: ResponsesBody) -> None:
    for name, why in _UNSERVED.items():
        # by identity: 0 == False, and a previous_response_id 0 was taken as none
        if (value := getattr(body, name)) is not None and value is not False:
            raise APIError(400, f"{name} is not supported: {why}", param=name)
    if body.background and body.store is False:  # OpenAI's and vLLM's 400 (a null store is true)
        raise APIError(400, "background can only be used when `store` is true", param="background")
    if body.stream_options is not None and not body.stream:  # as the chat refuses it (OpenAI's, vLLM's)
        raise APIError(400, "stream_options is only allowed when stream is true", param="stream_options")
    if body.truncation not in (None, "disabled"):
        raise APIError(400, 'truncation "auto" is not supported: a prompt past the context is refused', "truncation")
    for name in body.include or []:
        refuse_include(name)
    if body.top_logprobs and not output_logprobs(body):  # as the chat refuses them without logprobs
        why = f'top_logprobs needs include ["{OUTPUT_LOGPROBS}"]: it counts the alternatives of those logprobs'
        raise APIError(400, why, param="top_logprobs")
    if body.reasoning is not None and (body.reasoning.summary or body.reasoning.generate_summary):
        raise APIError(400, "reasoning summaries are not made", param="reasoning.summary")


# The one ``include`` served: each output token's logprob (and ``top_logprobs`` alternatives) in the
# output_text part's ``logprobs`` and its stream's deltas (OpenAI's; vLLM #23225).
OUTPUT_LOGPROBS = "message.output_text.logprobs"
# Taken, and nothing added: no reasoning is kept to hand back encrypted, the reasoning item (with a
# reasoning_parser) carries its text instead, as vLLM answers it for a model other than gpt-oss.
# Clients such as Codex send it with each stateless (store false) request: refused, they failed.
ENCRYPTED_REASONING = "reasoning.encrypted_content"
# Every other ``include`` OpenAI documents (its Responses API reference, openai's ResponseIncludable),
# with why it is refused: what it adds is made by what dlora does not serve.
_INCLUDES_REFUSED = {
    "code_interpreter_call.outputs": "hosted tools (code_interpreter) are not served",
    "computer_call_output.output.image_url": "computer use is not served",
    "file_search_call.results": "hosted tools (file_search) are not served",
    "message.input_image.image_url": "image inputs are not served",
    "web_search_call.action.sources": "hosted tools (web_search) are not served",
    "web_search_call.results": "hosted tools (web_search) are not served",
}


def refuse_include(name: str) -> None:
    """Refuse an ``include`` value not taken (OUTPUT_LOGPROBS and ENCRYPTED_REASONING are): one
    OpenAI documents with why it is not served, another as no value OpenAI documents.

    Raises:
        APIError(400): naming ``name``, param "include"."""
    if name in (OUTPUT_LOGPROBS, ENCRYPTED_REASONING):
        return
    if why := _INCLUDES_REFUSED.get(name):
        raise APIError(400, f"include {name!r} is not supported: {why}", param="include")
    known = ", ".join(sorted([OUTPUT_LOGPROBS, ENCRYPTED_REASONING, *_INCLUDES_REFUSED]))
    raise APIError(400, f"include {name!r} is not a value OpenAI documents: one of {known}", param="include")


def output_logprobs(body: ResponsesBody) -> bool:
    """Whether ``body`` asks for its output's logprobs (``include`` names OUTPUT_LOGPROBS)."""
    return OUTPUT_LOGPROBS in (body.include or [])


def to_chat(body: ResponsesBody) -> ChatBody:
    """``body`` as the chat request that serves it.

    Raises:
        APIError(400): a field that needs what is not served (a stored response, hosted tools,
            images, an include other than OUTPUT_LOGPROBS), an input item or tool malformed, named
            by its field.
    """
    refuse_unserved(body)
    logprobs = output_logprobs(body)
    tools = [_tool(t, f"tools[{k}]") for k, t in enumerate(body.tools)] if body.tools is not None else None
    return ChatBody(
        model=body.model,
        messages=_convert(_messages(body), list[ChatMessage], "input"),
        max_completion_tokens=body.max_output_tokens,
        temperature=body.temperature,
        top_p=body.top_p,
        tools=_convert(tools, list[Tool] | None, "tools"),
        tool_choice=_tool_choice(body.tool_choice),
        parallel_tool_calls=body.parallel_tool_calls,
        response_format=chat_format(body.text.format if body.text else None),
        logprobs=logprobs or None,
        top_logprobs=body.top_logprobs if logprobs else None,
        verbosity=body.text.verbosity if body.text else None,
        reasoning_effort=body.reasoning.effort if body.reasoning else None,
        # streamed: the usage chunk is what ends a response's events (response.completed carries it)
        stream=body.stream,
        stream_options=StreamOptions(include_usage=True) if body.stream else None,
        user=body.user,
        metadata=body.metadata,
        service_tier=body.service_tier,
        safety_identifier=body.safety_identifier,
        prompt_cache_key=body.prompt_cache_key,
        prompt_cache_retention=body.prompt_cache_retention,
        top_k=body.top_k,
        seed=body.seed,
        stop=body.stop,
        repetition_penalty=body.repetition_penalty,
        ignore_eos=body.ignore_eos,
        skip_special_tokens=body.skip_special_tokens,
        include_stop_str_in_output=body.include_stop_str_in_output,
        priority=body.priority,
        cache_salt=body.cache_salt,
        request_id=body.request_id,
        structured_outputs=body.structured_outputs,
        chat_template_kwargs=body.chat_template_kwargs,
    )


def decode(raw: bytes) -> tuple[ResponsesBody, ChatBody]:
    """A Responses body, and the chat that serves it (APIError 400: as ``decode_body``, ``to_chat``)."""
    body = decode_body(raw, ResponsesBody)
    return body, to_chat(body)


def renamed(e: APIError) -> APIError:
    """A chat check's refusal named by the Responses field it is about (max_completion_tokens is
    max_output_tokens there, response_format text.format, a message an input item)."""
    if e.param is None:
        return e
    head, dot, rest = e.param.partition(".")
    name = head.split("[", 1)[0]
    if name == "messages":
        param = "input"
    elif name in ("tools", "tool_choice") and rest.startswith("function."):  # (flat here, nested there)
        param = f"{head}.{rest.removeprefix('function.')}"
    else:
        param = _NAMES.get(name, name) + head[len(name) :] + dot + rest
    message = _MESSAGES.sub("input", e.message)  # (an index there counts chat messages, not input items)
    message = message.replace("tool_choice.function.", "tool_choice.")
    for chat, ours in _NAMES.items():
        if chat != "messages":
            message = message.replace(chat, ours)
    renamed = APIError(e.status, message, param=param, kind=e.kind, code=e.code, headers=e.headers)
    return renamed
