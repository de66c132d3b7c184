"""The OpenAI-compatible surface as the spec has it: the request bodies, the error body, and the
response and stream-chunk shapes. Pure: no aiohttp, no NATS. A body into requests: ``shaping``'s work.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import msgspec

from dlora.common import integers
from dlora.common.undecodable import field_of
from dlora.services.gateway.call_ids import CALL_ID_PREFIX, tool_call_id
from dlora.services.gateway.reasoning import REASONING_END, ReasoningParser, split
from dlora.services.gateway.structured_outputs import StructuredOutputs
from dlora.services.gateway.tool_base import Call, joined
from dlora.services.gateway.tool_calls import CallStream
from dlora.services.gateway.tool_parsers import ToolParser


class APIError(Exception):
    """A request the gateway refuses: HTTP status, an OpenAI-style error body (``code``: OpenAI's
    machine-readable reason, such as ``invalid_api_key``) and the response headers it needs
    (``Retry-After`` on a 429, ``WWW-Authenticate`` on a 401)."""

    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        kind: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.headers = headers or {}
        self.kind = kind or {
            400: "invalid_request_error",
            401: "invalid_request_error",  # OpenAI's, with code invalid_api_key where a key is wrong
            403: "permission_error",
            404: "invalid_request_error",  # OpenAI's and vLLM's (a response, a model, a URL not there)
            409: "invalid_request_error",
            429: "rate_limit_exceeded",
            503: "service_unavailable",
        }.get(status, "invalid_request_error" if status < 500 else "server_error")

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


def model_not_found(name: str, base_name: str) -> APIError:
    """404 for a model the caller may not use, in OpenAI's words and code (completions, chat, tokenize
    and ``GET /v1/models/{model}`` alike); a path or Hub id ending in ``base_name`` is told that name,
    as vLLM's clients name the base by vLLM's ``--model``, the folder's path or the repository's id."""
    named = name != base_name and f"/{name.strip('/')}".endswith(f"/{base_name}")  # by whole parts: org/name too
    hint = f" The base model is served as '{base_name}' (served_model_name; default its folder's name, not its path)."
    message = f"The model '{name}' does not exist or you do not have access to it.{hint if named else ''}"
    return APIError(404, message, param="model", code="model_not_found")


def documented(**schema: object) -> msgspec.Meta:
    """JSON Schema keywords for the OpenAPI document alone (``Meta``'s own ones msgspec would
    enforce; these the handlers check, in their own words): a schema-driven client's valid request
    was refused where the document said less than the checks."""
    return msgspec.Meta(extra_json_schema=schema)


class StreamOptions(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    include_usage: bool | None = None
    continuous_usage_stats: bool | None = None  # vLLM's: every event carries the usage so far
    include_obfuscation: bool | None = None  # no effect here: nothing is obfuscated


# Request bodies follow the OpenAI OpenAPI document field by field: a field the spec marks
# nullable is ``T | None`` here and null means its default; a field the spec does not have is
# refused by name ("unknown field"), as the OpenAI API refuses it. Ranges are checked in
# ``sampling.sampling_params`` (the spec's minimum and maximum). Fields of the spec that dlora
# cannot honour are declared ``Any`` so a value other than null or the default gets a 400 naming them.


class _Sampling(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    model: str | None = None  # None: the base model (vLLM's default; OpenAI requires it)
    max_tokens: int | None = None
    temperature: float | None = None  # [0, 2], default 1
    top_p: float | None = None  # [0, 1], default 1
    n: int | None = None  # [1, 128], default 1
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    user: str | None = None
    presence_penalty: float | None = None  # [-2, 2], default 0
    frequency_penalty: float | None = None  # [-2, 2], default 0
    logit_bias: dict[str, float] | None = None  # token id (as a string) -> [-100, 100]
    # vLLM extensions
    top_k: int | None = None
    min_p: float | None = None  # [0, 1], default 0
    ignore_eos: bool | None = None
    stop_token_ids: list[int] | None = None
    skip_special_tokens: bool | None = None
    include_stop_str_in_output: bool | None = None
    min_tokens: int | None = None  # [0, max_tokens], default 0
    repetition_penalty: float | None = None  # above 0 (vLLM's), default 1
    allowed_token_ids: list[int] | None = None  # only these may be sampled; not empty
    bad_words: list[str] | None = None
    truncate_prompt_tokens: int | None = None  # >= 1: the prompt's last this many tokens are kept
    # vLLM's, taken at their defaults only (clients send them spelled out): refused otherwise
    spaces_between_special_tokens: Any = None  # true
    use_beam_search: Any = None  # false
    length_penalty: Any = None  # 1.0
    return_tokens_as_token_ids: bool | None = None  # logprobs name tokens "token_id:N"
    # vLLM's: each choice says its token ids (token_ids) and its prompt's (prompt_token_ids; a
    # chat response's at its top), streamed with the first event and each event's delta (RL
    # trainers read them instead of tokenizing the text again)
    return_token_ids: bool | None = None
    # vLLM's: each prompt token's log-probability and this many alternatives ([0, 20]), answered
    # as vLLM does (a choice's on completions, the response's on chat); not with stream (k > 0)
    prompt_logprobs: int | None = None
    priority: int | None = None  # lower is served first; default 0
    cache_salt: str | None = None  # prefix-cache blocks shared only with the same salt; not empty
    # vLLM's: the response's id is "chatcmpl-" / "cmpl-" and this (tracing a request through a
    # client's own logs); the requests inside stay dlora's own, unique ids. At most 256 printable.
    request_id: str | None = None
    # Structured output, at most one of: OpenAI's response_format (vLLM takes it on completions
    # too), vLLM's structured_outputs and its older guided_* fields (sampling.structured).
    response_format: Any = None
    structured_outputs: StructuredOutputs | None = None
    guided_json: str | dict[str, Any] | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None
    guided_decoding_backend: str | None = None  # vLLM's choice of grammar engine: here always llguidance
    guided_whitespace_pattern: Any = None  # refused when set


class CompletionBody(_Sampling, kw_only=True, forbid_unknown_fields=True):
    prompt: str | list[Any]  # a string, token ids, or a list of either (checked by the gateway)
    add_special_tokens: bool | None = None  # vLLM's: a text prompt's BOS (and the like); default true
    echo: bool | None = None
    best_of: int | None = None  # [0, 20], default 1
    logprobs: int | None = None  # [0, 5]
    suffix: str | None = None


class ContentPart(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    type: str
    text: str | None = None  # required of a text part (checked by the gateway)
    # other part types (image_url, input_audio, file, refusal) carry one more field: named in the refusal
    image_url: Any = None
    input_audio: Any = None
    file: Any = None
    refusal: Any = None


class ToolFunction(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None  # a JSON Schema of its arguments; none: any object
    strict: bool | None = None


class Tool(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    type: str  # "function" (the only kind served)
    function: ToolFunction


class ChatMessage(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    role: str
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: Any = None
    tool_call_id: str | None = None
    function_call: Any = None
    audio: Any = None
    refusal: str | None = None
    # What replies carry and clients send back in the history unchanged (the openai package's
    # message.model_dump()): OpenAI's annotations (not rendered), and a reasoning parser's
    # reasoning_content / reasoning (vLLM's), given to the template as reasoning_content.
    annotations: Any = None
    reasoning_content: str | None = None
    reasoning: str | None = None


class ChatBody(_Sampling, kw_only=True, forbid_unknown_fields=True):
    messages: list[ChatMessage]
    max_completion_tokens: int | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = None  # [0, 20]
    # vLLM extensions: how the conversation is rendered (see chat_template.ChatTemplate)
    add_special_tokens: bool | None = None  # false (vLLM's default for chat): the template places them
    add_generation_prompt: bool | None = None
    continue_final_message: bool | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    include_reasoning: bool | None = None  # vLLM's: false, a reasoning parser's reasoning not answered (Shape)
    # vLLM's: the reply's content begins with the last message's where that has the reply's role
    # (chat_template.echoed): a continued message comes back whole.
    echo: bool | None = None
    # Metadata with no effect on the tokens: accepted and ignored.
    metadata: dict[str, str] | None = None
    store: bool | None = None
    service_tier: str | None = None
    safety_identifier: str | None = None
    prompt_cache_key: str | None = None  # routes a conversation's requests together (affinity.py)
    prompt_cache_retention: str | None = None  # in_memory or 24h (sampling.CACHE_RETENTIONS): echoed only
    parallel_tool_calls: bool | None = None
    # Tools: rendered by the chat template; a named tool_choice constrains the output to that
    # function's arguments and answers it as a tool call (sampling.forced_tool), "required" to a
    # list of calls (tool_calls.py; parallel_tool_calls false: one); "auto" (the default with
    # tools) reads the calls the model wrote, by the gateway's tool_call_parser (tool_parsers.py).
    tools: list[Tool] | None = None
    tool_choice: str | dict[str, Any] | None = None
    # vLLM's: documents for a RAG template (each a mapping of strings, e.g. title and text),
    # rendered by the chat template as transformers' apply_chat_template(documents=...) does.
    documents: list[dict[str, str]] | None = None
    reasoning_effort: str | None = None  # given to the chat template, as vLLM (chat_template._with_effort)
    # In the spec, not served here: refused when set.
    functions: Any = None
    function_call: Any = None
    audio: Any = None
    modalities: list[str] | None = None
    prediction: Any = None
    web_search_options: Any = None
    verbosity: str | None = None
    moderation: Any = None
    prompt_cache_options: Any = None


# Either endpoint's body, as the shaping functions take it.
Body = CompletionBody | ChatBody


class _Named(msgspec.Struct):
    model: str | None = None


def model_named(raw: bytes, default: str) -> str:
    """The ``model`` a request body names, read whatever else in it is wrong (``default``, the base
    model, when it names none or ""; "" when it cannot be read): what its refusal is counted under."""
    try:
        return msgspec.json.decode(raw, type=_Named).model or default
    except (msgspec.ValidationError, msgspec.DecodeError, RecursionError):  # decode_body says why
        return ""


def decode_body(raw: bytes, kind: type[msgspec.Struct]) -> Any:
    """``raw`` JSON as a ``kind`` body.

    Raises:
        APIError(400): malformed JSON, JSON nested deeper than the decoder follows, or a field
            missing, unknown or of the wrong type (msgspec's reason; ``integers.decode``'s: 16.0 is 16).
    """
    try:
        return integers.decode(raw, kind)
    except msgspec.ValidationError as e:
        raise APIError(400, f"invalid request: {e}", param=field_of(str(e))) from None
    except msgspec.DecodeError as e:
        raise APIError(400, f"malformed JSON: {e}") from None
    except RecursionError:  # msgspec's own bound on nesting
        raise APIError(400, "malformed JSON: nested too deeply") from None


@dataclass
class Choice:
    """One choice of a response as it completes (one prompt x one of its ``n`` samples)."""

    index: int
    text: str = ""
    finish_reason: str | None = None
    logprobs: dict[str, Any] | None = None
    stop_reason: str | int | None = None  # vLLM's: the stop string or token id that ended it
    prompt_logprobs: list[dict[str, Any] | None] | None = None  # vLLM's field (``vllm_prompt_logprobs``)
    token_ids: list[int] | None = None  # vLLM's return_token_ids: the choice's generated tokens
    prompt_token_ids: list[int] | None = None  # and its prompt's


@dataclass
class Shape:
    """What a response looks like: completion or chat, for one request."""

    chat: bool
    request_id: str
    model: str
    created: int
    tool: str | None = None  # a chat's forced function (tool_choice): each choice answers as a call of it
    # tool_choice "required": each choice's output is a list of calls (tool_calls.calls_schema),
    # answered as OpenAI's tool_calls with finish_reason "tool_calls"; streamed, a call per item.
    tools_required: bool = False
    _call_streams: dict[int, CallStream] = field(default_factory=dict)
    _opened: set[int] = field(default_factory=set)  # choices whose forced call has opened (id and name sent)
    # tool_choice "auto": each choice's text read for calls alike whole and streamed (tool_parsers.PARSERS; "": not)
    tool_parser: str = ""
    tool_names: frozenset[str] | None = None  # the request's tools' (ToolParser.names)
    parallel_calls: bool = True  # parallel_tool_calls; false: at most one call (OpenAI's), the first
    # What the calls' ids are made of: random per response (dlora's own request id), never the
    # client's request_id (a session id reused per turn gave every turn the same call ids).
    call_ids: str = ""
    call_id_length: int = 0  # calls' ids of this many alphanumeric characters (call_ids.CALL_ID_LENGTHS); 0: ours
    _parsers: dict[int, ToolParser] = field(default_factory=dict)
    # A chat reply's role: the assistant's, or with add_generation_prompt false the last message's
    # (vLLM's get_chat_request_role: an echoed user message came back as the assistant's)
    role: str = "assistant"
    # The gateway's reasoning_parser ("": off): a chat's <think> block goes out as "reasoning", the rest as
    # content, the only text tool_parser reads (reasoning.py); thinking false (qwen3's enable_thinking): all content.
    reasoning_parser: str = ""
    thinking: bool = True
    include_reasoning: bool = True  # false (with a reasoning_parser): no reasoning, nor logprobs or ids that show it
    _reasoners: dict[int, ReasoningParser] = field(default_factory=dict)

    @classmethod
    def new(cls, chat: bool, request_id: str, model: str) -> Shape:
        return cls(chat, request_id, model, int(time.time()))

    def _head(self, streaming: bool) -> dict[str, Any]:
        obj = ("chat.completion.chunk" if streaming else "chat.completion") if self.chat else "text_completion"
        return {"id": self.request_id, "object": obj, "created": self.created, "model": self.model}

    def full(
        self, choices: list[Choice], prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0
    ) -> dict[str, Any]:
        out = []
        for c in sorted(choices, key=lambda c: c.index):
            shown = c.logprobs if self.include_reasoning else None
            choice: dict[str, Any] = {"index": c.index, "logprobs": shown, "finish_reason": c.finish_reason}
            choice["stop_reason"] = c.stop_reason
            reasoning, text = split(self.reasoning_parser, c.text, self.thinking)
            if self.tools_required:  # (the calls are the content: a grammar binds only what follows the reasoning)
                (calls := CallStream()).feed(text or "")
                listed = [self._call(c.index, args, name, k) for k, (name, args) in enumerate(calls.calls)]
                choice["message"] = {"role": self.role, "content": None} | ({"tool_calls": listed} if listed else {})
                if c.finish_reason == "stop" and calls.closed:
                    choice["finish_reason"] = "tool_calls"
            elif self.tool is not None:  # OpenAI's forced call: no content, the call's arguments the text
                calls = [self._call(c.index, text or "")] if reasoning is None or REASONING_END in c.text else []
                choice["message"] = {"role": self.role, "content": None} | ({"tool_calls": calls} if calls else {})
            elif self.tool_parser:
                parser = ToolParser(self.tool_parser, names=self.tool_names)
                content, calls = self._allowed(joined(parser.feed(text or ""), parser.finish()))
                said = (content or None) if parser.tools_called else content  # (beside calls "" is null: vLLM's)
                choice["message"] = {"role": self.role, "content": said}
                if calls:
                    choice["message"]["tool_calls"] = [self._call(c.index, args, name, k) for k, name, args in calls]
                    if c.finish_reason == "stop":
                        choice["finish_reason"] = "tool_calls"
            elif self.chat:
                choice["message"] = {"role": self.role, "content": text}
            else:
                choice["text"] = c.text
            if self.chat:  # refusal: the spec requires it, null (OpenAI and vLLM send it); reasoning: vLLM's, null too
                shown = {"reasoning": reasoning if self.include_reasoning else None} if self.reasoning_parser else {}
                content = (choice["message"]["content"] or None) if shown else choice["message"]["content"]
                content = "" if self._no_call(choice["message"]) else content
                choice["message"] |= {"content": content, "refusal": None} | shown
            if c.prompt_logprobs is not None and not self.chat:
                choice["prompt_logprobs"] = c.prompt_logprobs
            if c.token_ids is not None and self.include_reasoning:  # (false: they would show the reasoning)
                choice["token_ids"] = c.token_ids
                if not self.chat:
                    choice["prompt_token_ids"] = c.prompt_token_ids
            out.append(choice)
        response = {**self._head(False), "choices": out}
        response["usage"] = usage(prompt_tokens, completion_tokens, cached_tokens)
        if self.chat and (asked := [c.prompt_logprobs for c in choices if c.prompt_logprobs is not None]):
            response["prompt_logprobs"] = asked[0]  # one prompt, whatever n: the response's (vLLM's)
        if self.chat and (ids := [c.prompt_token_ids for c in choices if c.token_ids is not None]):
            response["prompt_token_ids"] = ids[0]  # likewise
        return response

    def chunk(
        self,
        text: str,
        finish_reason: str | None,
        *,  # by name: an index given in first's place was taken for it
        first: bool = False,
        index: int = 0,
        logprobs: dict[str, Any] | None = None,
        stop_reason: str | int | None = None,
        token_ids: list[int] | None = None,
        prompt_token_ids: list[int] | None = None,
    ) -> dict[str, Any]:
        """One event of a streamed response; ``token_ids`` / ``prompt_token_ids``: vLLM's
        return_token_ids (the event's tokens; the prompt's, with a choice's first event)."""
        shown = logprobs if self.include_reasoning else None
        choice: dict[str, Any] = {"index": index, "logprobs": shown, "finish_reason": finish_reason}
        choice["stop_reason"] = stop_reason
        if token_ids is not None and self.include_reasoning:
            choice["token_ids"] = token_ids
        reasoner = self._reasoners.get(index) or self._reasoners.setdefault(
            index, ReasoningParser(self.reasoning_parser, self.thinking)
        )
        reasoning, text = reasoner.piece(text, finish_reason is not None)  # (no parser: "", the text as it is)
        reasoning = reasoning if self.include_reasoning else ""  # (its event says content "", as a held token's)
        if self.tools_required:  # each call whole, id, name and arguments, as its item of the list ends
            calls = self._call_streams.setdefault(index, CallStream())
            listed = [self._call(index, args, name, k) | {"index": k} for k, name, args in calls.feed(text)]
            choice["delta"] = ({"role": self.role, "content": None} if first else {}) | (
                {"tool_calls": listed} if listed else {}
            )
            if finish_reason == "stop" and calls.closed:
                choice["finish_reason"] = "tool_calls"
            if finish_reason is not None and not calls.calls:  # (as a whole answer's: ``_no_call``)
                choice["delta"]["content"] = ""
        elif self.tool is not None:  # opens with its id and name past the reasoning (vLLM's), then the arguments
            opens = (reasoner.ended if self.reasoning_parser else first) and index not in self._opened
            self._opened |= {index} if opens else set()
            call = self._call(index, text) | {"index": 0} if opens else {"index": 0, "function": {"arguments": text}}
            said = {"tool_calls": [call]} if opens or text else {}  # (content comes only once it has opened)
            choice["delta"] = ({"role": self.role, "content": None} if first else {}) | said
            if finish_reason is not None and index not in self._opened:  # (as a whole answer's: ``_no_call``)
                choice["delta"]["content"] = ""
        elif self.tool_parser:  # text as it comes, held back only where a call may begin; each call whole
            parser = self._parsers.setdefault(index, ToolParser(self.tool_parser, names=self.tool_names))
            content, calls = parser.feed(text)
            if finish_reason is not None:
                content, calls = joined((content, calls), parser.finish())
            content, calls = self._allowed((content, calls))
            listed = [self._call(index, args, name, k) | {"index": k} for k, name, args in calls]
            delta: dict[str, Any] = {"role": self.role} if first else {}
            if content or first or (finish_reason is None and not listed and not reasoning):
                delta["content"] = content
            choice["delta"] = delta | ({"tool_calls": listed} if listed else {})
            if finish_reason == "stop" and parser.calls:
                choice["finish_reason"] = "tool_calls"
        elif self.chat:
            # Content always, "" too, but in the last event when it adds nothing (OpenAI's "delta":
            # {}): a token whose text is held back (a character split across tokens) still has an
            # event, and code that appends delta.content mid-stream must not meet None (vLLM sends "").
            content = {"content": text} if text or first or (finish_reason is None and not reasoning) else {}
            choice["delta"] = ({"role": self.role} if first else {}) | content
        else:
            choice["text"] = text
            if prompt_token_ids is not None:
                choice["prompt_token_ids"] = prompt_token_ids
        if reasoning:
            choice["delta"]["reasoning"] = reasoning
        head = self._head(True)
        if self.chat and prompt_token_ids is not None:
            head["prompt_token_ids"] = prompt_token_ids
        return {**head, "choices": [choice]}

    def _no_call(self, message: dict[str, Any]) -> bool:
        """Whether a forced call's or a required list's choice made no call (cut short, or all
        reasoning): its content is "" then, not null, as vLLM's (``content or ""``). An assistant
        message with null content and no tool_calls is one OpenAI's API refuses (content is
        required unless tool_calls is given), so a client that sends the turn back was refused."""
        return (self.tools_required or self.tool is not None) and "tool_calls" not in message

    def _allowed(self, read: tuple[str, list[Call]]) -> tuple[str, list[Call]]:
        content, calls = read
        return content, calls if self.parallel_calls else [c for c in calls if c[0] == 0]

    def silent(self, event: dict[str, Any]) -> bool:
        """Whether a mid-stream event of a tool-call answer, or of one whose reasoning is hidden
        (include_reasoning false: a thinking token), says nothing (its text held back, a call not
        whole yet): not sent, as vLLM sends none. A text answer keeps an event per token."""
        if not (self.tool or self.tools_required or self.tool_parser) and self.include_reasoning:
            return False
        [choice] = event["choices"]
        if choice["finish_reason"] is not None or choice["logprobs"] is not None or "role" in choice["delta"]:
            return False
        if choice.get("token_ids"):  # return_token_ids: the ids must all reach the client (a review)
            return False
        delta = choice["delta"]
        said = delta.get("content") or delta.get("reasoning")
        return not said and not any("id" in c or c["function"]["arguments"] for c in delta.get("tool_calls", []))

    def _call(self, index: int, arguments: str, name: str | None = None, k: int = 0) -> dict[str, Any]:
        """Choice ``index``'s ``k``-th call of ``name`` (default: the forced one); a delta adds its ``index``."""
        base = self.call_ids or self.request_id.rsplit("-", 1)[-1]
        # seeded by what the ids were before (chatcmpl-tool-<hex><index>): a Mistral id stays as it was
        call_id = tool_call_id(f"{CALL_ID_PREFIX}{base}{index}" + (f"-{k}" if k else ""), self.call_id_length)
        function = {"name": self.tool if name is None else name, "arguments": arguments}
        return {"id": call_id, "type": "function", "function": function}

    def usage_chunk(self, prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> dict[str, Any]:
        return {**self._head(True), "choices": [], "usage": usage(prompt_tokens, completion_tokens, cached_tokens)}


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int | None = None) -> dict[str, Any]:
    """OpenAI's usage object; with ``cached_tokens`` (a response's final usage) its
    ``prompt_tokens_details``: how many prompt tokens came from the prefix cache, as OpenAI always
    says (vLLM with --enable-prompt-tokens-details). Not in the per-event usage of vLLM's
    continuous_usage_stats, whose shape is vLLM's."""
    out: dict[str, Any] = {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }
    if cached_tokens is not None:
        out["prompt_tokens_details"] = {"cached_tokens": cached_tokens}
    return out
