"""Structured output: a request's tokens constrained to a JSON Schema (OpenAI ``response_format``),
a regular expression, a choice of strings or a grammar (vLLM's ``structured_outputs``).

The grammar work is llguidance's (guidance-ai/llguidance, also a vLLM and SGLang backend): a
dependency-free wheel whose matcher gives, per step, the set of tokens that keep the output a
prefix of some document the schema accepts. This module only turns that set into a logits mask
and tells the engine when the document is complete.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import functools
import json
import os
import re
import threading
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import Future
from functools import cached_property
from typing import Any, TypeVar

import numpy as np
from llguidance import LLExecutor, LLMatcher, LLTokenizer, regex_to_lark
from llguidance.numpy import fill_next_token_bitmask_par

from dlora.common.sampling import SamplingParams
from dlora.model.token_bytes import llg_tokenizer, llg_tokenizer_args
from dlora.services.worker.engine.compile_bound import (
    CRASHED,
    KILLED,
    MEMORY,
    STARVED,
    UNCHECKED,
    DaemonPool,
    TokenizerSpec,
    TooSlow,
    Validator,
)
from dlora.services.worker.engine.gbnf import gbnf_to_lark
from dlora.services.worker.engine.schema_numbers import bound_in_grammar
from dlora.services.worker.engine.served_schema import LAYOUT, NotASchema, laid_out, served_schema

# OpenAI's json_object mode: any JSON object.
JSON_OBJECT_SCHEMA = json.dumps({"type": "object"})


class GrammarError(ValueError):
    """The constraint cannot be used, or the output left it; the message says why."""


class GrammarUnavailable(GrammarError):
    """The constraint could not be compiled here now: the thread its compile needs (a stack that
    grows with its text, ``_deep``) did not start (the address space ``ulimit -v`` leaves, or the
    threads a process may have). Not the request's fault alone: a 503, where a GrammarError is a 400."""


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


def _deep(size: int, fn: Callable[..., _T], *args: Any) -> _T:
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
_KEPT_GRAMMARS = 64
# llguidance converts GBNF to Lark in Python, passing over the whole grammar once per rule found to
# be a terminal (up to one per rule): time that grows with rules x characters (1,000 chained rules
# in 27 KB: 1 s; 3,000 in 85 KB: 12 s; 990 beside a 230 KB rule: 6 s; a megabyte's 40,000: hours of
# a core, the GIL held). About a second's worth is served: llama.cpp's grammars hold tens of rules
# in a few KB (json.gbnf: 10 x 0.6 KB); Lark is not converted and takes any.
MAX_GBNF_WORK = 30_000_000


# Conversions kept, as many as the compiled grammars: a worker's matcher(), on its event loop,
# converted each choice's structured output again (a GBNF grammar of 1,500 rules: 2 s a choice,
# though admission had compiled it in a thread).
@functools.lru_cache(maxsize=_KEPT_GRAMMARS)
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
            return _deep(len(json_schema), LLMatcher.grammar_from_json_schema, json_schema, LAYOUT)
        if regex is not None:
            return _deep(len(regex), LLMatcher.grammar_from_regex, regex_to_lark(regex, ASCII_CLASSES))
        if choice:  # one lexeme of the strings: as a rule's alternatives, at most 1,999 (its parser's bound)
            return LLMatcher.grammar_from_lark("start: CHOICE\nCHOICE: " + " | ".join(map(json.dumps, choice)))
        if grammar is not None:  # Lark (its %json blocks laid out), or GBNF converted to it
            return _deep(len(grammar), _from_grammar, grammar)
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


# CPU seconds a grammar's compile may take before it is refused as too complex (0: no bound), as
# vLLM's VLLM_GRAMMAR_COMPILATION_TIMEOUT_S (10 s; its regexes' bound is 5 s). A 400 KB schema takes
# 0.3-0.5 s; 400 patternProperties 12 s, 1,000 hours. ``compile_bound`` says how it is held to it.
GRAMMAR_COMPILATION_TIMEOUT_S = 10.0
# MiB of memory the compile's child process may hold, its tokenizer included (0: no cap), with the
# time bound: a schema whose compile takes all the memory it can reach ends there, not at the host's
# OOM killer (vLLM #7332's kind). A 350 KB schema of 5,000 properties compiled within 128 MiB (a
# 512-token vocabulary; a 60,000-token tokenizer itself holds ~70 MB).
GRAMMAR_COMPILATION_MEMORY_MB = 4096
_TOO_SLOW = "too complex to compile within"
_TOO_LARGE = "too large to compile within"
_KILLED = "cannot be compiled now: its compiler's process was killed (the host short of memory?); try again"
_validator = Validator()


def check(params: SamplingParams) -> None:
    """Raise GrammarError (with llguidance's reason) if the structured output ``params`` asks for
    cannot constrain generation. Needs no tokenizer: the gateway calls it too (once a grammar: a
    request of 16 prompts checked its 400 KB schema 16 times)."""
    if (grammar := constraint(params)) is None:
        return
    try:
        error = _validated(grammar, GRAMMAR_COMPILATION_TIMEOUT_S, None, GRAMMAR_COMPILATION_MEMORY_MB)
    except GrammarUnavailable as e:
        raise GrammarUnavailable(f"{label(params)} {e}") from None
    if error == KILLED:
        raise GrammarUnavailable(f"{label(params)} {_KILLED}")
    if error and not error.startswith("WARNING"):
        raise GrammarError(f"{label(params)} cannot be used: {_reason(error)}")


class _Unkept(Exception):
    """A verdict ``_kept_verdict`` must not keep (an exception: ``lru_cache`` keeps none)."""


def _validated(grammar: str, bound_s: float, tokenizer: TokenizerSpec | None = None, memory_mb: int = 0) -> str:
    """llguidance's ``validate_grammar`` message (with ``tokenizer``: its matcher's error, first
    mask included), or why it was stopped: within ``bound_s`` seconds of CPU (a child process's;
    0: unbounded, here) and ``memory_mb`` MiB of its memory (0: no cap); ``KILLED``: the child was
    killed from outside, no verdict."""
    try:
        return _kept_verdict(grammar, bound_s, tokenizer, memory_mb)
    except _Unkept as e:
        return str(e)


@functools.lru_cache(maxsize=32)  # (a 400 KB schema each, at most: the gateway's memory)
def _kept_verdict(grammar: str, bound_s: float, tokenizer: TokenizerSpec | None, memory_mb: int) -> str:
    """``_validated``'s verdict, kept, a refusal at the CPU bound or the memory cap too: sent again,
    a schema that ran to either would take a core as long, or the memory, again. Not one met in
    wall time (``STARVED``): kept, a schema that compiles in a second was refused for good after a
    load spike starved its child; nor a child killed from outside (``KILLED``: the OOM killer's
    choice on a host short of memory, which says nothing of the grammar)."""
    if bound_s > 0:
        verdict = _validator.validate(grammar, bound_s, tokenizer, memory_mb)
        if verdict in (None, STARVED):
            refusal = f"{_TOO_SLOW} {bound_s:g} s (the server's grammar_compilation_timeout_s): simplify it"
            if verdict == STARVED:
                raise _Unkept(refusal)
            return refusal
        if verdict == MEMORY and memory_mb:
            return f"{_TOO_LARGE} {memory_mb} MiB of memory (the server's grammar_compilation_memory_mb): simplify it"
        if verdict in (KILLED, MEMORY):  # (MEMORY with no cap: the host's memory short, not the grammar)
            raise _Unkept(KILLED)
        if verdict != UNCHECKED:
            return verdict
        if tokenizer is not None:  # (its caller compiles it in-process, and finds why there)
            raise _Unkept(UNCHECKED)
    if tokenizer is not None:
        return UNCHECKED
    return _deep(len(grammar), LLMatcher.validate_grammar, grammar)


# Compiles at once, as vLLM's StructuredOutputManager sizes its pool: half the cores, at most 8.
COMPILE_THREADS = max(1, min((os.cpu_count() or 2) // 2, 8))


class Grammars:
    """Matchers for one engine's tokenizer. The tokenizer's llguidance form is built on first use
    (about a second for a large vocabulary); grammars are compiled once, ``prepare`` off the
    event loop."""

    def __init__(
        self,
        hf_tokenizer: Any,
        vocab_size: int,
        eos_ids: set[int],
        compile_threads: int = COMPILE_THREADS,
        compile_timeout_s: float | None = None,
        compile_memory_mb: int | None = None,
    ) -> None:
        self.hf_tokenizer, self.vocab_size, self.eos_ids = hf_tokenizer, vocab_size, eos_ids
        self._threads = compile_threads
        # CPU seconds a compile may take (None: GRAMMAR_COMPILATION_TIMEOUT_S); a service sets its
        # setting's (grammar_compilation_timeout_s)
        self.compile_timeout_s = compile_timeout_s
        # MiB its compile's child may hold (None: GRAMMAR_COMPILATION_MEMORY_MB; grammar_compilation_memory_mb)
        self.compile_memory_mb = compile_memory_mb
        self._pool: DaemonPool | None = None  # ``off_loop``'s, made on first use
        # grammar -> a fresh matcher, or (``check``'s) the child's verdict: llguidance's error, "" none
        self._compiled: OrderedDict[str, LLMatcher | str] = OrderedDict()
        self._lock = threading.Lock()  # prepare runs in a thread, matcher on the event loop
        # Compiles under way, for callers asking for the same grammar meanwhile to wait on: the
        # gateway's pool compiled a burst's one schema on all 4 of its threads, each as long as one.
        self._compiling: dict[str, Future[LLMatcher]] = {}

    async def off_loop(self, fn: Callable[..., _T], *args: Any) -> _T:
        """``fn(*args)`` (a compile: ``prepare``, or what calls it) on this model's compile threads,
        never asyncio's default pool: the engine's steps take those (``asyncio.to_thread``), and a
        few slow schemas compiling there at once held every step until one ended. Daemon threads:
        an exit waits for no compile."""
        if self._pool is None:
            self._pool = DaemonPool(self._threads, "grammar")
        in_context = functools.partial(contextvars.copy_context().run, fn, *args)  # (the log's, as to_thread)
        return await asyncio.get_running_loop().run_in_executor(self._pool, in_context)

    def prepare(self, params: SamplingParams) -> None:
        """Compile the grammar ``params`` asks for now (in a thread: seconds for a large schema),
        for ``matcher`` to copy. One that fails is left for ``matcher`` to refuse, saying why."""
        with contextlib.suppress(Exception):
            if (grammar := constraint(params)) is not None:
                self._fresh(grammar)

    def _fresh(self, grammar: str, compiled: bool = True) -> LLMatcher | str:
        """A fresh matcher of ``grammar``, compiled once, one in error too (the compile is the
        same each time: a failing one, compiled again by ``matcher`` on the engine's loop for
        each request and choice, held every stream there as long each time). Its first mask is
        computed: some schemas fail only there (one that is nothing but a reference to itself
        accepts no document, and only end-of-sequence would be allowed: an empty 200). Not
        ``compiled``: the bounded child's verdict where it gave one (llguidance's error, "" none),
        no matcher made here (the gateway's check compiled each new grammar twice)."""
        with self._lock:
            if (kept := self._compiled.get(grammar)) is not None and not (compiled and isinstance(kept, str)):
                self._compiled.move_to_end(grammar)
                return kept
            if (pending := self._compiling.get(grammar)) is not None:
                mine = False
            else:
                mine, pending = True, Future()
                self._compiling[grammar] = pending
        if not mine:
            got = pending.result()
            return self._fresh(grammar) if compiled and isinstance(got, str) else got
        try:
            error = self._verdict(grammar)
            if error == KILLED:  # (not the grammar's fault, as far as is known: a retry may pass)
                raise GrammarUnavailable(_KILLED)
            if error.startswith((_TOO_SLOW, _TOO_LARGE)) or error == CRASHED:  # (crashes this process too)
                raise TooSlow(error)  # (what passed takes as long here, the tokenizer's part aside)
            m: LLMatcher | str = error
            if compiled or error == UNCHECKED:
                m = _deep(len(grammar), self._compile, grammar)
        except BaseException as e:  # (raised to the waiters too: a thread that could not start)
            with self._lock:
                del self._compiling[grammar]
            pending.set_exception(e)
            raise
        with self._lock:
            del self._compiling[grammar]
            self._compiled[grammar] = m
            while len(self._compiled) > _KEPT_GRAMMARS:
                self._compiled.popitem(last=False)
        pending.set_result(m)
        return m

    def _verdict(self, grammar: str) -> str:
        """The bounded child's verdict on ``grammar`` (``_validated``) under this model's bounds."""
        bound = GRAMMAR_COMPILATION_TIMEOUT_S if self.compile_timeout_s is None else self.compile_timeout_s
        mb = GRAMMAR_COMPILATION_MEMORY_MB if self.compile_memory_mb is None else self.compile_memory_mb
        return _validated(grammar, bound, self.tokenizer_spec, mb)

    def _compile(self, grammar: str) -> LLMatcher:
        m = LLMatcher(self.tokenizer, grammar, log_level=0)
        if not m.is_error():
            m.compute_bitmask()
        return m

    @cached_property
    def tokenizer(self) -> LLTokenizer:
        return llg_tokenizer(self.hf_tokenizer, self.vocab_size, self.eos_ids)

    @cached_property
    def tokenizer_spec(self) -> TokenizerSpec:
        """The tokenizer as a compile's child process builds it (``compile_bound``)."""
        return TokenizerSpec(*llg_tokenizer_args(self.hf_tokenizer, self.vocab_size, self.eos_ids))

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

    def check(self, params: SamplingParams) -> None:
        """Raise GrammarError where ``matcher`` would (the gateway's check): the bounded child's
        verdict taken, tokenizer and first mask and all, no matcher compiled here."""
        self._usable(params, compiled=False)

    def matcher(self, params: SamplingParams, consumed: list[int]) -> LLMatcher | None:
        """A matcher for the structured output ``params`` asks for (None: none) that has already
        taken ``consumed`` (a resumed request's output). Raises GrammarError, saying why."""
        if (fresh := self._usable(params)) is None:
            return None
        assert not isinstance(fresh, str)  # (compiled: a matcher)
        m = fresh.deep_copy()
        if consumed and not m.consume_tokens(consumed):
            raise GrammarError(f"{label(params)}: the output so far leaves it: {matcher_error(m)}")
        return m

    def _usable(self, params: SamplingParams, compiled: bool = True) -> LLMatcher | str | None:
        """``_fresh``'s matcher (or verdict) of the constraint of ``params`` (None: none), if usable;
        raises GrammarError, saying why not."""
        if (grammar := constraint(params)) is None:
            return None
        what = label(params)
        try:
            self.tokenizer  # noqa: B018 - built here, to say why where it cannot be
        except Exception as e:  # noqa: BLE001 - a tokenizer llguidance cannot read (a decoder it does not know)
            reason = str(e).split("\n", 1)[0]
            raise GrammarError(f"{what} is not available with this model's tokenizer: {reason}") from None
        try:
            fresh = self._fresh(grammar, compiled)
        except GrammarUnavailable as e:
            raise GrammarUnavailable(f"{what} {e}") from None
        except TooSlow as e:
            raise GrammarError(f"{what} cannot be used: {e}") from None
        if isinstance(fresh, str) and fresh:
            raise GrammarError(f"{what} cannot be used: {_reason(fresh)}")
        if not isinstance(fresh, str) and fresh.is_error():
            raise GrammarError(f"{what} cannot be used: {matcher_error(fresh)}")
        return fresh


def refusal(matcher: LLMatcher, token: int, what: str = "json_schema") -> str | None:
    """``token`` taken into ``matcher``; None, or why it could not be: the constraint's fault (past
    what the grammar engine handles as the output grows, e.g. llguidance's item limits). ``what``:
    the constraint's name (``label``)."""
    if matcher.consume_token(token) and not matcher.is_error():
        return None
    return f"{what} cannot be used: {matcher_error(matcher)}"


def matcher_error(matcher: LLMatcher) -> str:
    """Why ``matcher`` failed (``_reason``)."""
    return _reason(matcher.get_error())


def _reason(error: str) -> str:
    """llguidance's error in a line: its first (it appends its parser's state), and the regex
    parser's own reason where that comes below ("regex parse error:" alone said nothing)."""
    first, *rest = error.split("\n")
    below = next((line.strip()[len("error: ") :] for line in rest if line.strip().startswith("error: ")), "")
    return f"{first} {below}".strip()
