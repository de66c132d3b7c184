"""Every Redis key dlora uses, and the operations on them. Nothing else spells a key.

- ``{p}:adapters``             hash  name -> AdapterEntry (JSON): the adapter registry
- ``{p}:placement:{adapter}``  set   workers that hold the adapter in memory
- ``{p}:placement-of:{worker}`` set  the same, indexed by worker
- ``{p}:worker:{id}``          str   WorkerStats (JSON), expires: a live worker refreshes it
- ``{p}:policy:{worker}``      str   the worker's batching-policy checkpoint (credits, band)
- ``{p}:inflight:{request}``   hash  worker, request (GenerateRequest JSON), acked tokens
"""

from __future__ import annotations

import json
from typing import Any

import msgspec
from redis.asyncio import Redis

from dlora.common.messages import AdapterEntry, GenerateRequest, WorkerStats

PREFIX = "dlora"

# KEYS: in-flight hashes; ARGV: tokens to add, or -1 to delete the record.
_PROGRESS_LUA = """
for i, key in ipairs(KEYS) do
  local n = tonumber(ARGV[i])
  if n < 0 then
    redis.call('DEL', key)
  elseif redis.call('HEXISTS', key, 'worker') == 1 then
    redis.call('HINCRBY', key, 'acked', n)
  end
end
"""


class StateStore:
    def __init__(self, redis: Redis, prefix: str = PREFIX) -> None:
        self.r = redis
        self.p = prefix
        self._progress = redis.register_script(_PROGRESS_LUA)

    # ---- adapter registry ---------------------------------------------------------------
    async def put_adapter(self, entry: AdapterEntry) -> None:
        await self.r.hset(f"{self.p}:adapters", entry.name, msgspec.json.encode(entry))

    async def get_adapter(self, name: str) -> AdapterEntry | None:
        raw = await self.r.hget(f"{self.p}:adapters", name)
        return None if raw is None else msgspec.json.decode(raw, type=AdapterEntry)

    async def list_adapters(self) -> list[AdapterEntry]:
        raw = await self.r.hgetall(f"{self.p}:adapters")
        return sorted((msgspec.json.decode(v, type=AdapterEntry) for v in raw.values()), key=lambda e: e.name)

    async def delete_adapter(self, name: str) -> bool:
        return bool(await self.r.hdel(f"{self.p}:adapters", name))

    # ---- placement ----------------------------------------------------------------------
    async def set_placement(self, worker: str, adapters: list[str]) -> None:
        """Record exactly which adapters ``worker`` holds now."""
        old = await self.r.smembers(f"{self.p}:placement-of:{worker}")
        pipe = self.r.pipeline()
        for name in {n.decode() for n in old} - set(adapters):
            pipe.srem(f"{self.p}:placement:{name}", worker)
        for name in adapters:
            pipe.sadd(f"{self.p}:placement:{name}", worker)
        pipe.delete(f"{self.p}:placement-of:{worker}")
        if adapters:
            pipe.sadd(f"{self.p}:placement-of:{worker}", *adapters)
        await pipe.execute()

    async def workers_with(self, adapter: str) -> set[str]:
        return {w.decode() for w in await self.r.smembers(f"{self.p}:placement:{adapter}")}

    # ---- worker heartbeats --------------------------------------------------------------
    async def heartbeat(self, stats: WorkerStats, ttl_s: float) -> None:
        await self.r.set(f"{self.p}:worker:{stats.worker}", msgspec.json.encode(stats), px=int(ttl_s * 1000))

    async def live_workers(self) -> list[WorkerStats]:
        keys = [k async for k in self.r.scan_iter(match=f"{self.p}:worker:*")]
        values = await self.r.mget(keys) if keys else []
        return sorted((msgspec.json.decode(v, type=WorkerStats) for v in values if v is not None), key=lambda s: s.worker)

    async def forget_worker(self, worker: str) -> None:
        await self.r.delete(f"{self.p}:worker:{worker}")
        await self.set_placement(worker, [])

    # ---- policy checkpoints -------------------------------------------------------------
    async def save_policy(self, worker: str, state: dict[str, Any]) -> None:
        await self.r.set(f"{self.p}:policy:{worker}", json.dumps(state))

    async def load_policy(self, worker: str) -> dict[str, Any] | None:
        raw = await self.r.get(f"{self.p}:policy:{worker}")
        return None if raw is None else json.loads(raw)

    # ---- in-flight requests -------------------------------------------------------------
    async def put_inflight(self, request: GenerateRequest, worker: str) -> None:
        await self.r.hset(
            f"{self.p}:inflight:{request.request_id}",
            mapping={"worker": worker, "request": msgspec.json.encode(request), "acked": 0},
        )

    async def record_progress(self, acked: dict[str, int], finished: list[str]) -> None:
        """One round trip per step: more tokens delivered for running requests (only where an
        in-flight record exists: requests sent straight to a worker have none), finished ones gone."""
        if not acked and not finished:
            return
        keys = [f"{self.p}:inflight:{rid}" for rid in [*acked, *finished]]
        counts = [*acked.values(), *([-1] * len(finished))]
        await self._progress(keys=keys, args=counts)


    async def get_inflight(self, request_id: str) -> tuple[str, GenerateRequest, int] | None:
        raw = await self.r.hgetall(f"{self.p}:inflight:{request_id}")
        if not raw:
            return None
        return raw[b"worker"].decode(), msgspec.json.decode(raw[b"request"], type=GenerateRequest), int(raw[b"acked"])

    async def delete_inflight(self, request_id: str) -> None:
        await self.r.delete(f"{self.p}:inflight:{request_id}")
