"""Real nats-server and redis-server on free loopback ports, once per run; Redis flushed per test;
a stack of dispatcher + 2 workers + gateway running in this process against them."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import aiohttp
import msgspec
import nats
import pytest
from aiohttp import web
from redis.asyncio import Redis

from dlora.common import bus, subjects
from dlora.common.key_registry import purge_keys
from dlora.common.messages import LostRequests
from dlora.common.registry import purge
from dlora.common.state import StateStore
from dlora.model.make_tiny import TinyOutput
from dlora.services.dispatcher.choose import DispatchMode
from dlora.services.dispatcher.main import Dispatcher
from dlora.services.dispatcher.settings import DispatcherSettings
from dlora.services.gateway.admin import check_adapter
from dlora.services.gateway.connections import listen
from dlora.services.gateway.main import Gateway
from dlora.services.gateway.settings import GatewaySettings
from dlora.services.servers import Server, free_port, start_nats, start_redis
from dlora.services.worker.engine.config import EngineConfig
from dlora.services.worker.main import WorkerService, build_engine
from dlora.services.worker.settings import WorkerSettings

ADMIN_KEY = "test-admin-key"
# The KV cache of each of a stack's workers. The default (256 MiB) is 32,768 blocks of the tiny
# models' 512 bytes a token: each stack zeroed 512 MiB it never used (~0.25 s of a core each, some
# hundred stacks a run) and held it until the collector freed it. 32 MiB is 4,096 blocks, twice
# what max_num_seqs (64) requests at the tiny models' whole context (512 tokens) take.
STACK_KV_CACHE_BYTES = 32 << 20
# The same for a worker process (``dlora serve worker``, ``dlora up``'s), in its environment.
STACK_KV_ENV = {"DLORA_WORKER_ENGINE__KV_CACHE_BYTES": str(STACK_KV_CACHE_BYTES)}


def small_engine(**fields: Any) -> EngineConfig:
    """An EngineConfig of ``fields`` with a stack's KV cache (STACK_KV_CACHE_BYTES), for the
    tests' own workers: no test's requests come near it (a test that sizes the cache names
    ``num_blocks`` or ``kv_cache_bytes``)."""
    return EngineConfig(**{"kv_cache_bytes": STACK_KV_CACHE_BYTES} | fields)


def worker_settings(nats_url: str, tiny: TinyOutput, worker_id: str = "w-a", **fields: Any) -> WorkerSettings:
    """A test's own worker's settings: on ``nats_url``, the tiny model, a stack's KV cache
    (``small_engine``, unless ``fields`` give an ``engine``); its Redis is the one the test hands
    it (``redis_url`` unused)."""
    fields.setdefault("engine", small_engine())
    return WorkerSettings(nats_url=nats_url, redis_url="unused", worker_id=worker_id, model=str(tiny.model), **fields)


def sigstop(proc: subprocess.Popen) -> None:
    """SIGSTOP ``proc`` and return once every thread of it has stopped. kill() only marks the stop:
    each thread stops as it next leaves the kernel, and on this VM a nats-server answered a PING
    sent just after the kill() (1 run in 25 under load; a CI failure in a test of a hung server)."""
    proc.send_signal(signal.SIGSTOP)
    deadline = time.monotonic() + 10
    while not all(_state(task) == "T" for task in Path(f"/proc/{proc.pid}/task").iterdir()):
        assert time.monotonic() < deadline, f"pid {proc.pid} did not stop"
        time.sleep(0.001)


def _state(task: Path) -> str:
    with contextlib.suppress(FileNotFoundError):  # a thread that ended meanwhile
        return (task / "stat").read_text().rsplit(")", 1)[1].split()[0]  # after "pid (comm)"
    return "T"


@pytest.fixture(scope="session")
def nats_server() -> Iterator[Server]:
    server = start_nats()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def redis_server() -> Iterator[Server]:
    server = start_redis()
    yield server
    server.stop()


@pytest.fixture(autouse=True)
def ties_by_name(monkeypatch: pytest.MonkeyPatch) -> None:
    """The dispatchers started here break ties among equal workers by name, as they did before each
    had a salt of its own (``state.new_salt``): tests say which of two idle workers takes a request
    ("on a tie the dispatcher picks a-victim"). Those started as processes are salted."""
    monkeypatch.setattr("dlora.services.dispatcher.main.new_salt", lambda: b"")


@pytest.fixture
async def redis(redis_server: Server, nats_server: Server) -> AsyncIterator[Redis]:
    """Redis emptied for the test, and the durable copies (JetStream) of the adapter registry and
    the API keys with it: a dispatcher or gateway would otherwise restore another test's into the
    empty Redis."""
    nc = await nats.connect(nats_server.url)
    await purge(nc, "dlora")
    await purge_keys(nc, "dlora")
    await nc.close()
    client = Redis.from_url(redis_server.url)
    await client.flushdb()
    yield client
    await client.aclose()


@dataclass
class Stack:
    url: str
    gateway: Gateway
    workers: list[WorkerService]
    store: StateStore
    nc: nats.NATS
    tiny: TinyOutput
    dispatcher_nc: nats.NATS  # the dispatcher's own connection: closing it stops the dispatcher
    services: list[asyncio.Task[None]]  # the dispatcher's and the workers' run(): done means dead
    dispatcher: Dispatcher


@pytest.fixture
async def stack(nats_server: Server, redis: Redis, tiny_llama: TinyOutput) -> AsyncIterator[Stack]:
    """The `dlora up` stack, in-process: dispatcher, two workers (dlora policy), gateway."""
    async with run_stack(nats_server, redis, tiny_llama) as running:
        yield running


@pytest.fixture
async def round_robin_stack(nats_server: Server, redis: Redis, tiny_llama: TinyOutput) -> AsyncIterator[Stack]:
    """The same stack dispatching round-robin: every worker takes some of a few requests (by load a
    few short ones may rightly all stay where their adapter is held)."""
    async with run_stack(nats_server, redis, tiny_llama, dispatcher={"dispatch": DispatchMode.ROUND_ROBIN}) as running:
        yield running


@pytest.fixture
async def keyed_stack(nats_server: Server, redis: Redis, tiny_llama: TinyOutput) -> AsyncIterator[Stack]:
    """The same stack with the gateway taking API keys only (``auth = "keys"``)."""
    async with run_stack(nats_server, redis, tiny_llama, auth="keys") as running:
        yield running


async def until_live(http: aiohttp.ClientSession, url: str) -> None:
    """Once the gateway at ``url``, started in-process, answers ``/livez`` (30 s at most)."""
    for _ in range(600):
        try:
            async with http.get(url + "/livez") as r:
                if r.status == 200:
                    return
        except aiohttp.ClientConnectionError:
            await asyncio.sleep(0.05)


@contextlib.asynccontextmanager
async def run_stack(
    nats_server: Server,
    redis: Redis,
    tiny_llama: TinyOutput,
    gateway_nats_url: str = "",
    engine: dict[str, Any] | None = None,
    dispatcher: dict[str, Any] | None = None,
    worker: dict[str, Any] | None = None,
    **gateway: Any,
) -> AsyncIterator[Stack]:
    """The stack, with ``gateway`` settings over the tests' own, ``engine`` over the workers'
    EngineConfig, ``worker`` over their other settings and ``dispatcher`` over the dispatcher's;
    the gateway's NATS connection goes to ``gateway_nats_url`` if given (a proxy the test can
    cut), reconnecting for ever."""
    common = dict(nats_url=nats_server.url, redis_url="unused", log_json=True)
    store = StateStore(redis)
    gw_settings = GatewaySettings(
        **common,
        model=str(tiny_llama.model),
        port=free_port(),
        admin_key=ADMIN_KEY,
        adapter_roots=[str(tiny_llama.adapters_dir)],
        **gateway,
    )
    gw_nc = await nats.connect(gateway_nats_url or nats_server.url, max_reconnect_attempts=-1, reconnect_time_wait=0.2)
    gateway = Gateway(gw_settings, gw_nc, store)
    for name, path in tiny_llama.adapters.items():
        await store.put_adapter(
            check_adapter(name, str(path), gw_settings.adapter_roots, gateway.base_name, gateway.cfg)
        )
    stop = asyncio.Event()
    tasks, conns, workers = [], [gw_nc], []
    disp_nc = await nats.connect(nats_server.url)
    conns.append(disp_nc)
    dispatcher = Dispatcher(DispatcherSettings(**common | (dispatcher or {})), disp_nc, store)
    tasks.append(asyncio.create_task(dispatcher.run(stop)))
    for i in range(2):
        ws = WorkerSettings(
            **common,
            worker_id=f"w{i}",
            model=str(tiny_llama.model),
            engine=small_engine(
                **{"max_loras": 2, "device": os.environ.get("DLORA_TEST_DEVICE", "cpu"), "dtype": "float32"}
                | (engine or {})
            ),
            drain_timeout_s=0.0,  # the whole stack stops at once: no one to drain to, nothing to wait for
            **{"stats_interval_s": 0.1} | (worker or {}),
        )
        nc = await nats.connect(nats_server.url)
        conns.append(nc)
        service = WorkerService(ws, nc, store, build_engine(ws))
        workers.append(service)
        tasks.append(asyncio.create_task(service.run(stop)))
    await gateway.start()
    listener = await listen(gateway.app(), gw_settings)  # as `dlora serve gateway` listens
    url = f"http://127.0.0.1:{gw_settings.port}"
    # Ready: the gateway answering with both workers seen, and the dispatcher heard from both (a CI
    # run under load gave up waiting after 5 s and sent every request to the one it had heard).
    async with aiohttp.ClientSession() as http, asyncio.timeout(60):
        while True:
            async with http.get(f"{url}/healthz") as r:
                if r.status == 200 and (await r.json())["workers"] == 2 and len(dispatcher.workers) == 2:
                    break
            await asyncio.sleep(0.05)
    try:
        yield Stack(url, gateway, workers, store, gw_nc, tiny_llama, disp_nc, tasks, dispatcher)
    finally:
        stop.set()
        await gateway.shutdown()  # as `dlora serve gateway` stops
        await listener.close()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), timeout=10)
        for nc in conns:
            if not nc.is_closed:
                await nc.drain()


async def start_gateway(
    nats_url: str, store: StateStore, model: str, conns: list[nats.NATS], **fields: Any
) -> tuple[str, web.AppRunner]:
    """A gateway on a free loopback port with a NATS connection of its own (added to ``conns``)
    and these settings ``fields``: its URL and its runner (``cleanup()`` stops it)."""
    settings = GatewaySettings(nats_url=nats_url, redis_url="unused", model=model, port=free_port(), **fields)
    nc = await nats.connect(nats_url)
    conns.append(nc)
    gateway = Gateway(settings, nc, store)
    await gateway.start()
    runner = web.AppRunner(gateway.app())
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", settings.port).start()
    return f"http://127.0.0.1:{settings.port}", runner


def spawn_worker(
    nats_url: str, redis_url: str, model: str, worker_id: str, stderr: IO[bytes] | None = None, **env: str
) -> subprocess.Popen[bytes]:
    """``dlora serve worker`` as a process of its own, to be killed or stopped whole; ``env`` adds
    or overrides its ``DLORA_*`` settings; its stderr (its logs) go to ``stderr``, or nowhere."""
    settings = {
        "DLORA_NATS_URL": nats_url,
        "DLORA_REDIS_URL": redis_url,
        "DLORA_MODEL": model,
        "DLORA_WORKER_ID": worker_id,
        "DLORA_STATS_INTERVAL_S": "0.1",
        **STACK_KV_ENV,
    }
    return subprocess.Popen(
        [sys.executable, "-m", "dlora.services.cli", "serve", "worker"],
        env={**os.environ, **settings, **env},
        stdout=subprocess.DEVNULL,
        stderr=stderr or subprocess.DEVNULL,
    )


def spawn_gateway(
    nats_url: str, redis_url: str, model: str, port: int, log: Path, **env: str
) -> subprocess.Popen[bytes]:
    """``dlora serve gateway`` as a process of its own on ``port``, to be killed or stopped whole;
    ``env`` adds or overrides its ``DLORA_*`` settings; its output (its logs) goes to ``log``."""
    settings = {
        "DLORA_NATS_URL": nats_url,
        "DLORA_REDIS_URL": redis_url,
        "DLORA_MODEL": model,
        "DLORA_GATEWAY_PORT": str(port),
    }
    with log.open("wb") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "dlora.services.cli", "serve", "gateway"],
            env={**os.environ, **settings, **env},
            stdout=out,
            stderr=out,
        )


async def sse_events(response: aiohttp.ClientResponse) -> AsyncIterator[Any]:
    """The events of a server-sent stream as they arrive: each ``data:`` line's JSON, and the
    closing ``"[DONE]"`` as that string."""
    async for raw in response.content:
        line = raw.decode().strip()
        if line.startswith("data: "):
            yield line[6:] if line == "data: [DONE]" else json.loads(line[6:])


@contextlib.asynccontextmanager
async def worker_by_hand(
    nats_server: Server, store: StateStore, ws: WorkerSettings
) -> AsyncIterator[tuple[WorkerService, asyncio.Queue[LostRequests]]]:
    """A worker whose loop is not running (its commands taken by hand), and the hand-overs it sends."""
    conns = [await nats.connect(nats_server.url) for _ in range(2)]
    try:
        handed: asyncio.Queue[LostRequests] = asyncio.Queue()

        async def on_lost(msg) -> None:  # type: ignore[no-untyped-def]
            handed.put_nowait(msgspec.json.decode(msg.data, type=LostRequests))

        await conns[1].subscribe(subjects.LOST, cb=on_lost)
        await bus.flush(conns[1])
        yield WorkerService(ws, conns[0], store, build_engine(ws)), handed
    finally:
        for c in conns:
            await c.drain()


@pytest.fixture
def start_redis_here() -> Iterator[Callable[..., Server]]:
    """start_redis, each server it starts stopped after the test, failing or not (a test that failed
    left its servers running: one a SIGSTOP'd Redis)."""
    started: list[Server] = []

    def start(port: int | None = None) -> Server:
        started.append(server := start_redis(port))
        return server

    yield start
    for server in started:
        server.proc.send_signal(signal.SIGCONT)
        server.stop()
