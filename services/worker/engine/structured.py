"""Structured output: a request's tokens constrained to a JSON Schema (OpenAI ``response_format``),
a regular expression, a choice of strings or a grammar (vLLM's ``structured_outputs``).

The grammar work is llguidance's (guidance-ai/llguidance, also a vLLM and SGLang backend): a
dependency-free wheel whose matcher gives, per step, the set of tokens that keep the output a
prefix of some document the schema accepts. This module only turns that set into a logits mask
and tells the engine when the document is complete; the grammar text a request's fields make, and
what is refused before any compile, is ``guidance_grammar``'s.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import functools
import json
import os
import threading
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import Future
from functools import cached_property
from typing import Any, TypeVar

import numpy as np
from llguidance import LLExecutor, LLMatcher, LLTokenizer
from llguidance.numpy import fill_next_token_bitmask_par

from dlora.common.sampling import SamplingParams
from dlora.model.token_bytes import llg_tokenizer, llg_tokenizer_args
from dlora.services.worker.engine.compile_bound import (
    CRASHED,
    KILLED,
    MEMORY,
    STARVED,
    UNCHECKED,
    UNTIMED,
    DaemonPool,
    TokenizerSpec,
    TooSlow,
    Validator,
)

# The errors, label and constraint are this module's too: its callers (the engine, the gateway,
# the tests) take them from here, beside check and Grammars.
from dlora.services.worker.engine.guidance_grammar import KEPT_GRAMMARS, on_deep_stack
from dlora.services.worker.engine.guidance_grammar import GrammarError as GrammarError
from dlora.services.worker.engine.guidance_grammar import GrammarUnavailable as GrammarUnavailable
from dlora.services.worker.engine.guidance_grammar import constraint as constraint
from dlora.services.worker.engine.guidance_grammar import label as label

# OpenAI's json_object mode: any JSON object.
JSON_OBJECT_SCHEMA = json.dumps({"type": "object"})

_T = TypeVar("_T")


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
# What a verdict that is not the grammar's fault (as far as is known: a retry may pass) tells the
# client, as GrammarUnavailable. STARVED: a compile stopped in wall time while its CPU time was short
# of the bound: the host's load, not the grammar (which a resume's first worker compiled), so a 503
# as vLLM's and SGLang's overload is, and a resume handed back; not for a host with no CPU time to
# read (``UNTIMED``: refused as too complex).
_UNAVAILABLE = {
    KILLED: "cannot be compiled now: its compiler's process was killed (the host short of memory?); try again",
    STARVED: (
        "cannot be compiled now: the server was too busy to compile it within its time bound"
        " (grammar_compilation_timeout_s); try again"
    ),
}
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
    if (why := _UNAVAILABLE.get(error)) is not None:
        raise GrammarUnavailable(f"{label(params)} {why}")
    if error and not error.startswith("WARNING"):
        raise GrammarError(f"{label(params)} cannot be used: {_reason(error)}")


class _Unkept(Exception):
    """A verdict ``_kept_verdict`` must not keep (an exception: ``lru_cache`` keeps none)."""


def _validated(grammar: str, bound_s: float, tokenizer: TokenizerSpec | None = None, memory_mb: int = 0) -> str:
    """llguidance's ``validate_grammar`` message (with ``tokenizer``: its matcher's error, first
    mask included), or why it was stopped: within ``bound_s`` seconds of CPU (a child process's;
    0: unbounded, here) and ``memory_mb`` MiB of its memory (0: no cap); ``KILLED``: the child was
    killed from outside, ``STARVED``: stopped in wall time, its CPU time short of the bound (a loaded
    host), no verdict either."""
    try:
        return _kept_verdict(grammar, bound_s, tokenizer, memory_mb)
    except _Unkept as e:
        return str(e)


@functools.lru_cache(maxsize=32)  # (a 400 KB schema each, at most: the gateway's memory)
def _kept_verdict(grammar: str, bound_s: float, tokenizer: TokenizerSpec | None, memory_mb: int) -> str:
    """``_validated``'s verdict, kept, a refusal at the CPU bound or the memory cap too: sent again,
    a schema that ran to either would take a core as long, or the memory, again. Not one met in
    wall time (``STARVED``, ``UNTIMED``): kept, a schema that compiles in a second was refused for
    good after a load spike starved its child; nor a child killed from outside (``KILLED``: the OOM
    killer's choice on a host short of memory, which says nothing of the grammar)."""
    if bound_s > 0:
        verdict = _validator.validate(grammar, bound_s, tokenizer, memory_mb)
        if verdict == STARVED:
            raise _Unkept(STARVED)
        if verdict in (None, UNTIMED):
            refusal = f"{_TOO_SLOW} {bound_s:g} s (the server's grammar_compilation_timeout_s): simplify it"
            if verdict == UNTIMED:
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
    return on_deep_stack(len(grammar), LLMatcher.validate_grammar, grammar)


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

    def prepare(self, params: SamplingParams) -> GrammarUnavailable | None:
        """Compile the grammar ``params`` asks for now (in a thread: seconds for a large schema),
        for ``matcher`` to copy. One that cannot be had here now is returned, as ``matcher`` would
        raise it (``GrammarUnavailable``), for the caller to answer without ``matcher``: it is not
        kept, and ``matcher``, on the engine's loop, compiled it again (a compiler killed for
        memory held every stream there for as long, once a worker a resume was handed to). Any
        other failure is left for ``matcher`` to refuse, saying why."""
        try:
            self._usable(params)  # (``matcher``'s own compile, labelled as it raises it)
        except GrammarUnavailable as e:
            return e
        except Exception:  # noqa: BLE001 - left for ``matcher``, which finds it where it was kept
            pass
        return None

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
            if (why := _UNAVAILABLE.get(error)) is not None:
                raise GrammarUnavailable(why)
            if error.startswith((_TOO_SLOW, _TOO_LARGE)) or error == CRASHED:  # (crashes this process too)
                raise TooSlow(error)  # (what passed takes as long here, the tokenizer's part aside)
            m: LLMatcher | str = error
            if compiled or error == UNCHECKED:
                m = on_deep_stack(len(grammar), self._compile, grammar)
        except BaseException as e:  # (raised to the waiters too: a thread that could not start)
            with self._lock:
                del self._compiling[grammar]
            pending.set_exception(e)
            raise
        with self._lock:
            del self._compiling[grammar]
            self._compiled[grammar] = m
            while len(self._compiled) > KEPT_GRAMMARS:
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
