"""A request's structured output as the grammar text llguidance compiles: a JSON Schema (served
as ``served_schema`` rewrites it), a regex, a choice of strings, or a Lark or GBNF grammar; refused,
saying why, where it cannot be served (past the sizes a compile is bounded by, or what llguidance
cannot read). Each compile runs on a thread whose stack fits its text (``on_deep_stack``)."""

from __future__ import annotations

import functools
import json
import re
import threading
from collections.abc import Callable
from typing import Any, TypeVar

from llguidance import LLMatcher, regex_to_lark

from dlora.common.sampling import SamplingParams
from dlora.services.worker.engine.gbnf import gbnf_to_lark
from dlora.services.worker.engine.schema_numbers import bound_in_grammar
from dlora.services.worker.engine.served_schema import LAYOUT, NotASchema, laid_out, served_schema


class GrammarError(ValueError):
    """The constraint cannot be used, or the output left it; the message says why."""


class GrammarUnavailable(GrammarError):
    """The constraint could not be compiled here now: the thread its compile needs (a stack that
    grows with its text, ``on_deep_stack``) did not start (the address space ``ulimit -v`` leaves,
    or the threads a process may have). Not the request's fault alone: a 503, where a GrammarError
    is a 400."""


_T = TypeVar("_T")
# llguidance compiles a grammar recursively, some kilobytes of native stack per level of its
# references: a JSON Schema's chain of 1,000 $refs (a 67 KB body) or a Lark grammar's of 3,000 rules
# overflowed a thread's 8 MB and the process died (SIGSEGV: the gateway, or the worker admitting
# it), as xgrammar's and llama.cpp's did (ai-dynamo/dynamo #7135, llama.cpp #26602). Each compile
# runs on a thread of its own whose stack grows with the grammar's text: a megabyte of the
# deepest chains found needed 256-512 MB (reserved; touched only as used). Hence a bound on the
# text too (the gateway's default body; NATS's default payload), past which a stack is no answer.
MAX_CONSTRAINT_CHARS = 1 << 20
_MIB = 1 << 20
_STACK_BASE = 16 * _MIB
_STACK_PER_BYTE = 1024
_stack_lock = threading.Lock()  # threading.stack_size is the process's, for the threads made next


def on_deep_stack(size: int, fn: Callable[..., _T], *args: Any) -> _T:
    """``fn(*args)`` on a thread whose stack fits compiling ``size`` characters of grammar; its
    result or its exception, as if called here."""
    done: list[Any] = []

    def run() -> None:
        try:
            done.append((True, fn(*args)))
        except BaseException as e:  # noqa: BLE001 - raised again in the caller
            done.append((False, e))

    stack = -(-(_STACK_BASE + _STACK_PER_BYTE * size) // _MIB) * _MIB  # (whole pages)
    with _stack_lock:
        before = threading.stack_size(stack)
        try:
            thread = threading.Thread(target=run, name="grammar-compile", daemon=True)
            thread.start()
        except RuntimeError as e:  # "can't start new thread": was a 500 at the gateway
            raise GrammarUnavailable(
                f"cannot be compiled now: the {stack // _MIB} MiB stack a compile of {size} characters needs "
                f"could not be had ({e}); try again later, or send a smaller constraint"
            ) from None
        finally:
            threading.stack_size(before)
    thread.join()
    ok, value = done[0]
    if not ok:
        raise value
    return value  # type: ignore[no-any-return]


def label(params: SamplingParams) -> str:
    """How errors name the structured output ``params`` asks for: its ``SamplingParams`` field, as
    a NATS application sent it (they read "response_format schema", a field they never sent); the
    gateway says it as its body's field (``sampling.said_as``)."""
    asked = params.structured_outputs()
    return asked[0] if asked else "grammar"


def constraint(params: SamplingParams) -> str | None:
    """The llguidance grammar of the structured output ``params`` asks for; None: free text.

    Raises:
        GrammarError: one that is not a JSON object (a schema) or a grammar llguidance reads.
    """
    return _constraint(params.json_schema, params.regex, tuple(params.choice), params.grammar)


# A regex's \d and \w (\D, \W) as ASCII classes, [0-9] and [0-9a-zA-Z_], as vLLM's default backend
# (xgrammar), outlines, llama.cpp and JSON Schema's patterns (ECMA-262) read them: llguidance's
# regexes are Rust's, Unicode's, and a "\d{3}" answered "۸९߂" (digits a JavaScript client's
# parseInt reads as NaN). \s stays Unicode's, as ECMA-262 reads it.
ASCII_CLASSES = "dw"


# Grammars kept compiled, each a fresh matcher to copy: a request's n choices, or its next requests,
# copy it (a fraction of a millisecond) instead of compiling it again (0.3-0.5 s for a 400 KB schema:
# n=32 held every other request on the worker 15 s). vLLM caches xgrammar's compiled grammars alike.
KEPT_GRAMMARS = 64
# llguidance converts GBNF to Lark in Python, passing over the whole grammar once per rule found to
# be a terminal (up to one per rule): time that grows with rules x characters (1,000 chained rules
# in 27 KB: 1 s; 3,000 in 85 KB: 12 s; 990 beside a 230 KB rule: 6 s; a megabyte's 40,000: hours of
# a core, the GIL held). About a second's worth is served: llama.cpp's grammars hold tens of rules
# in a few KB (json.gbnf: 10 x 0.6 KB); Lark is not converted and takes any.
MAX_GBNF_WORK = 30_000_000


# Conversions kept, as many as the compiled grammars: a worker's matcher(), on its event loop,
# converted each choice's structured output again (a GBNF grammar of 1,500 rules: 2 s a choice,
# though admission had compiled it in a thread).
@functools.lru_cache(maxsize=KEPT_GRAMMARS)
def _constraint(json_schema: str | None, regex: str | None, choice: tuple[str, ...], grammar: str | None) -> str | None:
    params = SamplingParams(json_schema=json_schema, regex=regex, choice=list(choice), grammar=grammar)
    size = max(len(json_schema or ""), len(regex or ""), len(grammar or ""), sum(map(len, choice)))
    if size > MAX_CONSTRAINT_CHARS:
        raise GrammarError(f"{label(params)} cannot be used: {size} characters, over the {MAX_CONSTRAINT_CHARS} served")
    bound = None
    try:
        if json_schema is not None:
            json_schema, bound = served_schema(json_schema)
        elif grammar is not None:  # (a Lark %json block's bounds and options, laid out)
            grammar, bound = laid_out(grammar) if _is_lark(grammar) else grammar, bound_in_grammar(grammar)
    except NotASchema as e:
        raise GrammarError(f"{label(params)} cannot be used: it {e}") from None
    if bound is not None:
        raise GrammarError(
            f"{label(params)} cannot be used: {bound[0]} {bound[1]} is outside the range the grammar "
            "engine holds numbers in (a 64-bit integer's, magnitude below 2**63)"
        )
    if grammar is not None and not _is_lark(grammar) and (rules := grammar.count("::=")) * len(grammar) > MAX_GBNF_WORK:
        raise GrammarError(
            f"{label(params)} cannot be used: a GBNF grammar of {rules} rules in {len(grammar)} characters is "
            f"over what is served (rules x characters at most {MAX_GBNF_WORK:,}: its conversion to Lark takes "
            "time that grows with both); write it in Lark"
        )
    try:
        if json_schema is not None:
            return on_deep_stack(len(json_schema), LLMatcher.grammar_from_json_schema, json_schema, LAYOUT)
        if regex is not None:
            return on_deep_stack(len(regex), LLMatcher.grammar_from_regex, regex_to_lark(regex, ASCII_CLASSES))
        if choice:  # one lexeme of the strings: as a rule's alternatives, at most 1,999 (its parser's bound)
            return LLMatcher.grammar_from_lark("start: CHOICE\nCHOICE: " + " | ".join(map(json.dumps, choice)))
        if grammar is not None:  # Lark (its %json blocks laid out), or GBNF converted to it
            return on_deep_stack(len(grammar), _from_grammar, grammar)
    except GrammarUnavailable as e:
        raise GrammarUnavailable(f"{label(params)} {e}") from None
    except ValueError as e:
        what = "is not a JSON object" if json_schema is not None else "cannot be read"
        if json_schema is not None:  # a JSON object all the same, past what serde_json reads
            what = next((why for start, why in _UNREAD.items() if str(e).startswith(start)), what)
        raise GrammarError(f"{label(params)} {what}: {e}") from None
    return None


# What llguidance's JSON reader (serde_json) refuses of a document Python read as a JSON object:
# said as "is not a JSON object" before.
_UNREAD = {
    "recursion limit exceeded": "nests deeper than the grammar engine reads (128 levels of JSON: 64 of properties)",
    "number out of range": "holds a number past what the grammar engine reads (a 64-bit float's range)",
}


# llguidance's own test (gbnf_to_lark.is_lark_syntax, which grammar_from calls) is
# "(?m)^\s*(%llguidance\b|start\s*:)": its \s* crosses lines, quadratic in blank lines (30,000:
# 5 s; a megabyte's: hours), in re with the GIL held, the gateway's loop and streams frozen with
# it. The same test, its whitespace kept to one line: the last line start before the keyword; and
# a start rule under Lark's "?" (inlined) or "!" (keep tokens) prefix is Lark too: vLLM's own
# example and benchmark grammar ("?start: select_statement") was read as GBNF and refused
# ("Failed to convert the grammar from GBNF to Lark: Expected name"), though llguidance reads it.
_LARK = re.compile(r"(?m)^[^\S\n]*(%llguidance\b|[?!]?start\s*:)")


def _is_lark(grammar: str) -> bool:
    """Whether ``grammar`` is Lark (else GBNF, converted), as llguidance tells them apart."""
    return _LARK.search(grammar) is not None


def _from_grammar(grammar: str) -> str:
    """``grammar_from("grammar", grammar)`` with the Lark test made linear (``_LARK``)."""
    if _is_lark(grammar):
        return LLMatcher.grammar_from_lark(grammar)
    try:
        lark = gbnf_to_lark(grammar)
    except Exception as e:  # noqa: BLE001 - as grammar_from says it
        raise ValueError(f"Failed to convert the grammar from GBNF to Lark: {e}") from None
    return LLMatcher.grammar_from_lark(lark)
