"""A request body's sampling fields as the engine's ``SamplingParams``: the spec's ranges, the
fields dlora cannot honour (refused by name), logit_bias keys, structured outputs (response_format,
vLLM's structured_outputs and guided_*) as llguidance constraints.
Pure: no I/O."""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Mapping
from typing import Any

from dlora.common.messages import MAX_CACHE_SALT, SamplingParams
from dlora.common.sampling import BODY_RANGES, COMPLETION_RANGES, Range, best_of_problem
from dlora.common.sampling import RANGES as SAMPLING_RANGES
from dlora.services.gateway.openai import APIError, Body, ChatBody, CompletionBody, ToolFunction
from dlora.services.gateway.tool_calls import ConflictingDefs, arguments_schema, calls_schema
from dlora.services.gateway.tool_parsers import PARSERS
from dlora.services.worker.engine.structured import (
    JSON_OBJECT_SCHEMA,
    GrammarError,
    Grammars,
    GrammarUnavailable,
    check,
)

# The body's ranges: the engine's (``common.sampling.RANGES``, one table, one wording) for the
# fields that mean the same here, and the request's own (``BODY_RANGES``, and a completion's
# ``COMPLETION_RANGES``). The chat's logprobs is a flag, not the engine's count.
RANGES: dict[str, Range] = {name: r for name, r in SAMPLING_RANGES.items() if name != "logprobs"} | BODY_RANGES

# OpenAI's prompt_cache_retention values (its API's and its OpenAPI document's), and "in-memory",
# which openai-python's types spelled it (openai/openai-python#2883) and the API refuses: no client
# written to those types is refused here, where no policy changes what is cached (echoed only).
CACHE_RETENTIONS = ("in_memory", "24h", "in-memory")


def _check_ranges(body: Body) -> None:
    ranges = RANGES | COMPLETION_RANGES if isinstance(body, CompletionBody) else RANGES
    for name, bounds in ranges.items():
        if (value := getattr(body, name, None)) is not None and (why := bounds.problem(name, value)) is not None:
            raise APIError(400, why, param=name)


def _unsupported(body: Body, spaced: bool = True) -> list[tuple[str, bool]]:
    """(what, set to something dlora cannot honour) for every field of the spec it does not serve;
    ``what`` begins with the field's name. ``spaced``: the workers' decode writes spaces between
    added tokens, which vLLM's spaces_between_special_tokens=false would take out (else it is
    what every request gets: taken)."""
    so = body.structured_outputs
    spaces = body.spaces_between_special_tokens
    out: list[tuple[str, bool]] = [
        ("spaces_between_special_tokens", not (spaces is None or spaces is True or (spaces is False and not spaced))),
        ("use_beam_search", body.use_beam_search not in (None, False)),
        ("length_penalty", body.length_penalty not in (None, 1, 1.0) or isinstance(body.length_penalty, bool)),
        ("guided_whitespace_pattern", body.guided_whitespace_pattern is not None),
        ("structured_outputs.whitespace_pattern", so is not None and so.whitespace_pattern is not None),
        ("structured_outputs.structural_tag", so is not None and so.structural_tag is not None),
    ]
    if isinstance(body, CompletionBody):
        out += [
            ("suffix", body.suffix is not None),
        ]
    else:
        out += [
            # vLLM's rule: 0 asks for nothing, so it needs no logprobs (the openai package's users send it)
            ("top_logprobs without logprobs: true", bool(body.top_logprobs) and not body.logprobs),
            ("functions", bool(body.functions)),
            ("function_call", body.function_call not in (None, "none", "auto")),
            ("audio", body.audio is not None),
            ("modalities", (body.modalities or ["text"]) != ["text"]),
            ("prediction", body.prediction is not None),
            ("web_search_options", body.web_search_options is not None),
            ("verbosity", body.verbosity is not None),
            ("moderation", body.moderation is not None),
            ("prompt_cache_options", body.prompt_cache_options is not None),
        ]
    return out


# What each response_format type holds (OpenAI's ResponseFormat types): anything else was taken
# without a word, where OpenAI and vLLM answer 400.
_FORMAT_FIELDS = {"text": {"type"}, "json_object": {"type"}, "json_schema": {"type", "json_schema"}}


def _json_schema_format_problem(spec: dict[str, Any]) -> str | None:
    """What is wrong with a response_format's ``json_schema`` object (OpenAI's JSONSchema: a
    ``name`` of 1-64 of a-z, A-Z, 0-9, _ and -, ``schema``, ``description`` and ``strict``), or None."""
    if extra := sorted(set(spec) - {"name", "schema", "description", "strict"}):
        return f"has no field {extra[0]!r}"
    if not isinstance(name := spec.get("name"), str) or not _FUNCTION_NAME.fullmatch(name):
        return f"needs a 'name' of 1 to 64 letters, digits, '_' and '-', got {name!r}"
    if spec.get("strict") is not None and not isinstance(spec["strict"], bool):
        return f"strict must be true or false, got {spec['strict']!r}"
    if spec.get("description") is not None and not isinstance(spec["description"], str):
        return "description must be a string"
    return None


# OpenAI's function names (the API reference, FunctionDefinition.name: a-z, A-Z, 0-9, _ and -, at
# most 64), and the dots and colons of namespaced tools (an MCP server's ``server.tool``), which
# vLLM serves and templates render.
_FUNCTION_NAME = re.compile(r"[a-zA-Z0-9_.:-]{1,64}")


def forced_tool(body: Body) -> ToolFunction | None:
    """The function a chat's ``tool_choice`` names, whose call answers each choice; None: the
    choices are text ("none", or no tools: the tools, if any, are only rendered by the template),
    lists of calls ("required", ``tools_required``), or text read for calls ("auto", ``auto_tools``).

    Raises:
        APIError(400): a tool of another type than function; a function name not 1-64 of a-z,
            A-Z, 0-9, _, -, . and : (OpenAI's, with namespaces' dots and colons) or given twice (a
            call could not say which it means); a tool_choice without tools; a named function that is not among them.
    """
    if not isinstance(body, ChatBody):
        return None
    tools, choice = body.tools or [], body.tool_choice
    if bad := [t.type for t in tools if t.type != "function"]:
        raise APIError(400, f"tools of type {bad[0]!r} are not supported (only function)", param="tools")
    names = [t.function.name for t in tools]
    if bad := [n for n in names if not _FUNCTION_NAME.fullmatch(n)]:
        why = f"tools: function name {bad[0]!r} must be 1 to 64 of a-z, A-Z, 0-9, _, -, . and :"
        raise APIError(400, why, param="tools")
    if twice := [n for n, count in Counter(names).items() if count > 1]:  # linear: a body may list ~20,000
        raise APIError(400, f"tools: function name {twice[0]!r} is given more than once", param="tools")
    if choice in (None, "none"):
        return None
    if not tools:  # vLLM's words ("auto" too, as vLLM and OpenAI refuse it)
        raise APIError(400, "When using `tool_choice`, `tools` must be set.", param="tool_choice")
    if choice in ("auto", "required"):
        return None
    function = choice.get("function") if isinstance(choice, dict) else None
    name = function.get("name") if isinstance(function, dict) else None
    if not isinstance(choice, dict) or choice.get("type") != "function" or not isinstance(name, str):
        why = 'tool_choice must be "none", "auto", "required" or {"type": "function", "function": {"name": ...}}'
        raise APIError(400, why, param="tool_choice")
    if (tool := next((t.function for t in tools if t.function.name == name), None)) is None:
        raise APIError(400, f"tool_choice names {name!r}, which is not among the tools", param="tool_choice")
    return tool


def auto_tools(body: Body, parser: str) -> bool:
    """Whether a chat's output is read for the calls the model chose to make (tool_choice "auto",
    the default with tools), by the gateway's ``tool_call_parser``.

    Raises:
        APIError(400): "auto" without a parser configured, as vLLM refuses it without
            ``--enable-auto-tool-choice``.
    """
    if not (isinstance(body, ChatBody) and body.tools and body.tool_choice in (None, "auto")):
        return False
    forced_tool(body)  # the tools' own checks
    if not parser:
        why = "tool_choice \"auto\" (the default with tools) needs the gateway's tool_call_parser (vLLM's "
        why += "--tool-call-parser), which is not set ([gateway] tool_call_parser or DLORA_GATEWAY_TOOL_CALL_PARSER: "
        why += f'{", ".join(PARSERS)}): give "none", "required" or a named function'
        raise APIError(400, why, param="tool_choice")
    return True


def tools_required(body: Body) -> bool:
    """Whether each choice answers with a list of calls of the tools (tool_choice "required")."""
    return isinstance(body, ChatBody) and body.tool_choice == "required" and forced_tool(body) is None


def _asked(body: Body, build: bool = True) -> list[tuple[str, dict[str, Any]]]:
    """The structured outputs ``body`` asks for, in the order ``structured`` reads them: each the
    body's field and its ``SamplingParams`` fields (not ``build``: the fields alone, the schemas
    not made, for a body ``structured`` accepted).

    Raises:
        APIError(400): an unknown response_format type, a json_schema without a schema, tools whose
        definitions conflict (in that reading order, before any other check), a structured_outputs
        that names no constraint where nothing else asks for one.
    """
    asked: list[tuple[str, dict[str, Any]]] = []

    def schema(field: str, value: str | dict[str, Any]) -> None:
        made = value if isinstance(value, str) or not build else json.dumps(value)
        asked.append((field, {"json_schema": made}))

    if (tool := forced_tool(body)) is not None:  # its arguments: a document of its parameters' schema
        schema("tool_choice", arguments_schema(tool.parameters) if build else "")
    elif tools_required(body) and not build:
        asked.append(("tool_choice", {}))
    elif tools_required(body):
        assert isinstance(body, ChatBody) and body.tools
        listed = [(t.function.name, t.function.parameters) for t in body.tools]
        try:
            schema("tool_choice", calls_schema(listed, parallel=body.parallel_tool_calls is not False))
        except ConflictingDefs as e:
            raise APIError(400, str(e), param="tools") from None
    fmt = body.response_format
    if fmt is not None:
        kind = fmt.get("type") if isinstance(fmt, dict) else None
        if isinstance(fmt, dict) and kind in _FORMAT_FIELDS and (extra := sorted(set(fmt) - _FORMAT_FIELDS[kind])):
            raise APIError(400, f"response_format of type {kind} has no field {extra[0]!r}", param="response_format")
        if kind == "json_object":
            asked.append(("response_format", {"json_schema": JSON_OBJECT_SCHEMA}))
        elif kind == "json_schema":
            spec = fmt.get("json_schema")
            if not isinstance(spec, dict) or not isinstance(spec.get("schema"), dict):
                raise APIError(400, "response_format json_schema needs a 'schema' object", param="response_format")
            if problem := _json_schema_format_problem(spec):
                raise APIError(400, f"response_format json_schema {problem}", param="response_format")
            schema("response_format", spec["schema"])
        elif kind != "text":
            raise APIError(
                400,
                f"response_format type {kind!r} is not one of text, json_object, json_schema",
                param="response_format",
            )
    so = body.structured_outputs
    for field, value, key in (
        ("guided_regex", body.guided_regex, "regex"),
        ("guided_choice", body.guided_choice, "choice"),
        ("guided_grammar", body.guided_grammar, "grammar"),
        ("structured_outputs", so and so.regex, "regex"),
        ("structured_outputs", so and so.choice, "choice"),
        ("structured_outputs", so and so.grammar, "grammar"),
    ):
        if value not in (None, []):  # an empty choice asks for nothing, as vLLM reads it
            asked.append((field, {key: value}))
    if body.guided_json is not None:
        schema("guided_json", body.guided_json)
    if so is not None and so.json is not None:
        schema("structured_outputs", so.json)
    if so is not None and so.json_object:
        asked.append(("structured_outputs", {"json_schema": JSON_OBJECT_SCHEMA}))
    if so is not None and not asked:
        # run free, it answered as if constrained (vLLM refuses it beside another constraint too:
        # "none are specified"; clients send its backend options beside response_format, served)
        why = "structured_outputs names no constraint: give json, regex, choice (not empty), grammar or json_object"
        raise APIError(400, why, param="structured_outputs")
    return asked


def structured_field(body: Body) -> str | None:
    """The body's field that asks for a structured output (None: free text), for errors found as
    the output grows (``param``). Call after ``structured`` accepted ``body``: no schema is made
    again (a tool_choice "required" over 20,000 tools took ~0.1 s to)."""
    return next((field for field, _ in _asked(body, build=False)), None)


def structured(body: Body, grammars: Grammars | None = None, *, compile: bool = True) -> dict[str, Any]:
    """The ``SamplingParams`` fields of the structured output ``body`` asks for (none: free text):
    OpenAI's ``response_format`` (json_object: any object; json_schema: its ``schema``), vLLM's
    ``structured_outputs`` (json, regex, choice, grammar, json_object) or its older ``guided_json``,
    ``guided_regex``, ``guided_choice`` and ``guided_grammar``. Checked by llguidance, and with
    ``grammars`` (the model's tokenizer's) as far as a worker's first mask; not ``compile``: the
    checks that need no grammar alone (the caller compiles it later, ``grammar_pool.shaped``).

    Raises:
        APIError(400): more than one asked for, an unknown response_format type, a missing or
        unusable schema, regex or grammar (llguidance's reason), naming the field.
        APIError(503): its compile's thread could not start (``GrammarUnavailable``).
    """
    asked = _asked(body)
    if not asked:
        return {}
    if len(asked) > 1:
        names = " and ".join(dict.fromkeys(f for f, _ in asked))
        raise APIError(400, f"at most one structured output may be asked for, got {names}", param=asked[1][0])
    field, fields = asked[0]
    params = SamplingParams(**fields)
    if (bad := params.invalid()) is not None:
        raise APIError(400, bad[1].replace(bad[0], field, 1), param=field)
    if not compile:
        return fields
    try:
        if grammars is None:
            check(params)
        else:  # tried as a worker will (the bounded child's compile): a schema of nothing but a
            grammars.check(params)  # reference to itself passes the grammar's check, fails at its first mask
    except GrammarError as e:
        status = 503 if isinstance(e, GrammarUnavailable) else 400
        raise APIError(status, said_as(str(e), field), param=field) from None
    return fields


def said_as(message: str, field: str) -> str:
    """An engine's error about a schema, named by the body's ``field`` that gave it ("guided_json
    schema cannot be used: ..."), not by the ``SamplingParams`` field the engine names it by
    (``structured.label``: "json_schema", what a NATS application sent). A regex, choice or grammar
    keeps its name, the one vLLM's structured_outputs gives it."""
    name = "json_schema"
    if not message.startswith(name) or message[len(name) : len(name) + 1] not in (" ", ":"):
        return message
    return f"{field} schema{message[len(name) :]}"


_TOKEN_ID = re.compile(r"-?[0-9]{1,19}")  # int() refuses a string of over 4,300 digits (a 500)


def _logit_bias(raw: dict[str, float] | None) -> dict[int, float]:
    """OpenAI's logit_bias, its keys (token ids written as JSON strings) as integers, each bias
    clamped to OpenAI's [-100, 100] as vLLM clamps it (its #3027, ``SamplingParams.from_optional``):
    clients ban a token with -1000 or -1e9, which vLLM serves.

    Raises:
        APIError(400): a key that is not an integer.
    """
    if bad := [k for k in raw or {} if not _TOKEN_ID.fullmatch(k)]:
        raise APIError(400, f"logit_bias keys must be token ids (integers), got {bad[0]!r}", param="logit_bias")
    return {int(k): min(100.0, max(-100.0, v)) for k, v in (raw or {}).items()}


def valid_request_id(request_id: str) -> bool:
    """Whether a client's request id (vLLM's field, or its X-Request-Id header) can name a response."""
    return 0 < len(request_id) <= 256 and request_id.isprintable()


def prompt_logprobs_wanted(body: Body) -> tuple[int | None, int | None]:
    """How many alternatives of each prompt token a body asks for (None: none): in the echo (a
    completion's echo with logprobs), and as vLLM's prompt_logprobs field (not streamed); the
    workers send the larger.

    Raises:
        APIError(400): prompt_logprobs > 0 with stream (vLLM's words).
    """
    echo = body.logprobs if isinstance(body, CompletionBody) and body.echo else None
    field = body.prompt_logprobs
    if field is not None and body.stream:
        if field > 0:
            raise APIError(400, "`prompt_logprobs` are not available when `stream=True`.", param="prompt_logprobs")
        field = None  # 0 with stream: taken and not answered, as vLLM does
    return echo, field


def sampling_params(
    body: Body,
    max_tokens: int,
    grammars: Grammars | None = None,
    defaults: Mapping[str, float] | None = None,
    compile_grammar: bool = True,
    spaces_added_tokens: bool = True,
) -> SamplingParams:
    """The engine's parameters for a request body (null fields at their defaults: the model's,
    ``defaults`` from its generation_config.json, where it has them); ``grammars``: the model's
    structured-output matchers, which try a structured output as a worker will (not
    ``compile_grammar``: left for the caller, ``structured``); ``spaces_added_tokens``: the
    workers' decode spaces added tokens apart (``detokenizer.spaces_added_tokens``).

    Raises:
        APIError(400): a value outside the spec's range, a completion's best_of other than n
            (``best_of_problem``), or a field dlora cannot honour, named.
    """
    _check_ranges(body)
    if isinstance(body, CompletionBody) and (why := best_of_problem(body.n, body.best_of)) is not None:
        raise APIError(400, why, param="best_of")
    if body.cache_salt is not None and not 0 < len(body.cache_salt) <= MAX_CACHE_SALT:  # vLLM refuses ""
        why = f"cache_salt must be a non-empty string of at most {MAX_CACHE_SALT} characters"
        raise APIError(400, why, param="cache_salt")
    if (key := getattr(body, "prompt_cache_key", None)) is not None and len(key) > MAX_CACHE_SALT:
        raise APIError(400, f"prompt_cache_key must be at most {MAX_CACHE_SALT} characters", param="prompt_cache_key")
    if (retention := getattr(body, "prompt_cache_retention", None)) not in (None, *CACHE_RETENTIONS):
        why = f"Invalid value: {retention!r}. Supported values are: 'in_memory' and '24h'."  # OpenAI's words
        raise APIError(400, why, param="prompt_cache_retention")
    if body.request_id is not None and not valid_request_id(body.request_id):
        raise APIError(400, "request_id must be 1 to 256 printable characters", param="request_id")
    for what, unsupported in _unsupported(body, spaces_added_tokens):
        if unsupported:
            raise APIError(400, f"{what} is not supported (only its default)", param=what.split()[0])
    stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    if body.allowed_token_ids == []:  # as vLLM refuses it: nothing could be sampled
        raise APIError(400, "allowed_token_ids must not be empty", param="allowed_token_ids")
    model = defaults or {}

    def given(value: float | None, name: str, default: float) -> float:
        return value if value is not None else model.get(name, default)

    params = SamplingParams(
        max_tokens=max_tokens,
        temperature=given(body.temperature, "temperature", 1.0),
        top_p=given(body.top_p, "top_p", 1.0),
        top_k=int(given(body.top_k, "top_k", 0)),
        min_p=given(body.min_p, "min_p", 0.0),
        # vLLM's (#4531): -1 asks for no seed, as llama.cpp and clients that always send one write it
        seed=None if body.seed == -1 else body.seed,
        stop=stop,
        stop_token_ids=body.stop_token_ids or [],
        ignore_eos=bool(body.ignore_eos),
        skip_special_tokens=True if body.skip_special_tokens is None else body.skip_special_tokens,
        include_stop_str_in_output=bool(body.include_stop_str_in_output),
        min_tokens=body.min_tokens or 0,
        logit_bias=_logit_bias(body.logit_bias),
        presence_penalty=body.presence_penalty or 0.0,
        frequency_penalty=body.frequency_penalty or 0.0,
        repetition_penalty=given(body.repetition_penalty, "repetition_penalty", 1.0),
        prompt_logprobs=max((k for k in prompt_logprobs_wanted(body) if k is not None), default=None),
        logprobs=body.logprobs
        if isinstance(body, CompletionBody)
        else ((body.top_logprobs or 0) if body.logprobs else None),
        **structured(body, grammars, compile=compile_grammar),
        allowed_token_ids=body.allowed_token_ids or [],
        bad_words=body.bad_words or [],
    )
    if (bad := params.invalid()) is not None:
        raise APIError(400, bad[1], param=bad[0])
    return params
