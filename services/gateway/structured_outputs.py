"""vLLM's ``structured_outputs`` request object, as the chat, completions and Responses bodies
take it (``openai``'s bodies, ``responses_api``); read into constraints by ``sampling.structured``."""

from __future__ import annotations

from typing import Any

import msgspec


class StructuredOutputs(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """vLLM's ``structured_outputs`` (its StructuredOutputsParams): one of a JSON Schema, a regular
    expression, a choice of strings, a grammar (Lark or GBNF), or any JSON object."""

    json: str | dict[str, Any] | None = None
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None
    # Options of vLLM's backends: the layout is always compact, nothing falls back, and an object
    # whose properties are named takes no others unless its schema says (as vLLM's default
    # backend, xgrammar, reads it whatever disable_additional_properties says), so these change
    # nothing here; the others change the output and are refused when set.
    disable_fallback: bool | None = None
    disable_any_whitespace: bool | None = None
    disable_additional_properties: bool | None = None
    whitespace_pattern: Any = None
    structural_tag: Any = None
