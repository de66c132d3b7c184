"""sd_notify to a real datagram socket, as systemd listens on ``$NOTIFY_SOCKET``."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from dlora.services.notify import Notifier, watchdog_interval_s


@pytest.fixture
def notify_socket(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[socket.socket]:
    path = tmp_path / "notify"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.settimeout(2.0)
    monkeypatch.setenv("NOTIFY_SOCKET", str(path))  # libsystemd reads the process's own environment
    yield sock
    sock.close()


def _received(sock: socket.socket) -> list[str]:
    sock.setblocking(False)
    lines: list[str] = []
    while True:
        try:
            lines.append(sock.recv(4096).decode())
        except BlockingIOError:
            return lines


def test_watchdog_interval_follows_sd_watchdog_enabled() -> None:
    assert watchdog_interval_s({}, 7) is None
    assert watchdog_interval_s({"WATCHDOG_USEC": "30000000"}, 7) == 30.0
    assert watchdog_interval_s({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "7"}, 7) == 30.0
    assert watchdog_interval_s({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "8"}, 7) is None  # another's
    assert watchdog_interval_s({"WATCHDOG_USEC": "0"}, 7) is None


def test_without_a_notify_socket_nothing_is_sent() -> None:
    n = Notifier(env={"WATCHDOG_USEC": "1000"})
    assert not n.enabled and n.watchdog_s is None
    n.ready("x")  # no socket, no error
    asyncio.run(n.keep_alive(asyncio.Event()))  # returns at once


def test_ready_and_stopping_reach_the_socket(notify_socket: socket.socket) -> None:
    n = Notifier(env={"NOTIFY_SOCKET": "set"})
    n.ready("serving on http://127.0.0.1:8000")
    n.stopping()
    assert _received(notify_socket) == ["READY=1", "STATUS=serving on http://127.0.0.1:8000", "STOPPING=1"]


def test_the_watchdog_is_fed_only_while_the_work_loop_beats(notify_socket: socket.socket) -> None:
    now = [100.0]
    n = Notifier(env={"NOTIFY_SOCKET": "set", "WATCHDOG_USEC": "40000"}, clock=lambda: now[0])
    assert n.watchdog_s == 0.04

    async def feed_for(seconds: float) -> None:
        stop = asyncio.Event()
        task = asyncio.create_task(n.keep_alive(stop))
        await asyncio.sleep(seconds)
        stop.set()
        await task

    # no beats kept: the event loop turning is enough (0.2 s: two feeds 0.02 s apart, with room for
    # a loaded machine to be late)
    asyncio.run(feed_for(0.2))
    assert _received(notify_socket).count("WATCHDOG=1") >= 2
    n.beat()
    now[0] += 1.0  # the work loop has not turned for 1 s, 25 intervals
    asyncio.run(feed_for(0.05))
    assert _received(notify_socket) == []
    n.beat()
    asyncio.run(feed_for(0.05))
    assert "WATCHDOG=1" in _received(notify_socket)


def test_ready_waits_until_the_state_store_answers(notify_socket: socket.socket) -> None:
    """A service started while Redis is down serves meanwhile, but says READY=1 only once a ping
    is answered (the unit promises a service connected to NATS and Redis)."""
    n = Notifier(env={"NOTIFY_SOCKET": "set"})
    answers = [ConnectionError("down"), ConnectionError("down"), None]

    async def ping() -> None:
        if (answer := answers.pop(0)) is not None:
            raise answer

    async def main() -> list[str]:
        task = asyncio.create_task(n.ready_when(ping, "up", every_s=0.01))
        await asyncio.sleep(0.005)
        before = _received(notify_socket)
        await task
        return before

    assert asyncio.run(main()) == []
    assert _received(notify_socket) == ["READY=1", "STATUS=up"] and answers == []


def test_a_store_down_at_start_is_logged_once_then_once_when_back(monkeypatch: pytest.MonkeyPatch) -> None:
    """Recorded at the bus's logger itself: what other tests configured (renderer, level) must
    not decide what this one sees."""
    from dlora.common import bus

    logged: list[tuple[str, str, dict[str, object]]] = []

    class Recorder:
        def warning(self, event: str, **kw: object) -> None:
            logged.append(("warning", event, kw))

        def info(self, event: str, **kw: object) -> None:
            logged.append(("info", event, kw))

    monkeypatch.setattr(bus, "_log", Recorder())
    n = Notifier(env={})
    answers: list[Exception | None] = [ConnectionError("down")] * 20 + [None]

    async def ping() -> None:
        if (answer := answers.pop(0)) is not None:
            raise answer

    asyncio.run(n.ready_when(ping, "up", every_s=0.0))
    assert [(level, kw.get("failed_attempts")) for level, _, kw in logged] == [("warning", None), ("info", 20)]
    assert all("state store" in str(kw["what"]) for _, _, kw in logged)
