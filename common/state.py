"""Every Redis key dlora uses, and the operations on them. Nothing else spells a key.

- ``{p}:adapters``             hash  name -> AdapterEntry (JSON): the adapter registry (each name's
                                     current version)
- ``{p}:adapter-versions``     hash  name@version -> AdapterEntry: every version ever registered, for
                                     requests still running on one
- ``{p}:placement:{adapter}``  set   workers that hold the adapter in memory
- ``{p}:placement-of:{worker}`` set  the same, indexed by worker
- ``{p}:worker:{id}``          str   WorkerStats (JSON), expires: a live worker refreshes it
- ``{p}:policy:{worker}``      str   the worker's batching-policy checkpoint (credits, band)
- ``{p}:inflight:{request}``   hash  worker, incarnation (of the worker it was sent to, "" if
                                     unknown), request (the first GenerateRequest, JSON), next (the
                                     next chunk's seq), tokens delivered ("1,2,3," appended per
                                     step), held (of those, how many await their text), recoveries
                                     (the attempt running: the fencing token), deaths (workers that
                                     died with it), at (ms, Redis clock); expires unless its worker
                                     refreshes it
- ``{p}:inflight-of:{worker}`` set   request ids in flight on a worker (for recovery)
- ``{p}:recovering:{loss}``    str   lock: one dispatcher re-dispatches a lost worker's requests
- ``{p}:lease:{role}``         str   holder of a leader lease (the migrator), expires unless renewed
- ``{p}:lease-epoch:{role}``   str   the lease's epoch, raised at every takeover (plans carry it)
- ``{p}:traffic``              hash  adapter -> decayed request count (placement's traffic shares)
- ``{p}:api-keys``             hash  key digest (SHA-256, hex) -> ApiKey (JSON): inference API keys,
                                     revoked ones kept (``common/apikeys.py``)
- ``{p}:api-key-ids``          hash  key id -> its digest (revocation and lookup by id)
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import msgspec
from redis.asyncio import Redis

from dlora.common.messages import AdapterEntry, ApiKey, GenerateRequest, WorkerStats

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

# KEYS: a hash and a second one written with it. ARGV: field, value, the second hash's field and
# value, replace (0/1). Returns 0, writing nothing, when the field is taken and not ``replace``: an
# adapter name registered twice, or a key a restore would put back over a revocation written since.
_PUT_BOTH_LUA = """
if ARGV[5] == '1' then
  redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
elseif redis.call('HSETNX', KEYS[1], ARGV[1], ARGV[2]) == 0 then
  return 0
end
redis.call('HSET', KEYS[2], ARGV[3], ARGV[4])
return 1
"""

# An in-flight record's fields: worker, request (the first GenerateRequest, JSON), next (the
# sequence number the next chunk carries) and tokens delivered, recoveries (the attempt now running:
# the fencing token), at (Redis clock, ms, when it last changed hands). A record expires unless its
# worker refreshes it (sweep, progress).

# KEYS: the in-flight hash. ARGV: worker, request JSON, index key prefix, request id, recoveries,
# ttl ms, the request's next_seq, then optionally the worker and recoveries the record must still
# have (compare-and-set for a re-dispatch; 0 returned and nothing written if another got there
# first), or two empty strings: the record must not exist yet (a first dispatch; 0 if another
# request has the id). A resume or move changes only the worker, attempt and time: the first request
# and the progress since it stay, so a second resume counts right.
_PUT_INFLIGHT_LUA = """
local old = redis.call('HGET', KEYS[1], 'worker')
if ARGV[10] == '' then
  if old then  -- another request's, unless this is our write run again after its reply was lost
    return (old == ARGV[1] and redis.call('HGET', KEYS[1], 'request') == ARGV[2]) and 1 or 0
  end
elseif ARGV[10] and (old ~= ARGV[10] or redis.call('HGET', KEYS[1], 'recoveries') ~= ARGV[11]) then
  return 0
end
if old and old ~= ARGV[1] then
  redis.call('SREM', ARGV[3] .. old, ARGV[4])
end
local now = redis.call('TIME')
redis.call('HSET', KEYS[1], 'worker', ARGV[1], 'recoveries', ARGV[5], 'at', now[1] * 1000 + math.floor(now[2] / 1000),
  'incarnation', ARGV[8])
redis.call('HINCRBY', KEYS[1], 'deaths', ARGV[9])
redis.call('HSETNX', KEYS[1], 'request', ARGV[2])
redis.call('HSETNX', KEYS[1], 'next', ARGV[7])
redis.call('HSETNX', KEYS[1], 'tokens', '')
redis.call('PEXPIRE', KEYS[1], ARGV[6])
redis.call('SADD', ARGV[3] .. ARGV[1], ARGV[4])
return 1
"""

# A record is the caller's while it names the caller and the caller's attempt; a copy for which it
# does not (the request was given up on this worker and re-dispatched) is fenced: its writes are
# refused and the ids returned, so the worker drops those copies. A missing record is the caller's
# unless its copy was recorded before it was sent (GenerateRequest.recorded): then it ended or was
# given up, and a copy sent straight to a worker never had one.
_MINE_LUA = """
local function mine(key, worker, recoveries, recorded)
  local rec = redis.call('HMGET', key, 'worker', 'recoveries')
  if rec[1] == false then
    return recorded ~= '1'
  end
  return rec[1] == worker and rec[2] == recoveries
end
"""

# KEYS: in-flight hashes. ARGV: worker, index key prefix, ttl ms, then per key its request id, its
# attempt (recoveries), the chunk's sequence number, the step's token ids as "1,2,3," or "-" when it
# finished (the record goes), and how many of the tokens so far have had their text held back. A
# chunk below the record's next is not appended again: a write retried after its reply was lost. A
# missing record is left alone and its copy not fenced: it was sent straight to the worker, or Redis
# lost its data (a running request goes on; only a worker that stalled asks more strictly, with
# _FENCED_LUA).
_PROGRESS_LUA = (
    _MINE_LUA
    + """
local fenced = {}
for i, key in ipairs(KEYS) do
  local id, seq, tokens = ARGV[5 * i - 1], tonumber(ARGV[5 * i + 1]), ARGV[5 * i + 2]
  if not mine(key, ARGV[1], ARGV[5 * i], '0') then
    table.insert(fenced, id)
  elseif tokens == "-" then
    redis.call('SREM', ARGV[2] .. ARGV[1], id)
    redis.call('DEL', key)
  elseif redis.call('EXISTS', key) == 1 then
    if seq >= tonumber(redis.call('HGET', key, 'next') or 0) then
      local old = redis.call('HGET', key, 'tokens') or ''
      redis.call('HSET', key, 'tokens', old .. tokens, 'held', ARGV[5 * i + 3], 'next', seq + 1)
    end
    redis.call('PEXPIRE', key, ARGV[3])
  end
end
return fenced
"""
)

# KEYS: in-flight hashes. ARGV: worker, then per key its attempt and "1" if it was recorded before
# it was sent. Returns the indexes of the keys whose copies are fenced.
_FENCED_LUA = (
    _MINE_LUA
    + """
local fenced = {}
for i, key in ipairs(KEYS) do
  if not mine(key, ARGV[1], ARGV[2 * i], ARGV[2 * i + 1]) then
    table.insert(fenced, i)
  end
end
return fenced
"""
)

# KEYS: an in-flight hash. ARGV: index key prefix, request id, then optionally the worker and
# attempt it must still name. Deletes it and its index entry; 0 if it names another (gone is
# fine: this very delete, run again after its reply was lost, must still say it did it).
_DELETE_INFLIGHT_LUA = """
local rec = redis.call('HMGET', KEYS[1], 'worker', 'recoveries')
if ARGV[3] and rec[1] and (rec[1] ~= ARGV[3] or rec[2] ~= ARGV[4]) then
  return 0
end
if rec[1] then
  redis.call('SREM', ARGV[1] .. rec[1], ARGV[2])
end
redis.call('DEL', KEYS[1])
return 1
"""

# KEYS: the worker's index set. ARGV: worker, record key prefix, ttl ms, grace ms, the worker's
# incarnation, then the ids the worker holds. Refreshes the held records' expiry, drops index
# entries whose record expired or moved on, and returns {id, recoveries, 1 if the record names this
# incarnation, ...} of records naming this worker that it does not hold and that changed hands more
# than the grace ago (their message may still be on its way before).
_SWEEP_LUA = """
local held = {}
for i = 6, #ARGV do
  held[ARGV[i]] = true
end
local now = redis.call('TIME')
local now_ms = now[1] * 1000 + math.floor(now[2] / 1000)
local lost = {}
for _, id in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  local key = ARGV[2] .. id
  local rec = redis.call('HMGET', key, 'worker', 'recoveries', 'at', 'incarnation')
  if rec[1] ~= ARGV[1] then
    redis.call('SREM', KEYS[1], id)
  elseif held[id] then
    redis.call('PEXPIRE', key, ARGV[3])
  elseif now_ms - tonumber(rec[3] or 0) > tonumber(ARGV[4]) then
    table.insert(lost, id)
    table.insert(lost, rec[2] or '0')
    table.insert(lost, rec[4] == ARGV[5] and 1 or 0)
  end
end
return lost
"""

# Seconds an in-flight record lives without its worker refreshing it: a record nobody holds (its
# worker and every dispatcher gone meanwhile) is not kept, or replayed, for ever.
INFLIGHT_TTL_S = 600.0


@dataclass(frozen=True)
class Inflight:
    worker: str
    request: GenerateRequest
    next_seq: int  # the sequence number of the next chunk: a resume continues the numbering here
    tokens: list[int]  # tokens delivered so far: a resume continues after them
    recoveries: int = 0  # times it was re-dispatched (its worker lost, stalled, restarted): the attempt
    text_pending: int = 0  # of the tokens delivered, how many at the end have had no text sent
    deaths: int = 0  # times it was re-dispatched because the worker running it died or hung


class Sent(NamedTuple):
    """One step's chunk of a running request, as its in-flight record takes it."""

    attempt: int  # GenerateRequest.recoveries of the copy that sent it (the fencing token)
    seq: int  # its sequence number: a write retried after its reply was lost is not counted twice
    token_ids: list[int]
    held: int  # how many of all the request's tokens so far have had their text held back


class Copy(NamedTuple):
    """Which copy of a request a worker holds, as fencing asks it: its attempt
    (``GenerateRequest.recoveries``, the fencing token), and whether a missing record means the
    request is over (it was recorded before it was sent, and the worker asks after a stall: a
    record can also go missing because Redis lost its data, and a running request must not be
    dropped for that)."""

    attempt: int
    recorded: bool

    @staticmethod
    def of(request: GenerateRequest, stalled: bool) -> Copy:
        return Copy(request.recoveries, stalled and request.recorded)


class StateStore:
    def __init__(self, redis: Redis, prefix: str = PREFIX) -> None:
        self.r = redis
        self.p = prefix
        self._progress = redis.register_script(_PROGRESS_LUA)
        self._lease = redis.register_script(_LEASE_LUA)
        self._put_inflight = redis.register_script(_PUT_INFLIGHT_LUA)
        self._fenced = redis.register_script(_FENCED_LUA)
        self._sweep = redis.register_script(_SWEEP_LUA)
        self._delete_inflight = redis.register_script(_DELETE_INFLIGHT_LUA)
        self._put_both = redis.register_script(_PUT_BOTH_LUA)

    # ---- adapter registry ---------------------------------------------------------------
    async def put_adapter(self, entry: AdapterEntry, replace: bool = False) -> bool:
        """Register ``entry`` atomically: False if its name is taken (unless ``replace``). Every
        version stays findable by name and version, for requests still running on it."""
        return bool(
            await self._put_both(
                keys=[f"{self.p}:adapters", f"{self.p}:adapter-versions"],
                args=[
                    entry.name,
                    data := msgspec.json.encode(entry),
                    f"{entry.name}@{entry.version}",
                    data,
                    int(replace),
                ],
            )
        )

    async def get_adapter(self, name: str, version: str | None = None) -> AdapterEntry | None:
        """The registered adapter of that name, or a given version of it (registered now or before)."""
        if version is None or version == "":  # unversioned: entries registered before versions existed
            raw = await self.r.hget(f"{self.p}:adapters", name)
        else:
            raw = await self.r.hget(f"{self.p}:adapter-versions", f"{name}@{version}")
        return None if raw is None else msgspec.json.decode(raw, type=AdapterEntry)

    async def has_adapters(self) -> bool:
        return bool(await self.r.hlen(f"{self.p}:adapters"))

    async def put_version(self, entry: AdapterEntry) -> None:
        """Make a version findable by name and version, without registering it (a restore)."""
        await self.r.hset(f"{self.p}:adapter-versions", f"{entry.name}@{entry.version}", msgspec.json.encode(entry))

    async def list_adapters(self) -> list[AdapterEntry]:
        raw = await self.r.hgetall(f"{self.p}:adapters")
        return sorted((msgspec.json.decode(v, type=AdapterEntry) for v in raw.values()), key=lambda e: e.name)

    async def delete_adapter(self, name: str) -> bool:
        return bool(await self.r.hdel(f"{self.p}:adapters", name))

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

    async def beating(self, worker: str) -> bool:
        """Whether ``worker``'s heartbeat key is there (it wrote one within the TTL)."""
        return bool(await self.r.exists(f"{self.p}:worker:{worker}"))

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
    async def put_inflight(
        self,
        request: GenerateRequest,
        worker: str,
        expect: tuple[str, int] | None = None,
        new: bool = False,
        incarnation: str = "",
        died: bool = False,
    ) -> bool:
        """Record a request as running on ``worker`` as attempt ``request.recoveries``. On a resume
        elsewhere only the worker, the attempt and the time change: the first request and the
        progress since it stay, so a second resume counts right. With ``expect`` (the worker and
        attempt the record must still name) it is a compare-and-set: False, and nothing written,
        when the record is gone or another re-dispatch came first. With ``new`` (a request's first
        dispatch) False, and nothing written, when a record under its id exists: another request
        in flight has that id. ``incarnation``: the start of ``worker`` it is sent to, where known
        (a hand-back then tells a message that never came from a death); ``died``: a re-dispatch
        after the worker running it died (or hung), counted in the record's ``deaths``."""
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
        entries = [(rid, s.attempt, s.seq, "".join(f"{t}," for t in s.token_ids), s.held) for rid, s in chunks]
        entries += [(rid, a, 0, "-", 0) for rid, a in finished.items()]
        keys = [f"{self.p}:inflight:{rid}" for rid, *_ in entries]
        args: list[str | int] = [worker, f"{self.p}:inflight-of:", int(INFLIGHT_TTL_S * 1000)]
        args += [x for entry in entries for x in entry]
        return {_text(rid) for rid in await self._progress(keys=keys, args=args)}

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
        the records (id -> attempt) naming it that it does not hold and that changed hands more
        than ``grace_s`` ago: requests lost with a previous incarnation of the worker, or whose
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
            deaths=int(raw.get(b"deaths", 0)),
        )

    async def inflight_on(self, worker: str) -> list[str]:
        return sorted(_text(m) for m in await self.r.smembers(f"{self.p}:inflight-of:{worker}"))

    async def claim_recovery(self, loss: str, ttl_s: float = 30.0) -> bool:
        """True for exactly one caller per ``loss`` (a worker's incarnation and last heartbeat:
        each loss of a worker is its own, however soon after the last). Only spares the others
        the work: each record is re-dispatched once anyway (``put_inflight``'s ``expect``)."""
        return bool(await self.r.set(f"{self.p}:recovering:{loss}", "1", nx=True, px=int(ttl_s * 1000)))

    async def delete_inflight(self, request_id: str, expect: tuple[str, int] | None = None) -> bool:
        """Drop ``request_id``'s record (and its worker's index entry); with ``expect`` (worker,
        attempt) only if the record still names them: a later attempt's record, written meanwhile
        by another dispatcher, stays. False only when such a record stayed."""
        args: list[str | int] = [f"{self.p}:inflight-of:", request_id, *(expect or ())]
        return bool(await self._delete_inflight(keys=[f"{self.p}:inflight:{request_id}"], args=args))


def _text(value: bytes | str) -> str:
    """A Redis reply as text (redis-py gives bytes unless the client decodes responses)."""
    return value.decode() if isinstance(value, bytes) else value
