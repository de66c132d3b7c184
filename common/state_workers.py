"""The Redis keys that say which workers live and what they hold: their heartbeats
(``{p}:worker:{id}``) and the adapter placement (``{p}:placement:{adapter}``,
``{p}:placement-of:{worker}``); ``state.py`` lists every key. A part of ``StateStore``."""

from __future__ import annotations

import contextlib
from typing import Any, cast

import msgspec
from redis.asyncio import Redis
from redis.commands.core import AsyncScript

from dlora.common.messages import WorkerStats


class WorkerKeys:
    """``StateStore``'s operations on the workers' heartbeats and placement."""

    r: Redis
    p: str
    _forget_beat: AsyncScript  # (registered by ``StateStore``: state_scripts._FORGET_BEAT_LUA)

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
    async def heartbeat(self, stats: WorkerStats, ttl_s: float) -> WorkerStats | None:
        """Write ``stats`` as its worker's heartbeat (expiring in ``ttl_s`` seconds) and return the
        heartbeat it replaced (None: none, or unreadable), read in the same command (SET ... GET,
        Redis 6.2): whoever else beats under the id is seen at the next beat."""
        stats = msgspec.structs.replace(stats, heartbeat_ttl_s=ttl_s)
        key, value = f"{self.p}:worker:{stats.worker}", msgspec.json.encode(stats)
        return _beat(cast(bytes | None, await self.r.set(key, value, px=int(ttl_s * 1000), get=True)))

    async def now(self) -> float:
        """Redis's clock, in Unix seconds: one clock for every host's processes."""
        seconds, micros = await self.r.time()
        return seconds + micros / 1e6

    async def live_workers(self) -> list[WorkerStats]:
        keys = [k async for k in self.r.scan_iter(match=f"{self.p}:worker:*")]
        values = await self.r.mget(keys) if keys else []
        return sorted(filter(None, map(_beat, values)), key=lambda s: s.worker)

    async def beats(self, ttl_s: float) -> list[tuple[WorkerStats, float]]:
        """Every live worker's last heartbeat, with the seconds since it beat: the TTL it wrote its
        key with (``WorkerStats.heartbeat_ttl_s``; ``ttl_s`` for an older worker that does not say)
        less the key's time left, on Redis's clock (no two hosts' clocks compared). By worker."""
        keys = [k async for k in self.r.scan_iter(match=f"{self.p}:worker:*")]
        return sorted(await self._beats_at(keys, ttl_s), key=lambda sa: sa[0].worker)

    async def beat_of(self, worker: str, ttl_s: float) -> tuple[WorkerStats, float] | None:
        """``worker``'s last heartbeat and the seconds since it beat, as ``beats`` reads them; None
        without one (it expired, or its worker stopped and removed it)."""
        found = await self._beats_at([f"{self.p}:worker:{worker}"], ttl_s)
        return found[0] if found else None

    async def _beats_at(self, keys: list[Any], ttl_s: float) -> list[tuple[WorkerStats, float]]:
        async with self.r.pipeline(transaction=False) as pipe:
            for key in keys:
                pipe.get(key)
                pipe.pttl(key)
            raw = await pipe.execute()
        found: list[tuple[WorkerStats, float]] = []
        for value, left_ms in zip(raw[::2], raw[1::2]):
            if (st := _beat(value)) is not None and left_ms != -2:  # -2, or none: expired since the scan
                age = (st.heartbeat_ttl_s or ttl_s) - left_ms / 1000 if left_ms >= 0 else 0.0
                found.append((st, max(0.0, age)))
        return found

    async def beating(self, worker: str) -> bool:
        """Whether ``worker``'s heartbeat key is there (it wrote one within the TTL)."""
        return bool(await self.r.exists(f"{self.p}:worker:{worker}"))

    async def forget_worker(self, worker: str, incarnation: str) -> bool:
        """Remove that start of ``worker``'s heartbeat and its placement; neither if another start
        of it beats now (its successor under the id). Whether they were removed."""
        if not await self._forget_beat(keys=[f"{self.p}:worker:{worker}"], args=[incarnation]):
            return False
        await self.set_placement(worker, [])
        return True


def _beat(value: bytes | str | None) -> WorkerStats | None:
    """A heartbeat key's value; None for none, or one that does not decode (a version of the
    worker that writes another shape: every live worker was unreadable for it, /healthz a 500)."""
    if value is None:
        return None
    with contextlib.suppress(msgspec.DecodeError):
        return msgspec.json.decode(value, type=WorkerStats)
    return None


def _text(value: bytes | str) -> str:
    """A Redis reply as text (redis-py gives bytes unless the client decodes responses)."""
    return value.decode() if isinstance(value, bytes) else value
