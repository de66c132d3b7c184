"""Grammar compiles that can be abandoned: a time bound on llguidance's work, and threads that no
exit waits for.

llguidance's own limits (``LLParserLimits``: lexer fuel, grammar size, lexer states) count its
lexer's work, not its JSON Schema compiler's: 250 ``patternProperties`` took 2 s with a tenth of the
default fuel, 400 took 12 s, 1,000 take hours (vLLM #54003), a compile thread and a core held all
along. A native call on a thread cannot be stopped, so the grammar is validated first (the same
compile, the tokenizer aside) in a child process that is killed past the bound; what passed is
compiled again in-process, where the matcher must live (llguidance's compiled grammar does not
cross a process). Only the child's reply crosses: llguidance's message, a few bytes.

The child is this file run as a script (``python -P compile_bound.py``): it imports llguidance and
the standard library alone (about 60 ms to start), and exits once its parent's end of the pipe
closes, whatever it is doing (the parent's exit, however it exits, ends it).
"""

from __future__ import annotations

import os
import select
import struct
import subprocess
import sys
import threading
import time
import weakref
from collections.abc import Callable
from concurrent.futures import Executor, Future
from queue import SimpleQueue
from typing import IO, Any

_HEADER = struct.Struct("<Q")
# A child is found starved, not slow, past this many times the bound in wall time (a host so loaded
# that the child has a fifth of a core): refused all the same, saying so.
_WALL_PER_CPU = 5.0
_TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


class TooSlow(Exception):
    """The grammar's compile was stopped at the bound; the message says so (after a field's name)."""


# What ``Validator.validate`` answers when the child could not say: llguidance raised rather than
# answered (quick to find again in-process, where the caller sees the exception itself), or no child
# could start (fork's EAGAIN or ENOMEM: compiled in-process, unbounded, rather than refused).
UNCHECKED = "\0unchecked"


def _cpu_s(pid: int) -> float | None:
    """The CPU seconds process ``pid`` has used, all its threads (None: not on Linux, or gone)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / _TICK  # utime, stime (the 14th and 15th fields)


class _Child:
    """One child process, validating one grammar at a time."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-P", __file__],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            close_fds=True,
        )

    def ask(self, grammar: str, bound_s: float) -> str | None:
        """llguidance's ``validate_grammar`` message for ``grammar`` (empty: valid; ``UNCHECKED``);
        None past ``bound_s`` seconds of the child's CPU. Raises OSError when the child is gone."""
        stdin, stdout = self.proc.stdin, self.proc.stdout
        assert stdin is not None and stdout is not None
        body = grammar.encode("utf-8", "surrogatepass")
        start, used_before = time.monotonic(), _cpu_s(self.proc.pid)
        stdin.write(_HEADER.pack(len(body)) + body)
        stdin.flush()
        while True:
            used = _cpu_s(self.proc.pid)
            spent = time.monotonic() - start
            cpu = spent if used is None or used_before is None else used - used_before
            # CPU time, not wall time: 4 slow compiles at once on 2 cores each take twice as long
            left = min(bound_s - cpu, bound_s * _WALL_PER_CPU - spent)
            if left <= 0:
                return None
            if select.select([stdout], [], [], left)[0]:
                return _read(stdout).decode("utf-8", "surrogatepass")

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait()


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

    def validate(self, grammar: str, bound_s: float) -> str | None:
        """llguidance's ``validate_grammar(grammar)`` run within ``bound_s`` seconds of CPU: its
        message (empty: valid; ``UNCHECKED``: not said), or None when it ran past them and was
        stopped. A child that dies on the grammar (llguidance crashed on it) says so as a message."""
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
                verdict = child.ask(grammar, bound_s)
            except (OSError, EOFError):
                child.kill()
                if kept is not None:
                    continue  # it may have died idle (the OOM killer): this grammar, on a new one
                return "the grammar engine failed on it (its compiler's process died)"
            if verdict is None:
                child.kill()
                return None
            with self._lock:
                self._idle.append(child)
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


def _serve() -> None:  # the child: one grammar at a time from stdin, its message to stdout
    from llguidance import LLMatcher

    stdin, stdout = sys.stdin.buffer, sys.stdout.buffer
    while True:
        try:
            grammar = _read(stdin).decode("utf-8", "surrogatepass")
        except EOFError:  # the parent is gone (or done with this child): whatever runs, ends
            os._exit(0)

        def run(grammar: str = grammar) -> None:
            try:
                message = LLMatcher.validate_grammar(grammar).encode("utf-8", "surrogatepass")
            except Exception:  # noqa: BLE001 - the parent finds it again, in-process
                message = UNCHECKED.encode()
            stdout.write(_HEADER.pack(len(message)) + message)
            stdout.flush()

        # as structured._deep: llguidance compiles recursively, its stack growing with the text
        threading.stack_size(-(-(16 * (1 << 20) + 1024 * len(grammar)) // (1 << 20)) * (1 << 20))
        threading.Thread(target=run, daemon=True).start()


if __name__ == "__main__":
    _serve()
