"""Idle, slow and too many connections (issue 16, fault 8): the gateway keeps answering, closes
what does not send a request in time, refuses what is over its limits, and its log stays small."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import resource
import socket
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
import msgspec
import pytest
from redis.asyncio import Redis

from dlora.model.make_tiny import TinyOutput
from dlora.services.gateway.connections import Listener, listen
from dlora.services.servers import Server, free_port
from tests.integration.conftest import Stack, run_stack

PARTIAL_HEAD = b"POST /v1/completions HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"


async def _open(port: int, source: str, send: bytes = b"") -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port, local_addr=(source, 0))
    if send:
        writer.write(send)
        await writer.drain()
    return reader, writer


async def _closed_within(reader: asyncio.StreamReader, seconds: float) -> bytes | None:
    """What the server sent before closing, or None if it is still open after ``seconds``."""
    data = b""
    try:
        async with asyncio.timeout(seconds):
            while chunk := await reader.read(4096):
                data += chunk
    except TimeoutError:
        return None
    except ConnectionResetError:
        pass
    return data


async def _held_and_refused(listener: Listener, expect: int) -> None:
    """Until ``listener`` has admitted or refused ``expect`` connections (accepts run on this loop,
    after the client side's handshakes)."""
    async with asyncio.timeout(60):
        while listener.guard.open + listener.guard.refused < expect:
            await asyncio.sleep(0.05)


async def test_slow_idle_and_excess_connections_are_closed_and_the_gateway_answers(
    stack: Stack, caplog: pytest.LogCaptureFixture
) -> None:
    # Two listeners on the stack's gateway. The first holds what it admits (its timeouts are far
    # off), so what is held, what is refused and what is served beside them is counted, not raced
    # against a 2 s timer on a loaded machine; the second has the short timeouts that are tested.
    holding = msgspec.structs.replace(
        stack.gateway.s, port=free_port(), header_timeout_s=600.0, idle_timeout_s=600.0, max_connections_per_client=100
    )
    s = msgspec.structs.replace(
        stack.gateway.s, port=free_port(), header_timeout_s=2.0, idle_timeout_s=3.0, max_connections_per_client=100
    )
    held = await listen(stack.gateway.app(), holding)
    listener = await listen(stack.gateway.app(), s)
    caplog.set_level(logging.DEBUG)
    try:
        # 300 connections from one address that send half a request head and stall (slowloris),
        # and 20 from another that send nothing at all.
        slow = [await _open(holding.port, "127.0.0.2", PARTIAL_HEAD) for _ in range(300)]
        idle = [await _open(holding.port, "127.0.0.3") for _ in range(20)]
        await _held_and_refused(held, 320)
        # A third of the slow ones are within that address's limit and held; the rest are refused.
        assert held.guard.open == 120 and held.guard.refused == 200 and held.guard.header_timeouts == 0

        # Everyone else is served meanwhile. (No time bound: the fault was a gateway that stopped
        # answering at all; the client's own timeout is what would catch it.)
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as http:
            async with http.get(f"http://127.0.0.1:{holding.port}/livez") as r:
                assert r.status == 200
            async with http.post(
                f"http://127.0.0.1:{holding.port}/v1/completions",
                json={"model": "lora-0", "prompt": "kalo remi", "max_tokens": 4, "temperature": 0},
            ) as r:
                assert r.status == 200 and (await r.json())["usage"]["completion_tokens"] == 4
        assert held.guard.open == 120  # still held while those were served

        await held.close()  # closes the held ones; each refused one was answered, each held one not
        answers = await asyncio.gather(*(_closed_within(r, 60.0) for r, _ in slow + idle))
        refused = [a for a in answers if a is not None and a.startswith(b"HTTP/1.1 429 ")]
        assert len(refused) == 200 and b"Retry-After: 1" in refused[0], refused[:1]
        assert answers.count(b"") == 120, [a for a in answers if a != b"" and a not in refused][:3]
        for _, w in slow + idle:
            w.close()

        # The slow and idle ones are closed once the head timeout has passed, unanswered: by the
        # head timer (counted), not by aiohttp's keep-alive timer at 3 s nor by chance.
        start = time.monotonic()
        slow = [await _open(s.port, "127.0.0.2", PARTIAL_HEAD) for _ in range(100)]
        idle = [await _open(s.port, "127.0.0.3") for _ in range(20)]
        closed = await asyncio.gather(*(_closed_within(r, 60.0) for r, _ in slow + idle))
        assert all(c == b"" for c in closed), closed[:3]
        assert 2.0 <= time.monotonic() - start  # not early
        assert listener.guard.header_timeouts == 120 and listener.guard.open == 0

        # A keep-alive connection that finished a request is left open while idle, for the idle
        # timeout (not the head timeout), then closed.
        reader, writer = await _open(s.port, "127.0.0.4", b"GET /livez HTTP/1.1\r\nHost: localhost\r\n\r\n")
        head = await reader.readuntil(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200 ")
        await reader.readexactly(int(head.split(b"Content-Length: ")[1].split(b"\r\n")[0]))
        t = time.monotonic()
        assert await _closed_within(reader, 2.5) is None  # past the 2 s head timeout: still open
        assert await _closed_within(reader, 60.0) == b""
        # closed by the 3 s idle timer: not early, and not by the head timer
        assert 2.9 <= time.monotonic() - t and listener.guard.header_timeouts == 120
        # A request whose head came whole but whose body trickles (here: stops) is answered 408
        # once the body timeout has passed, not held open for as long as the client likes.
        settings, stack.gateway.s = stack.gateway.s, msgspec.structs.replace(stack.gateway.s, body_timeout_s=1.0)
        try:
            head = PARTIAL_HEAD + b"Content-Length: 100\r\n\r\n" + b'{"model": "'
            body_reader, body_writer = await _open(s.port, "127.0.0.5", head)
            t = time.monotonic()
            answer = await asyncio.wait_for(body_reader.readuntil(b"\r\n\r\n"), 60.0)
            assert answer.startswith(b"HTTP/1.1 408 "), answer
            answer += await body_reader.readexactly(int(answer.split(b"Content-Length: ")[1].split(b"\r\n")[0]))
            # the body timer's answer (its text names it), not early
            assert b"did not arrive within 1 s" in answer and 1.0 <= time.monotonic() - t
            body_writer.close()
        finally:
            stack.gateway.s = settings
        for _, w in slow + idle + [(reader, writer)]:
            w.close()
    finally:
        await held.close()
        await listener.close()
    # 440 connections refused or timed out: a line or two of log, not one (or a traceback) each.
    lines = [r for r in caplog.records if r.name.startswith(("aiohttp", "asyncio"))]
    assert len(lines) <= 5, [r.getMessage()[:200] for r in lines]


# Seconds a started gateway has to answer: the test's safety net only (below the per-test
# timeout; a loaded host took past 30 s).
LIVENESS_S = 240


async def _answers(http: aiohttp.ClientSession, url: str) -> bool:
    """Whether ``url`` answers 200 (False: nothing listens there yet)."""
    try:
        async with http.get(url) as r:
            return r.status == 200
    except aiohttp.ClientConnectionError:
        return False


def _low_fd_limit() -> None:
    resource.setrlimit(resource.RLIMIT_NOFILE, (400, 400))


async def test_more_connections_than_file_descriptors_keep_the_gateway_up_and_its_log_small(
    nats_server: Server, redis_server: Server, tiny_llama: TinyOutput, tmp_path: Path
) -> None:
    """`dlora serve gateway` with 400 file descriptors and 600 clients that connect and wait: it
    used to run out of descriptors, stop answering and log a traceback for every failed accept
    (about 100 MB in 30 s); now the connections over its limit are refused and it answers."""
    port = free_port()
    log_path = tmp_path / "gateway.log"
    env = {
        **os.environ,
        "DLORA_NATS_URL": nats_server.url,
        "DLORA_REDIS_URL": redis_server.url,
        "DLORA_GATEWAY_MAX_CONNECTIONS_PER_CLIENT": "0",  # only the total limit here
    }
    cmd = [sys.executable, "-m", "dlora.services.cli", "serve", "gateway", "--model", str(tiny_llama.model)]
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([*cmd, "--port", str(port)], env=env, stdout=log, stderr=log, preexec_fn=_low_fd_limit)
    clients: list[asyncio.StreamWriter] = []
    try:
        async with aiohttp.ClientSession() as http:
            # Until it answers: 300 tries 0.1 s apart ran out on a loaded machine before its start
            # (imports, the tokenizer), and the flood then met no listener (connections refused).
            async with asyncio.timeout(LIVENESS_S):
                while not await _answers(http, f"http://127.0.0.1:{port}/livez"):
                    assert proc.poll() is None, log_path.read_text()[-2000:]
                    await asyncio.sleep(0.1)
            size_at_start = log_path.stat().st_size
            for i in range(600):
                try:
                    _, w = await _open(port, f"127.0.0.{2 + i % 6}")
                    clients.append(w)
                except OSError:
                    break
            await asyncio.sleep(2.0)
            # Answered at all: the fault was a gateway that stopped answering (no time bound, which a
            # loaded machine breaks; the client's timeout catches a gateway that does not answer).
            async with http.get(f"http://127.0.0.1:{port}/livez", timeout=aiohttp.ClientTimeout(total=60)) as r:
                assert r.status == 200
        logged = log_path.stat().st_size - size_at_start
        assert logged < 4096, log_path.read_bytes()[size_at_start : size_at_start + 2000]
    finally:
        for w in clients:
            w.close()
        proc.terminate()
        proc.wait(timeout=20)


def test_serve_on_a_port_in_use_says_so_in_a_line(
    nats_server: Server, redis_server: Server, tiny_llama: TinyOutput
) -> None:
    """`dlora serve gateway` (what systemd runs) on a taken port printed a traceback; `dlora up`
    already refused it in a line."""
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    env = {**os.environ, "DLORA_NATS_URL": nats_server.url, "DLORA_REDIS_URL": redis_server.url}
    cmd = [sys.executable, "-m", "dlora.services.cli", "serve", "gateway", "--model", str(tiny_llama.model)]
    try:
        done = subprocess.run([*cmd, "--port", str(taken.getsockname()[1])], env=env, capture_output=True, text=True)
    finally:
        taken.close()
    last = done.stderr.strip().splitlines()[-1]
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr[-2000:]
    assert last.startswith("dlora serve gateway: cannot listen:") and "address already in use" in last


async def test_expect_100_continue_is_answered_by_what_the_body_may_be(stack: Stack) -> None:
    """curl sends Expect: 100-continue above 1 MiB: the gateway answered 100 for any body, and the
    client uploaded 3 MB to be refused 413; an Expect it does not know got a plain-text 417."""
    port = int(stack.url.rsplit(":", 1)[1])

    async def head(expect: str, length: int) -> bytes:
        more = f"Expect: {expect}\r\nContent-Length: {length}\r\n\r\n".encode()
        reader, writer = await _open(port, "127.0.0.1", PARTIAL_HEAD + more)
        try:
            async with asyncio.timeout(60):
                first = await reader.readuntil(b"\r\n\r\n")
                if first.startswith(b"HTTP/1.1 100 "):
                    return first
                return first + await reader.readexactly(int(first.split(b"Content-Length: ")[1].split(b"\r\n")[0]))
        finally:
            writer.close()

    limit = stack.gateway.s.max_body_bytes
    refused = await head("100-continue", 3 * limit)
    assert refused.startswith(b"HTTP/1.1 413 ") and b"application/json" in refused
    assert json.loads(refused.split(b"\r\n\r\n", 1)[1])["error"]["message"].endswith(f"the limit of {limit}")
    unknown = await head("foo", 10)
    assert unknown.startswith(b"HTTP/1.1 417 ") and b"application/json" in unknown
    assert (await head("100-continue", 10)).startswith(b"HTTP/1.1 100 Continue")  # the body may come
    # HTTP/1.0 has no Expect: no 1xx goes to it (RFC 9110 15.2), and an unknown one is no 417 there
    body = json.dumps({"model": "lora-0", "prompt": "kalo", "max_tokens": 2}).encode()
    old = f"POST /v1/completions HTTP/1.0\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n"
    for expect in ("100-continue", "foo"):
        reader, writer = await _open(port, "127.0.0.1", f"{old}Expect: {expect}\r\n\r\n".encode() + body)
        async with asyncio.timeout(30):
            answer = await reader.read()
        writer.close()
        assert answer.startswith(b"HTTP/1.1 200 ") or answer.startswith(b"HTTP/1.0 200 "), answer[:80]
        assert b"100 Continue" not in answer
    async with aiohttp.ClientSession() as http:  # and a request that sends it after the 100 is served
        body = json.dumps({"model": "lora-0", "prompt": "kalo", "max_tokens": 2}).encode()
        headers = {"Content-Type": "application/json"}
        async with http.post(stack.url + "/v1/completions", data=body, expect100=True, headers=headers) as r:
            assert r.status == 200 and (await r.json())["usage"]["completion_tokens"] == 2


def test_serve_on_a_host_that_does_not_resolve_says_so_in_a_line(
    nats_server: Server, redis_server: Server, tiny_llama: TinyOutput
) -> None:
    """A full socket.gaierror traceback and exit 1 (so systemd restarted it five times)."""
    env = {
        **os.environ,
        "DLORA_NATS_URL": nats_server.url,
        "DLORA_REDIS_URL": redis_server.url,
        "DLORA_GATEWAY_HOST": "no-such-host.invalid",
    }
    cmd = [sys.executable, "-m", "dlora.services.cli", "serve", "gateway", "--model", str(tiny_llama.model)]
    done = subprocess.run([*cmd, "--port", str(free_port())], env=env, capture_output=True, text=True)
    last = done.stderr.strip().splitlines()[-1]
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr[-2000:]
    assert last.startswith("dlora serve gateway: cannot resolve a host name:")


async def test_a_stream_whose_client_stopped_reading_is_closed_and_aborted(
    nats_server: Server, redis: Redis, tiny_llama: TinyOutput
) -> None:
    """A helper's probe: a reader that stopped reading (its process paused, its TCP window full)
    held its key's concurrency slots and, queued in the gateway, the rest of its output for as long
    as it kept the socket open: 429s a minute after the worker had finished. Past send_timeout_s
    without a write taken, the connection is closed and the request aborted on its worker."""
    async with run_stack(nats_server, redis, tiny_llama, send_timeout_s=1.0) as stack:
        host, port = stack.url.removeprefix("http://").split(":")
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # (before connecting: a small window)
        sock.connect((host, int(port)))
        fields = {"model": "model", "prompt": "kalo", "max_tokens": 500, "ignore_eos": True, "stream": True}
        body = json.dumps({**fields, "logprobs": 5, "n": 32})  # MBs of events: past any socket buffer
        head = f"POST /v1/completions HTTP/1.1\r\nHost: localhost\r\nContent-Length: {len(body)}\r\n"
        head += "Content-Type: application/json\r\n\r\n"
        sock.sendall((head + body).encode())  # and never read
        try:
            aborted = stack.gateway.metrics.requests.labels("model", "aborted")
            async with asyncio.timeout(60):
                while aborted._value.get() < 1:
                    await asyncio.sleep(0.2)
                # The abort reaches the worker over NATS and ends its streams at its next step: a
                # fixed 0.5 s for that failed once beside other tests on a loaded machine.
                while any(w.streams for w in stack.workers):
                    await asyncio.sleep(0.05)
            # stopped, not run on for nobody: its 32 x 500 tokens were not all generated
            assert sum(w.engine.stats.tokens_generated for w in stack.workers) < 32 * 500
            assert stack.gateway.metrics.requests.labels("model", "200")._value.get() == 0
        finally:
            sock.close()
