"""Every Redis key dlora uses, and the operations on them (those on the workers' heartbeats and
placement in ``state_workers.py``). Nothing else spells a key.

- ``{p}:adapters``             hash  name -> AdapterEntry (JSON): the adapter registry (each name's
                                     current version)
- ``{p}:adapter-versions``     hash  name@version -> AdapterEntry: every version registered, for
                                     requests still running on one, until purged
- ``{p}:adapter-removals``     hash  name -> AdapterRemoval (JSON): the registration removed, until
                                     the name is registered again (``registry.py``)
- ``{p}:adapter-removing:{name}`` str  a removal of the name under way (written with its record,
                                     expires): another process's merge leaves it to its remover
- ``{p}:adapter-versions-retired`` zset  name@version -> when it stopped being registered (Unix
                                     seconds): purged some time later (``purge_retired``)
- ``{p}:placement:{adapter}``  set   workers that hold the adapter in memory
- ``{p}:placement-of:{worker}`` set  the same, indexed by worker
- ``{p}:worker:{id}``          str   WorkerStats (JSON), expires: a live worker refreshes it
- ``{p}:stopped:{id}:{incarnation}`` str  that start of the worker drained and stopped cleanly
                                     (records left naming it were not lost in a death), expires
- ``{p}:policy:{worker}``      str   the worker's batching-policy checkpoint (credits, band),
                                     expires a day after the last
- ``{p}:inflight:{request}``   hash  worker, incarnation (of the worker it was sent to, "" if
                                     unknown), request (the first GenerateRequest, JSON), next (the
                                     next chunk's seq), tokens delivered ("1,2,3," appended per
                                     step), held (of those, how many await their text), recoveries
                                     (the attempt running: the fencing token), deaths (workers that
                                     died with it), taken (the attempt its worker took up: only then
                                     is that worker's loss the request's death), marks (the worker,
                                     when it marks what it takes up), handed (workers that
                                     handed it back, JSON: worker -> Unix seconds), at (ms, Redis
                                     clock); expires unless its worker refreshes it
- ``{p}:inflight-of:{worker}`` set   request ids in flight on a worker (for recovery)
- ``{p}:recovering:{loss}``    str   lock: one dispatcher re-dispatches a lost worker's requests
- ``{p}:lease:{role}``         str   holder of a leader lease (the migrator), expires unless renewed
- ``{p}:lease-epoch:{role}``   str   the lease's epoch, raised at every takeover (plans carry it)
- ``{p}:epoch``                str   a token of the data set (``data_epoch``): new after the data went
- ``{p}:traffic``              hash  adapter -> decayed request count (placement's traffic shares)
- ``{p}:api-keys``             hash  key digest (SHA-256, hex) -> ApiKey (JSON): inference API keys,
                                     revoked ones kept (``common/apikeys.py``)
- ``{p}:api-key-ids``          hash  key id -> its digest (revocation and lookup by id)
- ``{p}:response:{tenant}:{id}`` hash a stored Responses API response, under its API key's
                                     tenant ("" without keys): tenant, response (JSON), input (its
                                     conversation's items, JSON), stream (a streamed background
                                     response's run token: who may append its events); expires
                                     (``state_responses.py``, ``gateway/responses_store.py``)
- ``{p}:response-holders:{tenant}:{item}`` zset the stored responses that hold an item
                                     (``item_reference``'s index), each scored by its expiry (ms,
                                     Redis's clock), written with them; gone with the last
- ``{p}:response-item:{tenant}:{item}`` str an older gateway's index entry (one holder): read
                                     where an item's holders' set has none left, left to its TTL
- ``{p}:response-events:{tenant}:{id}`` list a streamed background response's SSE frames, in
                                     order (index = sequence_number), its TTL, appended only
                                     by the run its record names (``gateway/background.py``)
- ``{p}:response-lease:{tenant}:{id}`` str the gateway running a background response (its id),
                                     expires unless that run renews it: a reader that finds the
                                     response queued or in_progress with none ends it ``failed``
                                     (and its stream, with ``response.failed``); one whose hash
                                     lacks ``leased`` (an older gateway's) only a span after its
                                     ``seen`` (ms on Redis's clock: when a reader first found it)
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, cast

import msgspec
from redis.asyncio import Redis

from dlora.common.inflight import Copy, Inflight, Sent
from dlora.common.messages import AdapterEntry, AdapterRemoval, ApiKey, GenerateRequest
from dlora.common.state_responses import ResponseKeys
from dlora.common.state_scripts import (
    _DELETE_IF_LUA,
    _DELETE_INFLIGHT_LUA,
    _FENCED_LUA,
    _FORGET_BEAT_LUA,
    _FORGET_VERSION_LUA,
    _HANDED_BACK_LUA,
    _LEASE_LUA,
    _PROGRESS_LUA,
    _PUT_BOTH_LUA,
    _PUT_INFLIGHT_LUA,
    _SWAP_ADAPTER_LUA,
    _SWEEP_LUA,
    _TAKEN_LUA,
)
from dlora.common.state_workers import WorkerKeys, _text

PREFIX = "dlora"

# Seconds an in-flight record lives without its worker refreshing it: a record nobody holds (its
# worker and every dispatcher gone meanwhile) is not kept, or replayed, for ever.
INFLIGHT_TTL_S = 600.0
# Seconds a worker's policy checkpoint outlives its last heartbeat (a restart within takes it up).
POLICY_TTL_S = 86400.0


class StateStore(WorkerKeys, ResponseKeys):
    """Every Redis key dlora uses (the module's list) and the operations on them."""

    def __init__(self, redis: Redis, prefix: str = PREFIX) -> None:
        self.r = redis
        self.p = prefix
        self._progress = redis.register_script(_PROGRESS_LUA)
        self._lease = redis.register_script(_LEASE_LUA)
        self._put_inflight = redis.register_script(_PUT_INFLIGHT_LUA)
        self._taken = redis.register_script(_TAKEN_LUA)
        self._handed_back = redis.register_script(_HANDED_BACK_LUA)
        self._fenced = redis.register_script(_FENCED_LUA)
        self._sweep = redis.register_script(_SWEEP_LUA)
        self._delete_inflight = redis.register_script(_DELETE_INFLIGHT_LUA)
        self._put_both = redis.register_script(_PUT_BOTH_LUA)
        self._swap_adapter = redis.register_script(_SWAP_ADAPTER_LUA)
        self._forget_version = redis.register_script(_FORGET_VERSION_LUA)
        self._delete_if = redis.register_script(_DELETE_IF_LUA)
        self._forget_beat = redis.register_script(_FORGET_BEAT_LUA)

    # ---- adapter registry ---------------------------------------------------------------
    async def put_adapter(self, entry: AdapterEntry, replace: bool = False, restoring: bool = False) -> bool:
        """Register ``entry`` atomically: False if its name is taken (unless ``replace``); a
        ``restoring`` one (a registry's restore putting back what it read) also if the name now
        holds a registration as new or newer, or a removal of it or a later one is recorded
        (``put_removal``): a removal, or a removal and a registration again, made since it read.
        Every version stays findable by name and version, for requests still running on it,
        until ``forget_version``."""
        keys = [f"{self.p}:adapters", f"{self.p}:adapter-versions"]
        data = msgspec.json.encode(entry)
        args: list[bytes | str | int] = [entry.name, data, f"{entry.name}@{entry.version}", data, int(replace)]
        if restoring:
            keys.append(f"{self.p}:adapter-removals")
            args.append(repr(entry.created))
        return bool(await self._put_both(keys=keys, args=args))

    async def swap_adapter(self, entry: AdapterEntry, replace: bool = False) -> tuple[bool, AdapterEntry | None]:
        """``put_adapter``, atomically returning the registration it replaced too (None: none)."""
        args: list[bytes | str | int] = [
            entry.name,
            msgspec.json.encode(entry),
            f"{entry.name}@{entry.version}",
            int(replace),
        ]
        done, old = await self._swap_adapter(keys=[f"{self.p}:adapters", f"{self.p}:adapter-versions"], args=args)
        return bool(done), msgspec.json.decode(old, type=AdapterEntry) if old else None

    async def get_adapter(self, name: str, version: str | None = None) -> AdapterEntry | None:
        """The registered adapter of that name, or a given version of it (registered now or before)."""
        if version is None or version == "":  # unversioned: entries registered before versions existed
            raw = await self.r.hget(f"{self.p}:adapters", name)
        else:
            raw = await self.r.hget(f"{self.p}:adapter-versions", f"{name}@{version}")
        return None if raw is None else msgspec.json.decode(raw, type=AdapterEntry)

    async def has_adapters(self) -> bool:
        return bool(await self.r.hlen(f"{self.p}:adapters"))

    async def put_versions(self, entries: Iterable[AdapterEntry], retired: Iterable[AdapterEntry], at: float) -> None:
        """Make versions findable by name and version, without registering them (a restore), and
        mark ``retired`` ones retired at ``at`` (``retire_version``): one round trip for all."""
        mapping = {f"{e.name}@{e.version}": msgspec.json.encode(e) for e in entries}
        retiring = {f"{e.name}@{e.version}": at for e in retired}
        async with self.r.pipeline(transaction=False) as pipe:
            if mapping:
                pipe.hset(f"{self.p}:adapter-versions", mapping=mapping)  # type: ignore[arg-type]  # bytes values
            if retiring:
                pipe.zadd(f"{self.p}:adapter-versions-retired", retiring)  # type: ignore[arg-type]  # str members
            await pipe.execute()

    async def list_adapters(self) -> list[AdapterEntry]:
        raw = await self.r.hgetall(f"{self.p}:adapters")
        return sorted((msgspec.json.decode(v, type=AdapterEntry) for v in raw.values()), key=lambda e: e.name)

    async def delete_adapter(
        self, name: str, only: AdapterEntry | None = None, retire: tuple[str, float] | None = None
    ) -> bool:
        """Unregister ``name``; with ``only``, only while the registration is that one (its
        ``created`` and version, checked in the same script: an entry an older dlora wrote lacks
        later fields, so its bytes are not ours), and then, with ``retire`` (version, Unix
        seconds), that version retired in the same script (``retire_version``). True if it was
        deleted."""
        if only is None:
            return bool(await self.r.hdel(f"{self.p}:adapters", name))
        keys, args = [f"{self.p}:adapters"], [name, repr(only.created), only.version]
        if retire is not None:
            keys.append(f"{self.p}:adapter-versions-retired")
            args += [repr(retire[1]), f"{name}@{retire[0]}"]
        return bool(await self._delete_if(keys=keys, args=args))

    async def put_removal(self, removal: AdapterRemoval) -> None:
        await self.r.hset(f"{self.p}:adapter-removals", removal.name, msgspec.json.encode(removal))

    async def removing(self, name: str, under_way_ms: int) -> None:
        """Mark a removal of ``name`` under way for ``under_way_ms`` (Redis's clock: no host's is
        compared), or, at 0, over."""
        key = f"{self.p}:adapter-removing:{name}"
        await (self.r.set(key, "1", px=under_way_ms) if under_way_ms else self.r.delete(key))

    async def under_way(self, name: str) -> bool:
        """Whether a removal of ``name`` is under way (``removing``'s mark, not yet expired)."""
        return bool(await self.r.exists(f"{self.p}:adapter-removing:{name}"))

    async def removals(self) -> dict[str, AdapterRemoval]:
        raw = await self.r.hgetall(f"{self.p}:adapter-removals")
        return {_text(k): msgspec.json.decode(v, type=AdapterRemoval) for k, v in raw.items()}

    async def forget_removal(self, name: str) -> None:
        await self.r.hdel(f"{self.p}:adapter-removals", name)

    async def retire_version(self, name: str, version: str, at: float) -> None:
        """A version of ``name`` stopped being the registered one at ``at`` (Unix seconds): it is
        purged once no in-flight record can still name it (``purge_retired``)."""
        await self.r.zadd(f"{self.p}:adapter-versions-retired", {f"{name}@{version}": at})

    async def retired(self, before: float) -> list[tuple[str, str]]:
        """(name, version) of the versions retired before ``before`` (Unix seconds)."""
        keys = await self.r.zrangebyscore(f"{self.p}:adapter-versions-retired", "-inf", before)
        return [(name, version) for name, _, version in (_text(k).rpartition("@") for k in keys)]  # type: ignore[arg-type]  # no scores asked: names only

    async def forget_version(self, name: str, version: str) -> bool:
        """A retired version is done with: no lookup finds it any more, unless it is registered
        again (then it is only no longer retired), checked in the same script. True if it was
        forgotten."""
        keys = [f"{self.p}:adapters", f"{self.p}:adapter-versions", f"{self.p}:adapter-versions-retired"]
        return bool(await self._forget_version(keys=keys, args=[name, version]))

    # ---- API keys ------------------------------------------------------------------------
    async def put_api_key(self, key: ApiKey, replace: bool = True) -> bool:
        """Store ``key`` under its digest and id, atomically. Without ``replace`` a key whose digest
        is already stored is left as it is (False)."""
        return bool(
            await self._put_both(
                keys=[f"{self.p}:api-keys", f"{self.p}:api-key-ids"],
                args=[key.digest, msgspec.json.encode(key), key.id, key.digest, int(replace)],
            )
        )

    async def api_key_by_digest(self, digest: str) -> ApiKey | None:
        """The key whose SHA-256 digest is ``digest`` (revoked or not), or None."""
        raw = await self.r.hget(f"{self.p}:api-keys", digest)
        return None if raw is None else msgspec.json.decode(raw, type=ApiKey)

    async def api_key(self, key_id: str) -> ApiKey | None:
        """The key with that id (revoked or not), or None."""
        digest = await self.r.hget(f"{self.p}:api-key-ids", key_id)
        return None if digest is None else await self.api_key_by_digest(_text(digest))

    async def list_api_keys(self) -> list[ApiKey]:
        """Every key, revoked ones too, oldest first."""
        raw = await self.r.hgetall(f"{self.p}:api-keys")
        return sorted((msgspec.json.decode(v, type=ApiKey) for v in raw.values()), key=lambda k: (k.created, k.id))

    async def has_api_keys(self) -> bool:
        return bool(await self.r.hlen(f"{self.p}:api-keys"))

    # ---- clean stops (heartbeats and placement: ``state_workers.WorkerKeys``) -------------
    async def mark_stopped(self, worker: str, incarnation: str) -> None:
        """That start of ``worker`` drained and stopped cleanly: a record still naming it was handed
        back and the message lost (no dispatcher up), not lost in a death. Kept as long as a record."""
        await self.r.set(f"{self.p}:stopped:{worker}:{incarnation}", b"1", px=int(INFLIGHT_TTL_S * 1000))

    async def stopped_cleanly(self, worker: str, incarnation: str) -> bool:
        return bool(incarnation) and bool(await self.r.exists(f"{self.p}:stopped:{worker}:{incarnation}"))

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
        """``worker``'s policy checkpoint (every heartbeat), for a restart under its id to take up;
        kept ``POLICY_TTL_S`` after the last (one key per worker id ever seen stayed for good)."""
        await self.r.set(f"{self.p}:policy:{worker}", json.dumps(state), ex=int(POLICY_TTL_S))

    async def bound_policies(self) -> int:
        """Give every policy checkpoint without an expiry ``POLICY_TTL_S`` (an older version wrote
        them without one, and one of a worker id never run again stayed for good: a helper's
        upgrade trial). How many it gave one."""
        bounded = 0
        async for key in self.r.scan_iter(match=f"{self.p}:policy:*", count=1000):
            bounded += bool(await self.r.expire(key, int(POLICY_TTL_S), nx=True))
        return bounded

    async def load_policy(self, worker: str) -> dict[str, Any] | None:
        raw = await self.r.get(f"{self.p}:policy:{worker}")
        return None if raw is None else json.loads(raw)

    # ---- in-flight requests -------------------------------------------------------------
    async def put_inflight(
        self,
        request: GenerateRequest,
        worker: str,
        expect: tuple[str, int] | None = None,
        new: bool = False,
        incarnation: str = "",
        died: bool = False,
        marks_taken: bool = False,
    ) -> bool:
        """Record a request as running on ``worker`` as attempt ``request.recoveries``. On a resume
        elsewhere only the worker, the attempt and the time change: the first request and the
        progress since it stay, so a second resume counts right. With ``expect`` (the worker and
        attempt the record must still name) it is a compare-and-set: False, and nothing written,
        when the record is gone or another re-dispatch came first. With ``new`` (a request's first
        dispatch) False, and nothing written, when a record under its id exists: another request
        in flight has that id. ``incarnation``: the start of ``worker`` it is sent to, where known
        (a hand-back then tells a message that never came from a death); ``died``: a re-dispatch
        after the worker running it died (or hung), counted in the record's ``deaths``;
        ``marks_taken``: ``worker`` marks what it takes up (``WorkerStats.marks_taken``; not said:
        an older worker, whose loss then counts as the request's death whether it took it or not)."""
        args: list[str | int] = [
            worker,
            msgspec.json.encode(request).decode(),
            f"{self.p}:inflight-of:",
            request.request_id,
            request.recoveries,
            int(INFLIGHT_TTL_S * 1000),
            request.next_seq,
            incarnation,
            int(died),
            int(marks_taken),
        ]
        if expect is not None:
            args += [expect[0], expect[1]]
        elif new:
            args += ["", ""]
        return bool(await self._put_inflight(keys=[f"{self.p}:inflight:{request.request_id}"], args=args))

    async def record_progress(
        self, worker: str, running: dict[str, Sent], finished: dict[str, int], earlier: Sequence[tuple[str, Sent]] = ()
    ) -> set[str]:
        """One round trip per step from ``worker``: the chunk each running request was sent, and
        the records of finished ones (id -> attempt) dropped. ``earlier``: chunks an earlier write
        that failed did not record, written first, in order (a record missing a step would have a
        resume send that step's tokens again).
        Returns the ids whose record names another worker or attempt: those copies are fenced, their
        writes refused, and the worker must drop them."""
        if not running and not finished and not earlier:
            return set()
        chunks = [*earlier, *running.items()]
        entries = [
            (rid, s.attempt, s.seq, "".join(f"{t}," for t in s.token_ids), s.held, s.held_text, *s.spans)
            for rid, s in chunks
        ]
        entries += [(rid, a, 0, "-", 0, "", 0, "0") for rid, a in finished.items()]
        keys = [f"{self.p}:inflight:{rid}" for rid, *_ in entries]
        args: list[str | int] = [worker, f"{self.p}:inflight-of:", int(INFLIGHT_TTL_S * 1000)]
        args += [x for entry in entries for x in entry]
        return {_text(rid) for rid in await self._progress(keys=keys, args=args)}

    async def mark_taken(self, worker: str, attempts: dict[str, int]) -> None:
        """Mark the records of requests ``worker`` takes up (id -> attempt) as taken by it, before
        it works on them: only a taken attempt's loss counts as a death (``Inflight.taken``). A
        record that names another worker or attempt, or none, is left alone. One round trip."""
        if attempts:
            keys = [f"{self.p}:inflight:{rid}" for rid in attempts]
            await self._taken(keys=keys, args=[worker, *attempts.values()])

    async def note_handed_back(self, request_id: str, expect: tuple[str, int], handed: Mapping[str, float]) -> bool:
        """Record ``handed`` (worker -> Unix seconds) as the workers that handed ``request_id`` back,
        while its record names ``expect`` (the worker and attempt handed back). False, and nothing
        written, when the record is gone or names another (another dispatcher re-dispatched it)."""
        args: list[str | int] = [*expect, msgspec.json.encode(handed).decode()]
        return bool(await self._handed_back(keys=[f"{self.p}:inflight:{request_id}"], args=args))

    async def fenced(self, worker: str, copies: dict[str, Copy]) -> set[str]:
        """The ids (of ``copies``) whose copy here is fenced: the record names another worker or
        attempt, or is gone though the copy was recorded before it was sent (the request ended
        elsewhere, or was given up). Read only: a worker asks before it moves a request, and
        before it sends anything after a stall."""
        if not copies:
            return set()
        ids = list(copies)
        keys = [f"{self.p}:inflight:{rid}" for rid in ids]
        found = await self._fenced(keys=keys, args=[worker, *(x for a, rec in copies.values() for x in (a, int(rec)))])
        return {ids[int(i) - 1] for i in found}

    async def sweep_inflight(
        self, worker: str, incarnation: str, held: set[str], grace_s: float
    ) -> tuple[dict[str, int], set[str]]:
        """``worker``'s reconciliation with its records: refreshes the expiry of the records of the
        requests it ``held``, forgets index entries whose record expired or moved on, and returns
        the records (id -> attempt) naming it that it does not hold and that changed hands
        ``grace_s`` ago or more (0: all): requests lost with a previous incarnation of the worker, or whose
        message never arrived. With them, the ids among them recorded as sent to this very
        ``incarnation``: their message never came (no death)."""
        raw = await self._sweep(
            keys=[f"{self.p}:inflight-of:{worker}"],
            args=[worker, f"{self.p}:inflight:", int(INFLIGHT_TTL_S * 1000), int(grace_s * 1000), incarnation, *held],
        )
        lost = {_text(raw[i]): int(raw[i + 1]) for i in range(0, len(raw), 3)}
        return lost, {_text(raw[i]) for i in range(0, len(raw), 3) if int(raw[i + 2])}

    async def get_inflight(self, request_id: str) -> Inflight | None:
        raw = await self.r.hgetall(f"{self.p}:inflight:{request_id}")
        if not raw:
            return None
        tokens = [int(t) for t in _text(raw.get(b"tokens", b"")).split(",") if t]
        return Inflight(
            worker=_text(raw[b"worker"]),
            request=msgspec.json.decode(raw[b"request"], type=GenerateRequest),
            next_seq=int(raw.get(b"next", 0)),
            tokens=tokens,
            recoveries=int(raw.get(b"recoveries", 0)),
            text_pending=int(raw.get(b"held", 0)),
            # as of the chunk it was written with: a later one appended by an earlier version's
            # script (no held_text) leaves it stale
            text_held=_text(raw.get(b"held_text", b"")) if raw.get(b"held_next") == raw.get(b"next") else "",
            deaths=int(raw.get(b"deaths", 0)),
            incarnation=_text(raw.get(b"incarnation", b"")),
            taken=raw.get(b"taken") == raw.get(b"recoveries", b"0"),
            marks_taken=raw.get(b"marks") == raw[b"worker"],
            handed_back=msgspec.json.decode(raw.get(b"handed", b"{}"), type=dict[str, float]),
        )

    async def inflight_on(self, worker: str) -> list[str]:
        return sorted(_text(m) for m in await self.r.smembers(f"{self.p}:inflight-of:{worker}"))

    async def data_epoch(self) -> str:
        """A token of the data Redis holds (``{p}:epoch``): made at the first ask, gone with the
        data (a restart without persistence, a flush) and made anew then. A failover keeps it (the
        replica has it) though it may lose the newest writes. Not the server's run id: INFO is
        among the commands a service's Redis user may not run (``-@dangerous``). Read before it
        is written: every lookup that misses asks, and a Redis at maxmemory refuses the write even
        where the token is there (each unknown name and wrong key answered 503, not 404/401)."""
        if (held := await self.r.get(key := f"{self.p}:epoch")) is not None:
            return _text(held)
        token = secrets.token_hex(8)
        old = await self.r.set(key, token, nx=True, get=True)  # the value before, or None
        return token if old is None else _text(cast("bytes | str", old))

    async def indexed_workers(self) -> set[str]:
        """Every worker some request is recorded as in flight on (its index is not empty)."""
        prefix = f"{self.p}:inflight-of:"
        return {_text(k)[len(prefix) :] async for k in self.r.scan_iter(match=prefix + "*", count=1000)}

    async def unindex(self, worker: str, request_ids: list[str]) -> None:
        """Drop ``request_ids`` from ``worker``'s index (their records expired or name another)."""
        if request_ids:
            await self.r.srem(f"{self.p}:inflight-of:{worker}", *request_ids)

    async def claim_recovery(self, loss: str, ttl_s: float = 30.0) -> bool:
        """True for exactly one caller per ``loss`` (a worker's incarnation and last heartbeat:
        each loss of a worker is its own, however soon after the last). Only spares the others
        the work: each record is re-dispatched once anyway (``put_inflight``'s ``expect``)."""
        return bool(await self.r.set(f"{self.p}:recovering:{loss}", "1", nx=True, px=int(ttl_s * 1000)))

    async def delete_inflight(
        self, request_id: str, expect: tuple[str, int] | None = None, untaken: GenerateRequest | None = None
    ) -> bool:
        """Drop ``request_id``'s record (and its worker's index entry); with ``expect`` (worker,
        attempt) only if the record still names them: a later attempt's record, written meanwhile
        by another dispatcher, stays; with ``untaken`` too (a request, as ``put_inflight`` was
        given it), only if it still holds that request and its worker, one that marks what it
        takes, has not taken it up. False only when such a record stayed."""
        args: list[str | int] = [f"{self.p}:inflight-of:", request_id, *(expect or ())]
        if untaken is not None:
            assert expect is not None, "untaken is checked with expect"
            args.append(msgspec.json.encode(untaken).decode())
        return bool(await self._delete_inflight(keys=[f"{self.p}:inflight:{request_id}"], args=args))
