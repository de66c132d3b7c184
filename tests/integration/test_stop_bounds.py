"""A service told to stop (SIGTERM: ``systemctl stop``, ``dlora up``'s Ctrl-C) exits within the
bound its supervisor gives it, whatever it was doing: systemd's ``TimeoutStopSec`` of the units in
deploy/systemd, after which it is killed outright (SIGKILL: nothing handed back, nothing cleaned
up) and ``systemctl stop`` or ``restart`` waited for all of it."""

from __future__ import annotations

import asyncio
import configparser
import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from urllib.parse import urlsplit

import msgspec
import nats
import pytest

from dlora.common import subjects
from dlora.common.bus import connections
from dlora.common.messages import GenerateRequest, LostRequests, TokenChunk
from dlora.common.registry import AdapterRegistry
from dlora.common.sampling import SamplingParams
from dlora.model.make_tiny import TinyOutput
from dlora.services.dispatcher.main import Dispatcher
from dlora.services.dispatcher.settings import DispatcherSettings
from dlora.services.servers import Server, free_port
from dlora.services.stack_stop import STOP_WAIT_S
from tests.integration.conftest import sigstop, spawn_gateway, spawn_worker

UNITS = Path(__file__).resolve().parents[2] / "deploy" / "systemd"


def stop_timeout_s(unit: str) -> float:
    """The unit's ``TimeoutStopSec`` (seconds): how long systemd waits after SIGTERM."""
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.read(UNITS / unit)
    return float(parser["Service"]["TimeoutStopSec"])


def wait_for_line(log: Path, text: str, proc: subprocess.Popen[bytes], limit_s: float = 120.0) -> None:
    deadline = time.monotonic() + limit_s
    while text not in log.read_text() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    assert text in log.read_text(), log.read_text()[-3000:]


TCP_TABLES = ("/proc/net/tcp", "/proc/net/tcp6")  # (the second absent where the kernel has no IPv6)
TCP_LISTEN = "0A"  # a socket's state in them (include/net/tcp_states.h)


def unread_at(port: int, table: str) -> bool:
    """Whether a connection to the server on ``port``, in ``table`` (a ``/proc/net/tcp`` or
    ``tcp6`` text), holds bytes the server has not read. Not a listening socket's receive queue:
    there it counts connections not yet accepted, nothing sent yet."""
    for row in table.splitlines()[1:]:
        _, local, _, state, queues = row.split()[:5]  # ("0100007F:1F90", "01", "tx:rx" in hex)
        if state != TCP_LISTEN and int(local.rsplit(":", 1)[1], 16) == port and int(queues.split(":")[1], 16) > 0:
            return True
    return False


def unanswered(
    port: int, proc: subprocess.Popen[bytes], limit_s: float = 60.0, tables: tuple[str, ...] = TCP_TABLES
) -> None:
    """Until a command sent to the server on ``port`` (stopped: it reads nothing) waits unread in
    its socket (``unread_at``): a call to it is under way. Given up once ``proc`` exits."""
    deadline = time.monotonic() + limit_s
    while proc.poll() is None and time.monotonic() < deadline:
        if any(unread_at(port, Path(t).read_text()) for t in tables if Path(t).exists()):
            return
        time.sleep(0.05)
    raise AssertionError(f"no call to the server on port {port} is under way (exit {proc.poll()})")


HEADER = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n"


def _last_event(log: Path) -> str:
    """The event of a service's last JSON log line."""
    event: str = json.loads(log.read_text().splitlines()[-1])["event"]
    return event


def test_a_connection_not_yet_accepted_is_no_call_under_way() -> None:
    """A stopped server's listening socket counts a connection made to it in its receive queue
    (nothing sent yet); a call is under way once bytes wait in the connection's own."""
    listening = "   0: 0100007F:1F90 00000000:0000 0A 00000000:00000001 00:00000000 00000000 0 0 7 1\n"
    sent = "   1: 0100007F:1F90 0100007F:D431 01 00000000:0000000E 00:00000000 00000000 0 0 0 1\n"
    elsewhere = "   2: 0100007F:1F91 0100007F:D432 01 00000000:0000000E 00:00000000 00000000 0 0 0 1\n"
    v6 = "   0: 00000000000000000000000001000000:1F90 00000000000000000000000001000000:D433 01 00000000:0000000E"
    assert not unread_at(0x1F90, HEADER + listening + elsewhere)
    assert unread_at(0x1F90, HEADER + listening + sent)
    assert unread_at(0x1F90, HEADER + v6 + " 00:00000000 00000000 0 0 0 1\n")


def test_unanswered_reads_only_the_tables_the_kernel_has(tmp_path: Path) -> None:
    """A kernel without IPv6 has no ``/proc/net/tcp6``: the wait reads ``tcp`` alone."""
    tcp = tmp_path / "tcp"
    tcp.write_text(HEADER + "   1: 0100007F:1F90 0100007F:D431 01 00000000:0000000E 00:00000000 00000000 0 0 0 1\n")
    with subprocess.Popen(["sleep", "60"]) as proc:
        try:
            unanswered(0x1F90, proc, tables=(str(tmp_path / "tcp6"), str(tcp)))  # (the missing one first)
        finally:
            proc.kill()


def stopped_within(proc: subprocess.Popen[bytes], limit_s: float, sig: int = signal.SIGTERM) -> int | None:
    """``proc``'s exit code once it exits within ``limit_s`` of ``sig``; None (and killed) if not."""
    proc.send_signal(sig)
    try:
        return proc.wait(timeout=limit_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        return None


def test_a_worker_told_to_stop_while_redis_hangs_stops_before_systemd_kills_it(
    nats_server: Server, start_redis_here, tiny_llama: TinyOutput, tmp_path: Path
) -> None:
    """With Redis hung (SIGSTOP here; a partition, a paused VM), each of the stop's Redis calls (is
    the id another's now, what came late, the clean-stop mark, the heartbeat's removal) waited out
    redis-py's tries, 4 x 5 s: an idle worker took 86 s to stop, past TimeoutStopSec (60 s)."""
    redis = start_redis_here()
    log = tmp_path / "worker.log"
    with log.open("wb") as out:
        proc = spawn_worker(nats_server.url, redis.url, str(tiny_llama.model), "w-hung", stderr=out)
    try:
        wait_for_line(log, "worker ready", proc)
        sigstop(redis.proc)
        time.sleep(1)  # its Redis calls now hang (a beat or a reconciliation may be waiting)
        code = stopped_within(proc, stop_timeout_s("dlora-worker@.service"))
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert code == 0, log.read_text()[-3000:]


def slow_model(tiny: TinyOutput, where: Path) -> Path:
    """A copy of ``tiny``'s model whose weights file is a FIFO: a read of it waits until someone
    writes (a model on a hung network mount, a disk of minutes: a load that does not end soon)."""
    model = where / "slow-model"
    model.mkdir()
    for f in tiny.model.iterdir():
        if f.suffix != ".safetensors":
            (model / f.name).symlink_to(f)
    os.mkfifo(model / "model.safetensors")
    return model


def opening_a_fifo(proc: subprocess.Popen[bytes], limit_s: float = 120.0) -> None:
    """Until a thread of ``proc`` waits in the open of a FIFO (Linux's ``wait_for_partner``): the
    load got as far as the weights, and waits there for as long as nobody writes to them."""
    deadline = time.monotonic() + limit_s
    while proc.poll() is None and time.monotonic() < deadline:
        with contextlib.suppress(OSError):  # (a thread that ended meanwhile)
            if any(
                t.joinpath("wchan").read_text() == "wait_for_partner" for t in Path(f"/proc/{proc.pid}/task").iterdir()
            ):
                return
        time.sleep(0.1)
    raise AssertionError(f"the weights were never opened (exit {proc.poll()})")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "Ctrl-C"])
def test_a_worker_told_to_stop_while_its_model_loads_stops(
    nats_server: Server, redis_server: Server, tiny_llama: TinyOutput, tmp_path: Path, sig: int
) -> None:
    """vLLM #5062's kind: Ctrl-C (twice too) or systemd's SIGTERM during the load did nothing; the
    worker went on waiting for the load (here for ever) until it was killed outright. Nothing is
    there to undo yet: the signal ends it as it would any program (systemd counts that a clean stop)."""
    model = slow_model(tiny_llama, tmp_path)
    log = tmp_path / "worker.log"
    with log.open("wb") as out:
        proc = spawn_worker(nats_server.url, redis_server.url, str(model), "w-loading", stderr=out)
    try:
        opening_a_fifo(proc)
        code = stopped_within(proc, stop_timeout_s("dlora-worker@.service"), sig)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert code in (0, -sig), log.read_text()[-3000:]


def slow_schema(patterns: int = 800) -> dict:
    """A JSON schema llguidance takes hours over (400 such patternProperties: 37 s here)."""
    return {"type": "object", "patternProperties": {f"^p{i}[a-z]*x$": {"type": "integer"} for i in range(patterns)}}


def threads_of(pid: int) -> int:
    return len(list(Path(f"/proc/{pid}/task").iterdir()))


def test_a_gateway_told_to_stop_while_a_grammar_compiles_stops(
    nats_server: Server, redis_server: Server, tiny_llama: TinyOutput, tmp_path: Path
) -> None:
    """A compile runs on threads nothing can interrupt; concurrent.futures' pool threads are joined
    at the interpreter's exit, so a gateway told to stop while one compiled closed its port and
    then waited for the compile (hours) until systemd killed it (the worker compiles alike)."""
    port, log = free_port(), tmp_path / "gateway.log"
    proc = spawn_gateway(nats_server.url, redis_server.url, str(tiny_llama.model), port, log)
    body = {
        "model": tiny_llama.model.name,
        "prompt": "hi",
        "max_tokens": 4,
        "response_format": {"type": "json_schema", "json_schema": {"name": "slow", "schema": slow_schema()}},
    }
    sent: list[BaseException] = []

    def send() -> None:
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/v1/completions", json.dumps(body).encode(), {"Content-Type": "application/json"}
        )
        try:
            urllib.request.urlopen(request, timeout=300).close()
        except Exception as e:  # noqa: BLE001 - its answer is not what is tested
            sent.append(e)

    client = threading.Thread(target=send, daemon=True)
    try:
        wait_for_line(log, "gateway ready", proc)
        before = threads_of(proc.pid)
        client.start()
        deadline = time.monotonic() + 120
        while threads_of(proc.pid) < before + 2 and time.monotonic() < deadline:  # the pool's, the compile's
            time.sleep(0.1)
        code = stopped_within(proc, stop_timeout_s("dlora-gateway.service"))
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert code == 0, log.read_text()[-3000:]
    assert _last_event(log) == "gateway stopped"  # (a stop cut off by systemd has none)


@pytest.mark.parametrize("service", ["dispatcher", "migrator"])
def test_a_service_told_to_stop_while_redis_hangs_stops_before_dlora_up_kills_it(
    nats_server: Server, start_redis_here, tmp_path: Path, service: str
) -> None:
    """With Redis hung, the look under way when the stop came (the dispatcher's sweep of lost
    workers, the migrator's lease and plan) waited out redis-py's tries (4 x 5 s), and the
    migrator's release of its lease as many again: 18 s and 38 s, past the 10 s ``dlora up``
    gives a service before it kills it."""
    redis = start_redis_here()
    env = {
        **os.environ,
        "DLORA_NATS_URL": nats_server.url,
        "DLORA_REDIS_URL": redis.url,
        "DLORA_METRICS_PORT": str(free_port()),
        "DLORA_HEARTBEAT_TTL_S": "2",  # (the dispatcher looks every TTL/4)
    }
    log = tmp_path / f"{service}.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "dlora.services.cli", "serve", service], env=env, stdout=out, stderr=out
        )
    try:
        wait_for_line(log, f"{service} ready", proc)
        sigstop(redis.proc)
        # A look under way meets the hung Redis: without the bound it waits out 4 x 5 s from now.
        # (Not its "dependency unavailable" line: that comes only after those 20 s.)
        unanswered(urlsplit(redis.url).port or 6379, proc)
        code = stopped_within(proc, STOP_WAIT_S)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert code == 0, log.read_text()[-3000:]
    assert _last_event(log) == f"{service} stopped"


async def test_a_dispatcher_told_to_stop_while_its_registry_opens_on_a_hung_redis_stops(
    nats_server: Server, start_redis_here, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The adapter registry opens just after "dispatcher ready", its Redis read outside the
    periodic look's bound: with Redis hung then, a stop waited out that read's tries (4 x 5 s,
    past the 10 s ``dlora up`` gives) and opened the registry all the same. Here Redis hangs just
    as the open starts; the stop breaks the open off, so the registry is never opened."""
    redis = start_redis_here()
    real_open = AdapterRegistry.open

    async def open_on_a_hung_redis(*args, **kwargs) -> AdapterRegistry:  # type: ignore[no-untyped-def]
        sigstop(redis.proc)
        return await real_open(*args, **kwargs)

    monkeypatch.setattr(AdapterRegistry, "open", open_on_a_hung_redis)
    settings = DispatcherSettings(nats_url=nats_server.url, redis_url=redis.url)
    stop = asyncio.Event()
    async with connections(settings) as (nc, store):
        dispatcher = Dispatcher(settings, nc, store)
        unopened = dispatcher.registry
        task = asyncio.create_task(dispatcher.run(stop))
        try:
            await asyncio.to_thread(unanswered, urlsplit(redis.url).port or 6379, redis.proc)
            stop.set()
            await asyncio.wait_for(task, 60)  # (a guard: unbounded, the open ends after its 20 s)
        finally:
            redis.proc.send_signal(signal.SIGCONT)
    assert dispatcher.registry is unopened


async def test_ctrl_c_twice_hands_a_draining_workers_requests_over_at_once(
    nats_server: Server, redis_server: Server, tiny_llama: TinyOutput, tmp_path: Path
) -> None:
    """The first Ctrl-C drains (up to ``drain_timeout_s``, here 600 s); a second did nothing more,
    where vLLM's and uvicorn's users press it to force the stop. It hands over what runs now, as the
    drain's end does (resumed elsewhere, not a death), and the worker exits."""
    nc = await nats.connect(nats_server.url)
    handed: list[LostRequests] = []
    chunks: list[TokenChunk] = []

    async def on_lost(msg) -> None:  # type: ignore[no-untyped-def]
        handed.append(msgspec.json.decode(msg.data, type=LostRequests))

    async def on_chunk(msg) -> None:  # type: ignore[no-untyped-def]
        chunks.append(msgspec.json.decode(msg.data, type=TokenChunk))

    await nc.subscribe(subjects.LOST, cb=on_lost)
    await nc.subscribe("test.hurry.>", cb=on_chunk)
    await nc.flush()
    log = tmp_path / "worker.log"
    with log.open("wb") as out:
        proc = spawn_worker(
            nats_server.url, redis_server.url, str(tiny_llama.model), "w-hurry", stderr=out, DLORA_DRAIN_TIMEOUT_S="600"
        )
    try:
        await asyncio.to_thread(wait_for_line, log, "worker ready", proc)
        long = GenerateRequest(
            request_id="r-long",
            reply_to="test.hurry.r-long",
            prompt_token_ids=[5, 40, 41],
            params=SamplingParams(max_tokens=400, temperature=0.0, ignore_eos=True),
        )
        await nc.publish(subjects.worker_requests("w-hurry"), msgspec.json.encode(long))
        while not chunks and proc.poll() is None:  # it runs
            await asyncio.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        await asyncio.to_thread(wait_for_line, log, "draining", proc)
        code = await asyncio.to_thread(stopped_within, proc, stop_timeout_s("dlora-worker@.service"), signal.SIGINT)
        await nc.flush()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        await nc.close()
    assert code == 0, log.read_text()[-3000:]
    assert not any(c.finish_reason for c in chunks), "it ran to its end: the second Ctrl-C did not hurry the drain"
    assert [(h.requests, h.draining) for h in handed] == [({"r-long": 0}, True)]
