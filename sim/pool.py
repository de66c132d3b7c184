"""Shards (``shard.py``) in this process or each in a process of its own: ``call`` asks every
shard at once and waits for all, so between two barriers the shards' replicas run in parallel
on as many cores.

A process is forked, so it starts with what this one imported; its shard is built there (the
engines never cross a pipe), and only the arguments and answers do (requests, stats, summaries:
plain dataclasses and msgspec structs, pickled). An exception in a shard is raised here.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import signal
from collections.abc import Callable, Sequence
from multiprocessing.connection import Connection
from typing import Any

from dlora.sim.shard import Shard


def _serve(conn: Connection, make: Callable[[], Shard]) -> None:
    # Ctrl-C reaches the whole process group: the parent stops the run (and these, daemons, with
    # it); each shard printing its own KeyboardInterrupt traceback said nothing more.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    shard = make()
    while (message := conn.recv()) is not None:
        method, args = message
        try:
            conn.send((True, getattr(shard, method)(*args)))
        except Exception as e:  # noqa: BLE001 - the caller raises it
            conn.send((False, e))


class ShardPool:
    """``makers``' shards, built in this process (``jobs`` 1) or each in a forked process."""

    def __init__(self, makers: Sequence[Callable[[], Shard]], jobs: int) -> None:
        self._local: list[Shard] = []
        self._conns: list[Connection] = []
        self._procs: list[Any] = []
        if jobs <= 1:
            self._local = [make() for make in makers]
            return
        ctx = multiprocessing.get_context("fork")
        for make in makers:
            mine, theirs = ctx.Pipe()
            proc = ctx.Process(target=_serve, args=(theirs, make), daemon=True)
            proc.start()
            theirs.close()
            self._conns.append(mine)
            self._procs.append(proc)

    def __len__(self) -> int:
        return len(self._local) or len(self._conns)

    def call(self, method: str, args: Sequence[tuple[Any, ...]]) -> list[Any]:
        """``shard.method(*args[i])`` of every shard i, all at once; their answers in order.

        Raises:
            Exception: what a shard's method raised (the first one's).
            RuntimeError: a shard's process ended (killed, or out of memory).
        """
        if self._local:
            return [getattr(shard, method)(*a) for shard, a in zip(self._local, args)]
        for i, (conn, a) in enumerate(zip(self._conns, args)):
            try:
                conn.send((method, a))
            except OSError:
                raise self._lost(i) from None
        answers = []
        for i, conn in enumerate(self._conns):
            try:
                answers.append(conn.recv())
            except (EOFError, OSError):
                raise self._lost(i) from None
        if failed := next((value for ok, value in answers if not ok), None):
            raise failed
        return [value for _, value in answers]

    def _lost(self, i: int) -> RuntimeError:
        self._procs[i].join(timeout=1)
        return RuntimeError(f"simulator shard {i} ended (exit code {self._procs[i].exitcode}) in the middle of a run")

    def close(self) -> None:
        """Every process stopped: told to end, else terminated."""
        for conn in self._conns:
            with contextlib.suppress(OSError):
                conn.send(None)
            conn.close()
        for proc in self._procs:
            proc.join(timeout=5)
            if proc.is_alive():
                proc.terminate()
                proc.join(timeout=5)
        self._conns, self._procs = [], []
