"""What ``dlora up``'s start asks of the stack it started, over its NATS, Redis and HTTP: the
command line's adapters registered, the worker ids already beating (another stack's, on a Redis
it was given), and the wait until the gateway counts its workers live."""

from __future__ import annotations

import json
import subprocess
import time
import urllib.request
from collections.abc import Callable, Collection
from pathlib import Path

import nats

from dlora.common.redis_client import redis_client
from dlora.common.registry import AdapterRegistry
from dlora.common.state import StateStore
from dlora.common.urls import nats_servers
from dlora.model.config import ModelConfig
from dlora.services.gateway.admin import check_adapter
from dlora.services.gateway.settings import GatewaySettings


async def register_adapters(
    s: GatewaySettings, model: Path, loras: dict[str, str], roots: list[str], base_name: str
) -> None:
    """Register the command line's adapters, as the gateway (its NATS and Redis credentials)."""
    cfg = ModelConfig.from_dir(model)
    redis = redis_client(s.redis_url, username=s.redis_username, password=s.redis_password)
    nc = await nats.connect(nats_servers(s.nats_url), user=s.nats_user or None, password=s.nats_password or None)
    try:
        registry = await AdapterRegistry.open(nc, StateStore(redis, s.redis_prefix), s.nats_kv_replicas)
        for name, path in loras.items():
            # the command line is the authority over an entry a Redis of its own may still hold
            await registry.register(check_adapter(name, path, roots, base_name, cfg), replace=True)
    finally:
        await nc.close()
        await redis.aclose()


async def ids_in_use(s: GatewaySettings) -> set[str]:
    """The worker ids live workers beat under in ``s``'s Redis (as the gateway)."""
    redis = redis_client(s.redis_url, username=s.redis_username, password=s.redis_password)
    try:
        return {st.worker for st in await StateStore(redis, s.redis_prefix).live_workers()}
    finally:
        await redis.aclose()


def worker_ids(n: int, taken: Collection[str]) -> list[str]:
    """``n`` worker ids, worker-0 on, passing over those ``taken``: under ``dlora up`` twice against
    one NATS and Redis each started worker-0..N-1, and the second's refused to start (one_id.py)."""
    free = (f"worker-{i}" for i in range(n + len(taken)))
    return [w for w in free if w not in taken][:n]


def wait_ready(
    url: str, workers: int, procs: list[subprocess.Popen], timeout: float = 180.0, own: Callable[[], bool] | None = None
) -> None:
    """Until the gateway at ``url`` counts ``workers`` live workers, or ``own()`` says this stack's
    are beating (a Redis shared with another stack: the gateway counts theirs, and a crashed one's
    key until it expires, which left a stack waiting for a worker that never came: a review)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any(p.poll() is not None for p in procs):
            raise RuntimeError("a service exited during start-up (see its log above)")
        try:
            with urllib.request.urlopen(f"{url}/healthz", timeout=1) as r:
                if own() if own is not None else json.load(r)["workers"] >= workers:
                    return
        except OSError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"the stack was not ready within {timeout:.0f} s")
