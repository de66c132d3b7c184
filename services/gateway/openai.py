"""The OpenAI-compatible surface as the spec has it: the request bodies and the error body; the
response and stream-chunk shapes are ``completion_shape``'s. Pure: no aiohttp, no NATS. A body into
requests: ``shaping``'s work.
"""

from __future__ import annotations

from typing import Any

import msgspec

from dlora.common import integers
from dlora.common.undecodable import field_of
from dlora.services.gateway.structured_outputs import StructuredOutputs


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
