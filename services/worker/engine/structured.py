"""Structured output: a request's tokens constrained to a JSON Schema (OpenAI ``response_format``).

The grammar work is llguidance's (guidance-ai/llguidance, also a vLLM and SGLang backend): a
dependency-free wheel whose matcher gives, per step, the set of tokens that keep the output a
prefix of some document the schema accepts. This module only turns that set into a logits mask
and tells the engine when the document is complete.
"""

from __future__ import annotations

import contextlib
import json
from functools import cached_property
from typing import Any

import numpy as np
from llguidance import LLExecutor, LLMatcher, LLTokenizer
from llguidance.numpy import fill_next_token_bitmask_par

from dlora.model.token_bytes import llg_tokenizer

# OpenAI's json_object mode: any JSON object.
JSON_OBJECT_SCHEMA = json.dumps({"type": "object"})
# Documents are laid out as json.dumps lays them out, with no other whitespace: a model free to
# put whitespace anywhere may never leave it (a schema's "x-guidance" options can say otherwise).
_LAYOUT = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


def _grammar(schema: str) -> str:
    return LLMatcher.grammar_from_json_schema(schema, defaults=_LAYOUT)


class GrammarError(ValueError):
    """The schema cannot be used, or the output left it; the message says why."""


def check_schema(schema: str) -> None:
    """Raise GrammarError (with llguidance's reason) if ``schema`` (a JSON Schema as JSON text)
    cannot constrain generation. Needs no tokenizer: the gateway calls it too."""
    try:
        grammar = _grammar(schema)
    except ValueError as e:
        raise GrammarError(f"response_format schema is not a JSON object: {e}") from None
    error = LLMatcher.validate_grammar(grammar)
    if error and not error.startswith("WARNING"):
        raise GrammarError(f"response_format schema cannot be used: {error}")


class Grammars:
    """Matchers for one engine's tokenizer. The tokenizer's llguidance form is built on first use
    (about a second for a large vocabulary)."""

    def __init__(self, hf_tokenizer: Any, vocab_size: int, eos_ids: set[int]) -> None:
        self.hf_tokenizer, self.vocab_size, self.eos_ids = hf_tokenizer, vocab_size, eos_ids

    @cached_property
    def tokenizer(self) -> LLTokenizer:
        return llg_tokenizer(self.hf_tokenizer, self.vocab_size, self.eos_ids)

    def warm(self) -> None:
        """Build the tokenizer's grammar form now (off the event loop); one llguidance cannot read
        is left for the first request with a schema, which is refused saying why."""
        with contextlib.suppress(Exception):
            self.tokenizer  # noqa: B018 - built for its cache

    @cached_property
    def _executor(self) -> LLExecutor:
        return LLExecutor()  # llguidance's threads: 80 % of the host's cores, up to 32

    def bitmasks(self, matchers: list[LLMatcher]) -> tuple[np.ndarray, set[int]]:
        """The tokens each matcher allows next, as llguidance's bitmask: int32 (len(matchers),
        words), bit j of word w set when token 32 w + j is allowed (words: the tokenizer's ids over
        32, rounded up); and the rows whose grammar engine failed (all zero: nothing allowed).
        Every row at once on llguidance's threads with the GIL released, as vLLM and SGLang fill
        theirs; if that raises, row by row, so that a failure stays in its own row."""
        words = (self.tokenizer.vocab_size + 31) // 32
        out = np.zeros((len(matchers), words), dtype=np.int32)
        try:
            fill_next_token_bitmask_par(self._executor, [(m, i) for i, m in enumerate(matchers)], out)
            return out, set()
        except Exception:  # noqa: BLE001 - found again below, row by row
            out[:] = 0
        failed = set()
        for i, m in enumerate(matchers):
            try:
                row = np.frombuffer(m.compute_bitmask(), dtype=np.int32)[:words]  # one word more, some sizes
                out[i, : row.size] = row
            except Exception:  # noqa: BLE001 - its own row fails (nothing allowed), not the step
                failed.add(i)
        return out, failed

    def matcher(self, schema: str, consumed: list[int]) -> LLMatcher:
        """A matcher for ``schema`` that has already taken ``consumed`` (a resumed request's output)."""
        try:
            tokenizer = self.tokenizer
        except Exception as e:  # noqa: BLE001 - a tokenizer llguidance cannot read (a decoder it does not know)
            reason = str(e).split("\n", 1)[0]
            raise GrammarError(f"response_format is not available with this model's tokenizer: {reason}") from None
        try:
            grammar = _grammar(schema)
        except ValueError as e:
            raise GrammarError(f"response_format schema is not a JSON object: {e}") from None
        m = LLMatcher(tokenizer, grammar, log_level=0)
        if m.is_error():
            raise GrammarError(f"response_format schema cannot be used: {matcher_error(m)}")
        if consumed and not m.consume_tokens(consumed):
            raise GrammarError(f"response_format: the output so far leaves the schema: {matcher_error(m)}")
        # Some schemas fail only at the first token's mask (one that is nothing but a reference to
        # itself accepts no document, and only end-of-sequence would be allowed: an empty 200).
        m.compute_bitmask()
        if m.is_error():
            raise GrammarError(f"response_format schema cannot be used: {matcher_error(m)}")
        return m


def refusal(matcher: LLMatcher, token: int) -> str | None:
    """``token`` taken into ``matcher``; None, or why it could not be: the schema's fault (past what
    the grammar engine handles as the document grows, e.g. llguidance's item limits)."""
    if matcher.consume_token(token) and not matcher.is_error():
        return None
    return f"response_format schema cannot be used: {matcher_error(matcher)}"


def matcher_error(matcher: LLMatcher) -> str:
    """Why ``matcher`` failed: the first line of its error (llguidance appends its parser's state)."""
    return matcher.get_error().split("\n", 1)[0]
