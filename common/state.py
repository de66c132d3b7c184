"""Every Redis key dlora uses, and the operations on them. Nothing else spells a key.

- ``{p}:adapters``             hash  name -> AdapterEntry (JSON): the adapter registry (each name's
                                     current version)
- ``{p}:adapter-versions``     hash  name@version -> AdapterEntry: every version ever registered, for
                                     requests still running on one
- ``{p}:placement:{adapter}``  set   workers that hold the adapter in memory
- ``{p}:placement-of:{worker}`` set  the same, indexed by worker
- ``{p}:worker:{id}``          str   WorkerStats (JSON), expires: a live worker refreshes it
- ``{p}:policy:{worker}``      str   the worker's batching-policy checkpoint (credits, band)
- ``{p}:inflight:{request}``   hash  worker, request (GenerateRequest JSON), chunks delivered,
                                     tokens delivered ("1,2,3," appended per step), recoveries
- ``{p}:inflight-of:{worker}`` set   request ids in flight on a worker (for recovery)
- ``{p}:recovering:{worker}``  str   lock: one dispatcher re-dispatches a lost worker's requests
- ``{p}:lease:{role}``         str   holder of a leader lease (the migrator), expires unless renewed
- ``{p}:lease-epoch:{role}``   str   the lease's epoch, raised at every takeover (plans carry it)
- ``{p}:traffic``              hash  adapter -> decayed request count (placement's traffic shares)
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import msgspec
from redis.asyncio import Redis

from dlora.common.messages import AdapterEntry, GenerateRequest, WorkerStats

PREFIX = "dlora"

# KEYS: the lease, its epoch; ARGV: holder, ttl in ms. Returns the epoch while held, else 0. A
# renewal keeps the epoch; a takeover (also by the same holder after its lease lapsed) raises it
# to at least Redis's clock in milliseconds, so it keeps growing even if the epoch key is lost.
_LEASE_LUA = """
local holder = redis.call('GET', KEYS[1])
if holder ~= false and holder ~= ARGV[1] then
  return 0
end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
local epoch = redis.call('GET', KEYS[2])
if holder ~= false and epoch ~= false then
  return tonumber(epoch)
end
local now = redis.call('TIME')
local next = math.max((tonumber(epoch) or 0) + 1, tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000))
redis.call('SET', KEYS[2], next)
return next
"""

# KEYS: the in-flight hash; ARGV: worker, request JSON, index key prefix, request id, recoveries.
# One round trip: move the record to the worker, keeping the first request and the progress.
# KEYS: the registry hash, the versions hash. ARGV: name, entry, name@version, replace (0/1).
_PUT_ADAPTER_LUA = """
if ARGV[4] == '1' then
  redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
elseif redis.call('HSETNX', KEYS[1], ARGV[1], ARGV[2]) == 0 then
  return 0
end
redis.call('HSET', KEYS[2], ARGV[3], ARGV[2])
return 1
"""

_PUT_INFLIGHT_LUA = """
local old = redis.call('HGET', KEYS[1], 'worker')
if old and old ~= ARGV[1] then
  redis.call('SREM', ARGV[3] .. old, ARGV[4])
end
redis.call('HSET', KEYS[1], 'worker', ARGV[1])
redis.call('HSETNX', KEYS[1], 'request', ARGV[2])
redis.call('HSETNX', KEYS[1], 'chunks', 0)
redis.call('HSETNX', KEYS[1], 'tokens', '')
redis.call('HSET', KEYS[1], 'recoveries', ARGV[5])
redis.call('SADD', ARGV[3] .. ARGV[1], ARGV[4])
"""

# KEYS: in-flight hashes. ARGV: per key, the step's token ids as "1,2,3," or "-" to delete; then the
# index key prefix and the request ids. A record is only updated where it exists (requests sent
# straight to a worker have none).
_PROGRESS_LUA = """
for i, key in ipairs(KEYS) do
  local tokens = ARGV[i]
  if tokens == "-" then
    local worker = redis.call('HGET', key, 'worker')
    if worker then
      redis.call('SREM', ARGV[#KEYS + 1] .. worker, ARGV[#KEYS + 1 + i])
    end
    redis.call('DEL', key)
  elseif redis.call('HEXISTS', key, 'worker') == 1 then
    redis.call('HINCRBY', key, 'chunks', 1)
    local old = redis.call('HGET', key, 'tokens') or ''
    redis.call('HSET', key, 'tokens', old .. tokens)
  end
end
"""


@dataclass(frozen=True)
class Inflight:
    worker: str
    request: GenerateRequest
    chunks: int  # chunks delivered so far: a resume continues the numbering here
    tokens: list[int]  # tokens delivered so far: a resume continues after them
    recoveries: int = 0  # times it was re-dispatched after its worker died (the latest request's count)


class StateStore:
    def __init__(self, redis: Redis, prefix: str = PREFIX) -> None:
        self.r = redis
        self.p = prefix
        self._progress = redis.register_script(_PROGRESS_LUA)
        self._lease = redis.register_script(_LEASE_LUA)
        self._put_inflight = redis.register_script(_PUT_INFLIGHT_LUA)
        self._put_adapter = redis.register_script(_PUT_ADAPTER_LUA)

    # ---- adapter registry ---------------------------------------------------------------
    async def put_adapter(self, entry: AdapterEntry, replace: bool = False) -> bool:
        """Register ``entry`` atomically: False if its name is taken (unless ``replace``). Every
        version stays findable by name and version, for requests still running on it."""
        return bool(
            await self._put_adapter(
                keys=[f"{self.p}:adapters", f"{self.p}:adapter-versions"],
                args=[entry.name, msgspec.json.encode(entry), f"{entry.name}@{entry.version}", int(replace)],
            )
        )

    async def get_adapter(self, name: str, version: str | None = None) -> AdapterEntry | None:
        """The registered adapter of that name, or a given version of it (registered now or before)."""
        if version is None or version == "":  # unversioned: entries registered before versions existed
            raw = await self.r.hget(f"{self.p}:adapters", name)
        else:
            raw = await self.r.hget(f"{self.p}:adapter-versions", f"{name}@{version}")
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
        for name in {_text(n) for n in old} - set(adapters):
            pipe.srem(f"{self.p}:placement:{name}", worker)
        for name in adapters:
            pipe.sadd(f"{self.p}:placement:{name}", worker)
        pipe.delete(f"{self.p}:placement-of:{worker}")
        if adapters:
            pipe.sadd(f"{self.p}:placement-of:{worker}", *adapters)
        await pipe.execute()

    async def workers_with(self, adapter: str) -> set[str]:
        return {_text(w) for w in await self.r.smembers(f"{self.p}:placement:{adapter}")}

    # ---- worker heartbeats --------------------------------------------------------------
    async def heartbeat(self, stats: WorkerStats, ttl_s: float) -> None:
        await self.r.set(f"{self.p}:worker:{stats.worker}", msgspec.json.encode(stats), px=int(ttl_s * 1000))

    async def live_workers(self) -> list[WorkerStats]:
        keys = [k async for k in self.r.scan_iter(match=f"{self.p}:worker:*")]
        values = await self.r.mget(keys) if keys else []
        return sorted(
            (msgspec.json.decode(v, type=WorkerStats) for v in values if v is not None), key=lambda s: s.worker
        )

    async def forget_worker(self, worker: str) -> None:
        await self.r.delete(f"{self.p}:worker:{worker}")
        await self.set_placement(worker, [])

    # ---- traffic shares -------------------------------------------------------------------
    async def save_traffic(self, counts: dict[str, float]) -> None:
        pipe = self.r.pipeline()
        pipe.delete(f"{self.p}:traffic")
        if counts:
            pipe.hset(f"{self.p}:traffic", mapping={a: repr(c) for a, c in counts.items()})
        await pipe.execute()

    async def load_traffic(self) -> dict[str, float]:
        return {_text(k): float(v) for k, v in (await self.r.hgetall(f"{self.p}:traffic")).items()}

    # ---- leader leases -------------------------------------------------------------------
    async def hold_lease(self, role: str, holder: str, ttl_s: float) -> int:
        """Take the ``role`` lease if it is free, renew it if ``holder`` has it. Returns the lease's
        epoch while held (it counts takeovers, so what a deposed holder sends can be told from its
        successor's), 0 when another holds it."""
        keys = [f"{self.p}:lease:{role}", f"{self.p}:lease-epoch:{role}"]
        return int(await self._lease(keys=keys, args=[holder, int(ttl_s * 1000)]))

    async def lease_holder(self, role: str) -> str | None:
        raw = await self.r.get(f"{self.p}:lease:{role}")
        return None if raw is None else _text(raw)

    async def release_lease(self, role: str, holder: str) -> None:
        if await self.lease_holder(role) == holder:
            await self.r.delete(f"{self.p}:lease:{role}")

    # ---- policy checkpoints -------------------------------------------------------------
    async def save_policy(self, worker: str, state: dict[str, Any]) -> None:
        await self.r.set(f"{self.p}:policy:{worker}", json.dumps(state))

    async def load_policy(self, worker: str) -> dict[str, Any] | None:
        raw = await self.r.get(f"{self.p}:policy:{worker}")
        return None if raw is None else json.loads(raw)

    # ---- in-flight requests -------------------------------------------------------------
    async def put_inflight(self, request: GenerateRequest, worker: str) -> None:
        """Record a request as running on ``worker``. On a resume elsewhere only the worker (and the
        recovery count) changes: the first request and the progress since it stay, so a second
        resume counts right."""
        await self._put_inflight(
            keys=[f"{self.p}:inflight:{request.request_id}"],
            args=[
                worker,
                msgspec.json.encode(request),
                f"{self.p}:inflight-of:",
                request.request_id,
                request.recoveries,
            ],
        )

    async def record_progress(self, tokens: dict[str, list[int]], finished: list[str]) -> None:
        """One round trip per step: the tokens each running request was sent, and the records of
        finished ones dropped."""
        if not tokens and not finished:
            return
        ids = [*tokens, *finished]
        keys = [f"{self.p}:inflight:{rid}" for rid in ids]
        args = ["".join(f"{t}," for t in ts) for ts in tokens.values()] + ["-"] * len(finished)
        await self._progress(keys=keys, args=[*args, f"{self.p}:inflight-of:", *ids])

    async def get_inflight(self, request_id: str) -> Inflight | None:
        raw = await self.r.hgetall(f"{self.p}:inflight:{request_id}")
        if not raw:
            return None
        tokens = [int(t) for t in _text(raw.get(b"tokens", b"")).split(",") if t]
        return Inflight(
            worker=_text(raw[b"worker"]),
            request=msgspec.json.decode(raw[b"request"], type=GenerateRequest),
            chunks=int(raw.get(b"chunks", 0)),
            tokens=tokens,
            recoveries=int(raw.get(b"recoveries", 0)),
        )

    async def inflight_on(self, worker: str) -> list[str]:
        return sorted(_text(m) for m in await self.r.smembers(f"{self.p}:inflight-of:{worker}"))

    async def claim_recovery(self, worker: str, ttl_s: float = 30.0) -> bool:
        """True for exactly one caller per lost worker (within ``ttl_s``)."""
        return bool(await self.r.set(f"{self.p}:recovering:{worker}", "1", nx=True, px=int(ttl_s * 1000)))

    async def delete_inflight(self, request_id: str) -> None:
        key = f"{self.p}:inflight:{request_id}"
        worker = await self.r.hget(key, "worker")
        if worker is not None:
            await self.r.srem(f"{self.p}:inflight-of:{_text(worker)}", request_id)
        await self.r.delete(key)


def _text(value: bytes | str) -> str:
    """A Redis reply as text (redis-py gives bytes unless the client decodes responses)."""
    return value.decode() if isinstance(value, bytes) else value
