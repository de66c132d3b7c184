"""Grammar compiles that can be abandoned: a time bound on llguidance's work, and threads that no
exit waits for.

llguidance's own limits (``LLParserLimits``: lexer fuel, grammar size, lexer states) count its
lexer's work, not its JSON Schema compiler's: 250 ``patternProperties`` took 2 s with a tenth of the
default fuel, 400 took 12 s, 1,000 take hours (vLLM #54003), a compile thread and a core held all
along. A native call on a thread cannot be stopped, so the grammar is validated first (the same
compile, tokenizer and first mask included) in a child process that is killed past the bound, its
memory capped (RLIMIT_DATA); what passed a worker compiles again in-process, where the matcher
must live (llguidance's compiled grammar does not cross a process), and the gateway, which needs
no matcher, takes the verdict. Only the child's reply crosses: llguidance's message, a few bytes.

The child is this file run as a script (``python -P compile_bound.py``): it imports llguidance and
the standard library alone (about 60 ms to start), and exits once its parent's end of the pipe
closes, whatever it is doing (the parent's exit, however it exits, ends it).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import select
import signal
import struct
import subprocess
import sys
import tempfile
import threading
import time
import weakref
from collections.abc import Callable
from concurrent.futures import Executor, Future
from queue import SimpleQueue
from typing import IO, Any

_HEADER = struct.Struct("<Q")
# The signals a stop sends every process of a unit or a terminal's group: the child ignores them.
_STOPS = {signal.SIGINT, signal.SIGTERM}
# A child is found starved, not slow, past this many times the bound in wall time (a host so loaded
# that the child has a fifth of a core): ``STARVED``, a 503 to retry (a resume handed back), not the
# too-complex 400 (``structured``).
_WALL_PER_CPU = 5.0
_TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
# Children kept for the next grammars; the others end after theirs. Each holds the engine's
# tokenizer (70 MB for 60,000 tokens; built again in ~0.2-1 s by the next one started).
KEPT_IDLE = 2


class TooSlow(Exception):
    """The grammar's compile was stopped at the bound or the memory cap, or killed its process
    (``CRASHED``); the message says so (after a field's name)."""


# What ``Validator.validate`` answers for a grammar its child died on: llguidance crashed on it, and
# would crash the server's own process as well (never compiled there).
CRASHED = "the grammar engine failed on it (its compiler's process died)"


# What it answers for a grammar whose compile needed more memory than the child was given (its
# data, the tokenizer included: RLIMIT_DATA), said by the child or read from its death (Rust's
# allocator aborts, writing "memory allocation of N bytes failed"): refused, as the time bound is.
MEMORY = "\0memory"
# What it answers when the child was killed from outside (SIGKILL, not ours: the OOM killer, an
# operator) on this grammar and on the next child too: no verdict on the grammar, not to be kept.
KILLED = "\0killed"
# Seconds of wall time a child may take to build a tokenizer (the engine built it in ~0.2-1 s): past
# them it is killed and the grammar refused for now (``STARVED``), never left waiting for good.
TOKENIZER_S = 60.0


# What ``Validator.validate`` answers when the child could not say: llguidance raised rather than
# answered (quick to find again in-process, where the caller sees the exception itself), or no child
# could start (fork's EAGAIN or ENOMEM: compiled in-process, unbounded, rather than refused).
UNCHECKED = "\0unchecked"
# What it answers when the bound was met in wall time while the child's CPU time, read, was short
# of it (a child starved by a loaded host), or the child took no grammar or tokenizer in time: no
# verdict on the grammar, which may compile in time once the load is gone (a 503, not kept).
STARVED = "\0starved"
# What it answers when the bound was met in wall time on a host with no CPU time to read (no /proc):
# a grammar too complex and a starved child cannot be told apart there. Refused as too complex (a
# 400), though not for good: a 503 each time let a client retry a grammar that never compiles for
# ever, each retry a core for the bound.
UNTIMED = "\0untimed"


def _cpu_s(pid: int) -> float | None:
    """The CPU seconds process ``pid`` has used, all its threads (None: not on Linux, or gone)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / _TICK  # utime, stime (the 14th and 15th fields)


class TokenizerSpec:
    """A tokenizer as the child builds it (``token_bytes.llg_tokenizer_args``), to compile as the
    engine does: the matcher's construction took up to 4 times validate_grammar's CPU (5,000
    properties: 2.4 s against 0.6 s) and a first mask can fail where validation passed."""

    def __init__(self, text: str, n_vocab: int, eos: list[int]) -> None:
        self.text, self.n_vocab, self.eos = text, n_vocab, eos
        self.key = hashlib.sha256(f"{n_vocab} {eos} {text}".encode("utf-8", "surrogatepass")).hexdigest()


class _Child:
    """One child process, checking one grammar at a time."""

    def __init__(self) -> None:
        self.tokenizers: set[str] = set()  # keys of the TokenizerSpecs it has built
        # Its stderr, read once it died (how: an allocation refused); a file, never a pipe it could fill
        self.stderr = tempfile.TemporaryFile()
        # A stop's signal (systemd's SIGTERM to the unit, a terminal's Ctrl-C to its group) that came
        # while the child started, before ``_serve`` ignores it, killed it, or (SIGINT during
        # Python's site import) ended it with code 1, read as llguidance crashing on the grammar:
        # held back from its start (a blocked signal stays so across fork and exec, and this
        # thread's mask is its own) until it is ignored there, then dropped.
        held = signal.pthread_sigmask(signal.SIG_BLOCK, _STOPS)
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-P", __file__],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=self.stderr,
                close_fds=True,
            )
        except BaseException:
            self.stderr.close()
            raise
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, held)

    def _send(self, op: bytes, what: dict[str, Any], within_s: float | None = None) -> bool:
        """``what`` sent; False if it was not taken within ``within_s`` seconds (None: no bound)."""
        stdin = self.proc.stdin
        assert stdin is not None
        body = op + json.dumps(what).encode()  # (ASCII: lone surrogates escaped)
        if within_s is None:
            stdin.write(_HEADER.pack(len(body)) + body)
            stdin.flush()
            return True
        # a tokenizer (megabytes) is written a pipe's free room at a time: a child that reads
        # nothing (stopped, starved) held a blocking write, and this compile's thread, for good
        deadline, left = time.monotonic() + within_s, memoryview(_HEADER.pack(len(body)) + body)
        while left:
            wait = deadline - time.monotonic()
            if wait <= 0 or not select.select([], [stdin], [], wait)[1]:
                return False
            left = left[os.write(stdin.fileno(), left[: select.PIPE_BUF]) :]  # (fits: never blocks)
        return True

    def ask(self, grammar: str, bound_s: float, tokenizer: TokenizerSpec | None, memory_mb: int = 0) -> str | None:
        """Why ``grammar`` cannot be used (empty: it can; ``UNCHECKED``; ``MEMORY``: past
        ``memory_mb`` MiB of the child's data, 0: no cap): compiled with ``tokenizer`` as the
        engine does, first mask included, or without one llguidance's ``validate_grammar``; None
        past ``bound_s`` seconds of the child's CPU, ``STARVED`` past ``_WALL_PER_CPU`` times
        them in wall time (its CPU time short of them) or a tokenizer's build past ``TOKENIZER_S``,
        ``UNTIMED`` past them in wall time with no CPU time to read. Raises OSError (EOFError)
        when the child is gone."""
        stdout = self.proc.stdout
        assert stdout is not None
        if tokenizer is not None and tokenizer.key not in self.tokenizers:  # once a child
            spec = {"key": tokenizer.key, "text": tokenizer.text, "n": tokenizer.n_vocab, "eos": tokenizer.eos}
            deadline = time.monotonic() + TOKENIZER_S
            if (
                not self._send(b"T", spec, TOKENIZER_S)
                or not select.select([stdout], [], [], max(0.0, deadline - time.monotonic()))[0]
            ):
                return STARVED  # (a hung build held this compile's thread, and its waiters, for good)
            if _read(stdout):  # it could not build it (the engine did): compiled in-process, unbounded
                return UNCHECKED
            self.tokenizers.add(tokenizer.key)
        start, used_before = time.monotonic(), _cpu_s(self.proc.pid)
        # bounded as the tokenizer is: a constraint past a pipe's room (64 KiB) to a child that
        # reads nothing held this compile's thread for good, the bound not yet started
        what = {"grammar": grammar, "key": tokenizer and tokenizer.key, "mem": memory_mb}
        if not self._send(b"G", what, bound_s * _WALL_PER_CPU):
            return STARVED
        while True:
            used = _cpu_s(self.proc.pid)
            spent = time.monotonic() - start
            cpu = spent if used is None or used_before is None else used - used_before
            # CPU time, not wall time: 4 slow compiles at once on 2 cores each take twice as long
            left = min(bound_s - cpu, bound_s * _WALL_PER_CPU - spent)
            if left <= 0:
                if used is None or used_before is None:
                    return UNTIMED
                return None if cpu >= bound_s else STARVED
            if select.select([stdout], [], [], left)[0]:
                return _read(stdout).decode("utf-8", "surrogatepass")

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait()
        for pipe in (self.proc.stdin, self.proc.stdout):  # (left open: a ResourceWarning each)
            if pipe is not None:  # (a close flushes what a dead child's pipe refused: it raises again)
                with contextlib.suppress(OSError):
                    pipe.close()
        self.stderr.close()

    def death(self) -> str:
        """Why the child, found gone (its pipe ended), died: ``MEMORY`` (an allocation refused at its
        cap), ``KILLED`` (SIGKILL from outside: not ours, it was not yet killed; or a stop's SIGTERM
        or SIGINT, were it not held back while the child starts) or ``CRASHED``."""
        try:
            code = self.proc.wait(5)  # (its pipe closes as it exits: at most a moment before)
        except subprocess.TimeoutExpired:
            code = None  # alive with its stdout closed: nothing llguidance does; a crash all the same
        said = b""
        with contextlib.suppress(OSError):
            self.stderr.seek(max(0, self.stderr.seek(0, os.SEEK_END) - 4096))
            said = self.stderr.read()
        self.kill()
        if code in (-signal.SIGKILL, -signal.SIGTERM, -signal.SIGINT):
            return KILLED
        if code == -signal.SIGABRT and b"memory allocation of" in said:
            return MEMORY
        return CRASHED


def _read(stream: IO[bytes]) -> bytes:
    """A frame from ``stream``; EOFError if it ends first (a child that died, or a parent)."""
    header = stream.read(_HEADER.size)
    if len(header) < _HEADER.size:
        raise EOFError("the grammar compiler's process ended")
    (size,) = _HEADER.unpack(header)
    body = stream.read(size)
    if len(body) < size:
        raise EOFError("the grammar compiler's process ended")
    return body


class Validator:
    """Children validating grammars, one per caller at a time, kept for the next (idle)."""

    def __init__(self) -> None:
        self._idle: list[_Child] = []
        self._lock = threading.Lock()

    def validate(
        self, grammar: str, bound_s: float, tokenizer: TokenizerSpec | None = None, memory_mb: int = 0
    ) -> str | None:
        """Why ``grammar`` cannot be used (``_Child.ask``: empty, it can; ``UNCHECKED``: not said;
        ``MEMORY``: past ``memory_mb``), found within ``bound_s`` seconds of CPU, or None when it
        ran past them and was stopped (``STARVED``: stopped in wall time, its CPU time short of
        the bound, a loaded host's; ``UNTIMED``: at the bound in wall time, no CPU time to read).
        A child that dies on the grammar (llguidance crashed on it)
        says so as a message (``CRASHED``); one killed from outside is replaced once, then
        ``KILLED``."""
        killed = False
        while True:
            with self._lock:
                kept = self._idle.pop() if self._idle else None
            try:
                child = kept or _Child()
            except OSError as e:
                from dlora.common import log  # (here: the child, this file, imports llguidance alone)

                log.get("grammar").warning("a grammar compiled without its time bound: no process for it", error=str(e))
                return UNCHECKED
            try:
                verdict = child.ask(grammar, bound_s, tokenizer, memory_mb)
            except (OSError, EOFError):
                death = child.death()
                if kept is not None:
                    continue  # it may have died idle (the OOM killer): this grammar, on a new one
                if death == KILLED and not killed:  # (the host's OOM killer takes the largest process:
                    killed = True  # not this grammar's doing unless it is killed again)
                    continue
                return death
            if verdict is None or verdict in (STARVED, UNTIMED, MEMORY):  # (one short of memory: a new one next)
                child.kill()
                return verdict
            with self._lock:
                kept = child if len(self._idle) < KEPT_IDLE else None
                if kept is not None:
                    self._idle.append(child)
            if kept is None:
                child.kill()
            return verdict


class DaemonPool(Executor):
    """At most ``threads`` calls at once, on daemon threads started as needed: an exit waits for none
    of them (ThreadPoolExecutor's threads are joined at exit: a compile of hours held the process's
    exit). Its threads end once it is collected, as ThreadPoolExecutor's do."""

    def __init__(self, threads: int, name: str) -> None:
        self._work: SimpleQueue[tuple[Future[Any], Callable[[], Any]] | None] = SimpleQueue()
        self._idle = threading.Semaphore(0)  # released by each thread done with a call
        self._max, self._started, self._name = threads, 0, name
        self._lock = threading.Lock()
        weakref.finalize(self, _stop, self._work, threads)  # (the threads hold the queue, not the pool)

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future[Any]:
        future: Future[Any] = Future()
        self._work.put((future, lambda: fn(*args, **kwargs)))
        if not self._idle.acquire(timeout=0):
            with self._lock:
                if self._started < self._max:
                    self._started += 1
                    name = f"{self._name}_{self._started}"
                    threading.Thread(target=_serve_calls, args=(self._work, self._idle), name=name, daemon=True).start()
        return future

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        _stop(self._work, self._max)


def _stop(work: SimpleQueue[Any], threads: int) -> None:
    for _ in range(threads):
        work.put(None)


def _serve_calls(work: SimpleQueue[tuple[Future[Any], Callable[[], Any]] | None], idle: threading.Semaphore) -> None:
    while (item := work.get()) is not None:
        future, call = item
        if future.set_running_or_notify_cancel():
            try:
                future.set_result(call())
            except BaseException as e:  # noqa: BLE001 - the caller's to see
                future.set_exception(e)
        del item, future, call  # (nothing of a call kept alive while idle)
        idle.release()


def _serve() -> None:  # the child: one request at a time from stdin, its answer to stdout
    import resource

    from llguidance import LLMatcher, LLTokenizer

    # A stop's signal is its parent's to act on: systemd's SIGTERM reaches every process of the unit,
    # a terminal's Ctrl-C every one of its group, and the child's death at it read as llguidance
    # crashing on the grammar it checked (refused for good, in a drain's requests). It ends with
    # its parent's pipe; SIGKILL (TimeoutStopSec's too) still ends it.
    for sig in _STOPS:
        signal.signal(sig, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, _STOPS)  # (held back since its start: see _Child)
    stdin, stdout = sys.stdin.buffer, sys.stdout.buffer
    tokenizers: dict[str, LLTokenizer] = {}
    data_soft, data_hard = resource.getrlimit(resource.RLIMIT_DATA)  # (the host's own, as inherited)
    compiling: threading.Thread | None = None  # the last grammar's thread

    def reply(message: str) -> None:
        body = message.encode("utf-8", "surrogatepass")
        stdout.write(_HEADER.pack(len(body)) + body)
        stdout.flush()

    def check(grammar: str, key: str | None) -> str:  # (the child's own memory: MemoryError)
        if key is None:
            return LLMatcher.validate_grammar(grammar)
        m = LLMatcher(tokenizers[key], grammar, log_level=0)  # as Grammars._compile
        if not m.is_error():
            m.compute_bitmask()
        return m.get_error() if m.is_error() else ""

    def run(go: threading.Event, grammar: str, key: str | None) -> None:
        go.wait()  # (started before the cap: see below)
        try:
            answer = check(grammar, key)
        except MemoryError:  # (compiled again in-process, it would take the server's memory instead)
            answer = MEMORY
        except Exception:  # noqa: BLE001 - the parent finds it again, in-process
            answer = UNCHECKED
        finally:  # the next request is read, and its thread started, without it
            resource.setrlimit(resource.RLIMIT_DATA, (data_soft, data_hard))
        reply(answer)

    while True:
        try:
            body = _read(stdin)
        except EOFError:  # the parent is gone (or done with this child): whatever runs, ends
            os._exit(0)
        what = json.loads(body[1:])
        if body[:1] == b"T":  # (a tokenizer is not capped)
            try:
                tokenizers[what["key"]] = LLTokenizer(what["text"], n_vocab=what["n"], eos_token=what["eos"] or None)
                reply("")
            except Exception:  # noqa: BLE001 - as the engine, which read it, reads it then
                reply(UNCHECKED)
            continue
        # as guidance_grammar.on_deep_stack: llguidance compiles recursively, its stack growing with the text
        threading.stack_size(-(-(16 * (1 << 20) + 1024 * len(what["grammar"])) // (1 << 20)) * (1 << 20))
        if compiling is not None:  # (it replied, and ends: its stack goes as the next is made)
            compiling.join()
        go = threading.Event()
        try:
            thread = threading.Thread(target=run, args=(go, what["grammar"], what["key"]), daemon=True)
            thread.start()  # uncapped: see below
        except (RuntimeError, MemoryError):  # past the host's own limits (ulimit -v, its memory): left
            reply(UNCHECKED)  # to the in-process compile, a 503 saying so
            continue
        compiling = thread
        # A memory-hungry grammar's compile ends at the cap, in this process, not at the host's OOM
        # killer: RLIMIT_DATA counts what is allocated, not the address space reserved (RLIMIT_AS:
        # glibc's arenas, 64 MiB a thread, reserved and never used). It is set to what the process
        # holds now (its stack, up to 1 GiB for a 1 MiB constraint, and a last one's glibc has yet
        # to unmap, counted whole) and ``mem`` MiB more, once the thread has started: set before,
        # the thread's own start (its frame, its arena) could fail at it, and Thread.start waits for
        # a thread that died so for ever (a flaky hang, half the runs of a test).
        if what.get("mem", 0):
            cap = _data_bytes() + (what["mem"] << 20)
            if data_soft != resource.RLIM_INFINITY:
                cap = min(cap, data_soft)
            resource.setrlimit(resource.RLIMIT_DATA, (cap, data_hard))
        go.set()


def _data_bytes() -> int:
    """What RLIMIT_DATA counts of this process now (VmData: its private writable mappings)."""
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) << 10 for line in status if line.startswith("VmData:"))


if __name__ == "__main__":
    _serve()
