"""The Redis keys of the Responses API's stored responses: ``{p}:response:{tenant}:{id}``, a hash:
``tenant``, ``response`` (the response object, JSON), ``input`` (the conversation's input items,
JSON), ``stream`` (a streamed background response's: the token of the run whose events its stream
holds, ``append_events``), ``leased`` (a background response's whose run holds a lease,
``lease_response``: none in one an older gateway wrote, which took none), ``seen`` (in one without
``leased``: when a reader first found it running, ms on Redis's clock); and
``{p}:response-holders:{tenant}:{item id}``, a sorted set: every response that holds that item in
its conversation or output, each scored by when it expires (ms, Redis's clock), so that an
``item_reference`` (which names any stored item by its id alone, as OpenAI's) finds it while any
holder lives, and the set goes with the last. (A chain's turns and a conversation's forks each
hold their whole conversation: one index entry naming a single holder was a 404 once that one was
deleted, though a fork still held the item.) ``{p}:response-item:{tenant}:{item id}``, a string
naming one holder, is what gateways before the set wrote: read where an item's set has no holder
left. ``state.py`` lists every key. A part of ``StateStore``.

Under its tenant (its API key's; "" without keys): a response's id is its client's X-Request-Id
where one is sent (vLLM's), so one tenant naming its request as another's response was stored
over that one; each tenant's ids are its own."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import Any, cast

from redis.asyncio import Redis
from redis.asyncio.client import Pipeline

# The responses holding an item (KEYS[first..], one sorted set per item) made to include ``id``,
# scored by when it expires (now + ``ms``, on Redis's clock), each set kept as long as its last holder.
# Those expired dropped as it is written: a set written again before its last holder expires (an
# item a client sends back with every request) never expires, and lookups prune nothing (read-only).
_HOLD_LUA = """
local function hold(first, id, ms)
  local t = redis.call('TIME')
  local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
  local expires = string.format('%d', now + tonumber(ms))
  for i = first, #KEYS do
    redis.call('ZREMRANGEBYSCORE', KEYS[i], '-inf', string.format('%d', now))
    redis.call('ZADD', KEYS[i], expires, id)
    if redis.call('PTTL', KEYS[i]) < tonumber(ms) then redis.call('PEXPIRE', KEYS[i], ms) end
  end
end
"""

# ``put_response``'s item index (KEYS: the items' holder sets; ARGV[1], the response; ARGV[2], ms)
_PUT_HOLDERS_LUA = f"""
{_HOLD_LUA}
hold(1, ARGV[1], ARGV[2])
return 1
"""

# A response (``id``) taken out of the holder sets of items it held (KEYS[first..]): the items it
# shared with others (a fork's, a later turn's) stay found through them, each set expiring with the
# last of them, and removed with no holder left.
_UNHOLD_LUA = """
local function unhold(first, id)
  for i = first, #KEYS do
    redis.call('ZREM', KEYS[i], id)
    local last = redis.call('ZREVRANGE', KEYS[i], 0, 0, 'WITHSCORES')
    if #last == 0 then redis.call('DEL', KEYS[i]) else redis.call('PEXPIREAT', KEYS[i], last[2]) end
  end
end
"""

# A response deleted (KEYS[1], and its stream's events, KEYS[2]) taken out of the holder sets of its
# items (KEYS[3..]; ARGV[1], its id).
_DELETE_LUA = f"""
{_UNHOLD_LUA}
if redis.call('DEL', KEYS[1]) == 0 then return 0 end
redis.call('DEL', KEYS[2])
unhold(3, ARGV[1])
return 1
"""

# ``put_response``'s replaced record's items that the new one does not hold (KEYS: their holder
# sets; ARGV[1], the id both go by): the id left there named the new record, which an item's
# lookup found first (it expires last) and read the item in vain, a 404 while an older response
# held it.
_PUT_UNHELD_LUA = f"""
{_UNHOLD_LUA}
unhold(1, ARGV[1])
return 1
"""

# For each item (KEYS[2k-1], its holder set; KEYS[2k], an older gateway's single entry), the holder
# that expires last whose record is there (ARGV[1] .. id); then, none, the one the older entry
# names, if there: during a rolling upgrade a set can outlive its holders while an older gateway's
# turn still holds the item; false: none. Read-only: holders expired are skipped by their score
# (each write drops them: ``_HOLD_LUA``), a holder whose record is gone (an older gateway's
# DELETE, which knows no set) is passed over and goes once it expires, so a lookup writes nothing
# (it pruned every set it read, on every item_reference: writes and their replication for a read).
# Records are named by id, not in KEYS: which holders an item has is known only once its set is
# read (declared, they would cost a second round trip). Not Redis Cluster safe, as the store is
# not as a whole: one request's holder sets are keys of as many slots (README says so).
_HOLDERS_LUA = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local out = {}
for k = 1, #KEYS, 2 do
  local found = false
  for _, id in ipairs(redis.call('ZREVRANGEBYSCORE', KEYS[k], '+inf', string.format('(%d', now))) do
    if redis.call('EXISTS', ARGV[1] .. id) == 1 then found = id break end
  end
  if not found then
    local id = redis.call('GET', KEYS[k + 1])
    if id and redis.call('EXISTS', ARGV[1] .. id) == 1 then found = id end
  end
  out[#out + 1] = found
end
return out
"""

# A background response's record (KEYS[1]) written only while its ``response`` field is still what
# its writer last wrote there (ARGV[1]): a cancel, or a delete, in between wins. The same fields,
# expiry and item index (KEYS[3..], holder sets of ARGV[5]) as ``put_response``'s transaction, in
# one step, with its stream's last events (ARGV[6..], put after its others in KEYS[2]): a reader
# that found the record over before they came ended its stream without them.
_PUT_IF_LUA = f"""
{_HOLD_LUA}
if redis.call('HGET', KEYS[1], 'response') ~= ARGV[1] then return 0 end
redis.call('HSET', KEYS[1], 'response', ARGV[2], 'input', ARGV[3])
redis.call('PEXPIRE', KEYS[1], ARGV[4])
hold(3, ARGV[5], ARGV[4])
if #ARGV > 5 then
  for i = 6, #ARGV do redis.call('RPUSH', KEYS[2], ARGV[i]) end
  redis.call('PEXPIRE', KEYS[2], ARGV[4])
end
return 1
"""

# A streamed background response's events (ARGV[3..]) put after its others (KEYS[2], expiring in
# ARGV[2] ms) only while its record (KEYS[1]) is there and names their run (its ``stream`` field is
# ARGV[1]): a run stopped late (deleted, or replaced by a retry under its id, its cancel not yet
# heard) neither fills the new response's stream nor makes the deleted one's again.
_APPEND_IF_LUA = """
if redis.call('HGET', KEYS[1], 'stream') ~= ARGV[1] then return 0 end
for i = 3, #ARGV do redis.call('RPUSH', KEYS[2], ARGV[i]) end
redis.call('PEXPIRE', KEYS[2], ARGV[2])
return 1
"""

# A streamed response's stream (KEYS[2]) ended, with its record (KEYS[1]) made failed in the same
# step, by its closing event (ARGV[3], its sequence_number (the stream's length), ARGV[4]), for its
# readers; its token cleared, so that its run, if it lives on, appends nothing after it. (None
# without ARGV[3], or for a record made unstreamed.) A record an older gateway wrote (no ``leased``
# mark, no token: it appended unguarded) is streamed where events of it are kept, as ``streamed``
# reads it: without its closing event, its readers' stream ended with no terminal event.
_CLOSE_STREAM_LUA = """
if #ARGV > 2 and (redis.call('HEXISTS', KEYS[1], 'stream') == 1
    or redis.call('HEXISTS', KEYS[1], 'leased') == 0 and redis.call('EXISTS', KEYS[2]) == 1) then
  redis.call('HSET', KEYS[1], 'stream', '')
  redis.call('RPUSH', KEYS[2], ARGV[3] .. redis.call('LLEN', KEYS[2]) .. ARGV[4])
  local ms = redis.call('PTTL', KEYS[1])
  if ms > 0 then redis.call('PEXPIRE', KEYS[2], ms) end
end
"""

# A stored response's object (KEYS[1]'s ``response``) replaced only if it is still ARGV[1]; a
# streamed one's stream closed with it where it is made failed (``_CLOSE_STREAM_LUA``).
_SWAP_LUA = f"""
if redis.call('HGET', KEYS[1], 'response') ~= ARGV[1] then return 0 end
redis.call('HSET', KEYS[1], 'response', ARGV[2])
{_CLOSE_STREAM_LUA}
return 1
"""

# A background response's lease (KEYS[2]) renewed by its run (ARGV[2]: its gateway, ARGV[3] ms)
# while its record (KEYS[1]) is still what the run last wrote there (ARGV[1]): 0 where a cancel, a
# delete, a retry's record or a reader that found the lease lapsed has changed it.
_RENEW_LUA = """
if redis.call('HGET', KEYS[1], 'response') ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[2], ARGV[2], 'PX', ARGV[3])
return 1
"""

# A background response's record (KEYS[1]) made ARGV[2] (its failed object) if it is still ARGV[1]
# (read queued or in_progress) and its lease (KEYS[3]) has lapsed: one step, so that of the readers
# that find it so one writes, and a run that renews its lease in between keeps it; a streamed one's
# stream closed (``_CLOSE_STREAM_LUA``). A record without ``leased`` is an older gateway's, which
# took no lease: ended only once ARGV[5] ms have passed since a reader first found it so (its
# ``seen``, stamped then), both read on Redis's clock: its created_at is its gateway's wall clock,
# and a reader's clock ahead of it by the span failed a live run at once.
# Answers the record as it is then (nil: gone).
_LAPSE_LUA = f"""
local now = redis.call('HGET', KEYS[1], 'response')
if now ~= ARGV[1] or redis.call('EXISTS', KEYS[3]) == 1 then return now end
if redis.call('HEXISTS', KEYS[1], 'leased') == 0 then
  local t = redis.call('TIME')
  local ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
  local seen = tonumber(redis.call('HGET', KEYS[1], 'seen'))
  if not seen then
    seen = ms
    redis.call('HSET', KEYS[1], 'seen', string.format('%d', ms))
  end
  if ms - seen < tonumber(ARGV[5]) then return now end
end
redis.call('HSET', KEYS[1], 'response', ARGV[2])
{_CLOSE_STREAM_LUA}
return ARGV[2]
"""


# The most times DELETE, or a record written over another, reads a record that changes under it
# (``delete_response``, ``put_response``): a bound by count
DELETE_TRIES = 5

# A name ``response_fields`` answers, beside a record's fields, with whether the response was made
# streamed in the background (b"1", else b""): a retrieve with stream=true reads it with the record
STREAMED = "streamed"

# The item ids a stored record's ``input`` and ``response`` hold (None: the field is not there):
# the gateway's ``responses_read.held``
Held = Callable[[bytes | None, bytes | None], Sequence[str]]


def _queued(pipe: Pipeline, lua: str, keys: Sequence[str], args: Sequence[bytes | str | int]) -> None:
    """``lua`` queued in ``pipe``'s transaction as an EVAL, its text sent whole: redis-py's
    ``Script`` in a pipeline asks SCRIPT EXISTS of its scripts before the pipeline goes (and
    SCRIPT LOADs those Redis lost), a round trip more before each stored response's last bytes
    for a few hundred bytes saved. Redis caches it by its SHA1 as an EVALSHA's, compiled once."""
    pipe.eval(lua, len(keys), *keys, *args)


class ResponseKeys:
    """``StateStore``'s operations on stored responses (``gateway/responses_store.py``)."""

    r: Redis
    p: str

    async def put_response(
        self,
        response_id: str,
        tenant: str,
        response: bytes,
        items: bytes,
        ttl_s: float,
        item_ids: Sequence[str] = (),
        expect: bytes | None = None,
        stream: str | None = None,
        events: Sequence[bytes] = (),
        leased: bool = False,
        held: Held | None = None,
    ) -> bool:
        """Keep a finished response for ``ttl_s`` seconds, and ``item_ids`` (items it stored) as
        its: its fields, its items' index and their expiry in one transaction, so no record
        outlives its TTL (a gateway dying between them) nor an index entry names a response never
        written. One of the tenant's own under the same id (its client sent the same X-Request-Id
        again, a retry) is replaced, as vLLM's store replaces it; an item id stored again (a later
        turn's conversation holds it, a fork's, or its client sent it back) is held by this one
        too, beside every other (``responses_of_items``). ``expect``: written only over that
        object (a background response's last state; False where it is another now, or gone).
        ``stream``: the token of the run whose events its stream holds (a streamed background
        response's, written with its first record; ``append_events`` checks it); written whole
        otherwise (not ``expect``), the record has none: it is not streamed, or by another run.
        ``events``: with ``expect``, its stream's last ones, appended in the same step.
        ``leased``: written whole, its run holds a lease (``end_unleased`` judges it by that).
        ``held``: the item ids a record's ``input`` and ``response`` hold (``delete_response``'s):
        written whole over one, the replaced record's items the new one leaves out no longer name
        its id, read and written in one optimistic transaction, as ``delete_response`` is. None
        where no record can be there to replace (an id the gateway drew, not its client): written
        in one MULTI/EXEC, nothing read first."""
        key, ms = f"{self.p}:response:{tenant}:{response_id}", max(1, int(ttl_s * 1000))
        holders = [self._holders(tenant, i) for i in item_ids]
        if expect is not None:
            keys = [key, f"{self.p}:response-events:{tenant}:{response_id}", *holders]
            args: list[bytes | str | int] = [expect, response, items, ms, response_id, *events]
            return bool(await self.r.register_script(_PUT_IF_LUA)(keys=keys, args=args))

        async def put(pipe: Pipeline, replaced: Sequence[str]) -> None:
            kept = set(item_ids)
            unheld = [self._holders(tenant, i) for i in replaced if i not in kept]
            # Replaced whole: a field of the replaced one's kept (its run's token) was taken as this one's
            pipe.delete(key)
            pipe.hset(key, mapping={"tenant": tenant, "response": response, "input": items})
            if stream is not None:
                pipe.hset(key, "stream", stream)
            if leased:
                pipe.hset(key, "leased", 1)
            pipe.pexpire(key, ms)
            # A stored stream's events are the replaced response's (its id sent again): not the new one's
            pipe.delete(f"{self.p}:response-events:{tenant}:{response_id}")
            if unheld:
                _queued(pipe, _PUT_UNHELD_LUA, unheld, [response_id])
            if holders:
                _queued(pipe, _PUT_HOLDERS_LUA, holders, [response_id, ms])

        if held is None:
            await self.r.transaction(lambda pipe: put(pipe, ()))
        else:
            await self._rewritten(key, held, put)
        return True

    def _holders(self, tenant: str, item_id: str) -> str:
        return f"{self.p}:response-holders:{tenant}:{item_id}"

    async def swap_response(
        self, response_id: str, tenant: str, old: bytes, new: bytes, closing: tuple[bytes, bytes] = (b"", b"")
    ) -> bool:
        """``tenant``'s stored response object made ``new`` if it is ``old`` still (a background
        response's state, changed by the gateway running it and by a cancel from any gateway).
        ``closing`` (a failed one's ``response.failed``, in two parts around its sequence_number):
        a streamed one's stream ended with it, and closed to its run, in the same step."""
        keys = [f"{self.p}:response:{tenant}:{response_id}", f"{self.p}:response-events:{tenant}:{response_id}"]
        args = [old, new, *closing] if any(closing) else [old, new]
        return bool(await self.r.register_script(_SWAP_LUA)(keys=keys, args=args))

    async def append_events(
        self, response_id: str, tenant: str, stream: str, events: Sequence[bytes], ttl_s: float
    ) -> bool:
        """A streamed background response's events (its SSE frames, in order: their index is their
        sequence_number), kept as long as the response, read again by ``response_events``; only
        while its record is there and names their run (``stream``: ``put_response``'s). False: it
        does not (deleted, expired, or another run's now), and nothing was written."""
        keys = [f"{self.p}:response:{tenant}:{response_id}", f"{self.p}:response-events:{tenant}:{response_id}"]
        args: list[bytes | str | int] = [stream, max(1, int(ttl_s * 1000)), *events]
        return bool(await self.r.register_script(_APPEND_IF_LUA)(keys=keys, args=args))

    async def streamed(self, response_id: str, tenant: str) -> bool:
        """Whether ``tenant``'s response was made streamed in the background (its events kept): its
        record names its run's token, or, one an older gateway wrote (no ``leased`` mark, no
        token: it appended unguarded), events of it are kept."""
        got = await self.response_fields(response_id, tenant, STREAMED)
        return got is not None and got[1] == b"1"

    async def response_events(self, response_id: str, tenant: str, start: int) -> list[bytes]:
        """Its events from the ``start``-th on (none: none yet, or it was not streamed)."""
        key = f"{self.p}:response-events:{tenant}:{response_id}"
        return cast(list[bytes], await self.r.lrange(key, start, -1))

    async def responses_of_items(self, item_ids: Sequence[str], tenant: str) -> list[str | None]:
        """A stored response that holds each of ``tenant``'s items ``item_ids``, the one that
        expires last (None: none left: never stored, expired, or each holder deleted)."""
        if not item_ids:
            return []
        keys = [k for i in item_ids for k in (self._holders(tenant, i), f"{self.p}:response-item:{tenant}:{i}")]
        script = self.r.register_script(_HOLDERS_LUA)
        got = cast(list[bytes | None], await script(keys=keys, args=[f"{self.p}:response:{tenant}:"]))
        return [None if v is None else v.decode() for v in got]

    async def response_fields(self, response_id: str, tenant: str, *fields: str) -> list[bytes | None] | None:
        """``fields`` of ``tenant``'s stored response (``tenant`` first), or None: it has none
        under ``response_id`` (never stored, expired or deleted). ``STREAMED`` among them: whether
        it was made streamed (``streamed``: b"1", else b""), read with the others in one round trip."""
        key = f"{self.p}:response:{tenant}:{response_id}"
        if STREAMED not in fields:
            got = cast(list[bytes | None], await self.r.hmget(key, ["tenant", *fields]))
            return None if got[0] is None else got
        # In one transaction: read apart, a retry replacing the record between the reads mixed
        # two records' fields (the replaced one's token with the new one's mark), and a response
        # never streamed read as one whose stream is there to follow
        named = [f for f in fields if f != STREAMED]
        pipe = self.r.pipeline(transaction=True)
        pipe.hmget(key, ["tenant", *named, "stream", "leased"])
        pipe.exists(f"{self.p}:response-events:{tenant}:{response_id}")
        [*got, token, leased], events = await pipe.execute()
        if got[0] is None:
            return None
        streamed = b"1" if token is not None or leased is None and events else b""
        read = iter(got[1:])
        return [got[0], *(streamed if f == STREAMED else next(read) for f in fields)]

    async def delete_response(self, response_id: str, tenant: str, held: Held | None = None) -> bool:
        """Whether it was there to delete; it no longer holds the items ``held`` names of its record's
        ``input`` and ``response`` (its conversation's and output's ids; None: none), each item found
        through its other holders, its index gone with the last. The record is read and deleted in
        one optimistic transaction (WATCH, read again where it changed in between): read apart, a
        background run's last write between them (its output's items held by it) left its id in
        those items' sets, a holder named after its record was gone, until it expired. Read at most
        ``DELETE_TRIES`` times: the last read is deleted whatever changes after it."""
        key = f"{self.p}:response:{tenant}:{response_id}"

        async def delete(pipe: Pipeline, ids: Sequence[str]) -> None:
            keys = [key, f"{self.p}:response-events:{tenant}:{response_id}", *(self._holders(tenant, i) for i in ids)]
            _queued(pipe, _DELETE_LUA, keys, [response_id])

        got = await self._rewritten(key, held or (lambda _items, _response: ()), delete)
        return bool(got[-1])

    async def _rewritten(
        self, key: str, held: Held, write: Callable[[Pipeline, Sequence[str]], Awaitable[None]]
    ) -> list[Any]:
        """``write`` queued in one optimistic transaction (WATCH ``key``, then MULTI/EXEC) with the
        item ids ``held`` names of the record ``key`` as read first (its ``input`` and ``response``:
        none where it is not there), read again where it changes in between, at most
        ``DELETE_TRIES`` times (``put_response``'s and ``delete_response``'s). Returns EXEC's replies."""
        tries = 0

        async def step(pipe: Pipeline) -> None:
            nonlocal tries
            items, response = cast(list[bytes | None], await pipe.hmget(key, ["input", "response"]))
            tries += 1
            if tries == DELETE_TRIES:
                # Changed on every read (a client sending its id again and again): redis-py's
                # transaction went round for ever. Written as last read, unwatched: a holder added
                # after it can name a record that no longer holds its item (DELETE's: one gone)
                # until it expires
                await pipe.unwatch()  # type: ignore[no-untyped-call]  # (as multi: untyped in redis-py)
            ids = held(items, response)
            pipe.multi()  # type: ignore[no-untyped-call]  # (redis-py's stub leaves it untyped)
            await write(pipe, ids)

        return cast(list[Any], await self.r.transaction(step, key))

    async def lease_response(
        self, response_id: str, tenant: str, holder: str, ttl_s: float, expect: bytes | None = None
    ) -> bool:
        """``holder`` (a gateway's id) runs ``tenant``'s background response for ``ttl_s`` seconds
        more, where its record is still ``expect`` (its run's last write; None: taken whatever it
        is, before its queued record is written). False: the record is another's now, or gone."""
        lease, ms = f"{self.p}:response-lease:{tenant}:{response_id}", max(1, int(ttl_s * 1000))
        if expect is None:
            await self.r.set(lease, holder, px=ms)
            return True
        keys = [f"{self.p}:response:{tenant}:{response_id}", lease]
        return bool(await self.r.register_script(_RENEW_LUA)(keys=keys, args=[expect, holder, ms]))

    async def end_unleased(
        self,
        response_id: str,
        tenant: str,
        stored: bytes,
        ended: bytes,
        closing: tuple[bytes, bytes],
        legacy_s: float = 0.0,
    ) -> bytes | None:
        """``tenant``'s response made ``ended`` if it is ``stored`` still and no gateway holds its
        lease (``lease_response``: the one running it died, or lost Redis for longer than its
        lease); a streamed one's stream ended with the event ``closing`` frames around its
        sequence_number, and closed to its run (``append_events`` refuses it). One an older
        gateway wrote (not ``leased``: it never had a lease) only ``legacy_s`` seconds after a
        reader first found it so (its ``seen`` mark, ms on Redis's clock: no gateway's clock is
        trusted). Returns its record as it is then; None: it is gone."""
        keys = [f"{self.p}:response:{tenant}:{response_id}", f"{self.p}:response-events:{tenant}:{response_id}"]
        keys.append(f"{self.p}:response-lease:{tenant}:{response_id}")
        args: list[bytes | int] = [stored, ended, *closing, max(0, int(legacy_s * 1000))]
        return cast(bytes | None, await self.r.register_script(_LAPSE_LUA)(keys=keys, args=args))
