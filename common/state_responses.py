"""The Redis keys of the Responses API's stored responses: ``{p}:response:{tenant}:{id}``, a hash:
``tenant``, ``response`` (the response object, JSON), ``input`` (the conversation's input items,
JSON), ``sources`` (the ids of the responses its item_references read, JSON; none in a record
written before it), ``stream`` (a streamed background response's: the token of the run whose
events its stream holds, ``append_events``), ``leased`` (a background response's whose run holds
a lease, ``lease_response``: none in one an older gateway wrote, which took none), ``seen`` (in
one without ``leased``: when a reader first found it running, ms on Redis's clock); and
``{p}:response-item:{tenant}:{item id}``, a string: the id of the newest response that holds that
item in its conversation or output (an ``item_reference`` names any stored item by its id alone,
as OpenAI's). ``state.py`` lists every key. A part of ``StateStore``.

Under its tenant (its API key's; "" without keys): a response's id is its client's X-Request-Id
where one is sent (vLLM's), so one tenant naming its request as another's response was stored
over that one; each tenant's ids are its own."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import cast

from redis.asyncio import Redis

# Item index entries still naming a deleted response (KEYS[2..]) named a response it drew them from
# (ARGV[2], whose hash is KEYS[1]: the one before it in its chain, or one its item_references read)
# instead, for that one's remaining TTL: only where the entry names the deleted one still (ARGV[1]:
# a newer turn written since keeps its own).
_REPOINT_LUA = """
local ttl = redis.call('PTTL', KEYS[1])
if ttl <= 0 then return -1 end  -- (gone: its caller looks at what it drew from)
local n = 0
for i = 2, #KEYS do
  if redis.call('GET', KEYS[i]) == ARGV[1] then
    redis.call('SET', KEYS[i], ARGV[2], 'PX', ttl)
    n = n + 1
  end
end
return n
"""

# A response deleted (KEYS[1]) leaves, for its remaining TTL, what it drew its items from (ARGV[1])
# under KEYS[2]: a later turn deleted after it finds the response before this one through it. In one
# step, so that the later turn's delete, reading the gone one, finds one or the other. Its stream's
# events (KEYS[3], a streamed background response's) go with it.
_DELETE_LUA = """
local ttl = redis.call('PTTL', KEYS[1])
if ttl == -2 then return 0 end
redis.call('DEL', KEYS[1], KEYS[3])
if ttl > 0 then redis.call('SET', KEYS[2], ARGV[1], 'PX', ttl) end
return 1
"""

# A background response's record (KEYS[1]) written only while its ``response`` field is still what
# its writer last wrote there (ARGV[1]): a cancel, or a delete, in between wins. The same fields,
# expiry and item index (KEYS[3..], naming ARGV[6]) as ``put_response``'s transaction, in one step,
# with its stream's last events (ARGV[7..], put after its others in KEYS[2]): a reader that found
# the record over before they came ended its stream without them.
_PUT_IF_LUA = """
if redis.call('HGET', KEYS[1], 'response') ~= ARGV[1] then return 0 end
redis.call('HSET', KEYS[1], 'response', ARGV[2], 'input', ARGV[3], 'sources', ARGV[4])
redis.call('PEXPIRE', KEYS[1], ARGV[5])
for i = 3, #KEYS do redis.call('SET', KEYS[i], ARGV[6], 'PX', ARGV[5]) end
if #ARGV > 6 then
  for i = 7, #ARGV do redis.call('RPUSH', KEYS[2], ARGV[i]) end
  redis.call('PEXPIRE', KEYS[2], ARGV[5])
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
        sources: Sequence[str] = (),
        expect: bytes | None = None,
        stream: str | None = None,
        events: Sequence[bytes] = (),
        leased: bool = False,
    ) -> bool:
        """Keep a finished response for ``ttl_s`` seconds, and ``item_ids`` (items it stored) as
        its: its fields, its items' index and their expiry in one transaction, so no record
        outlives its TTL (a gateway dying between them) nor an index entry names a response never
        written. One of the tenant's own under the same id (its client sent the same X-Request-Id
        again, a retry) is replaced, as vLLM's store replaces it; an item id stored again (a later
        turn's conversation holds it, or its client sent it back) names the newest response that
        holds it. ``sources``: the responses its item_references read items from, which the index
        names again once it is deleted (``repoint_items``). ``expect``: written only over that
        object (a background response's last state; False where it is another now, or gone).
        ``stream``: the token of the run whose events its stream holds (a streamed background
        response's, written with its first record; ``append_events`` checks it); written whole
        otherwise (not ``expect``), the record has none: it is not streamed, or by another run.
        ``events``: with ``expect``, its stream's last ones, appended in the same step.
        ``leased``: written whole, its run holds a lease (``end_unleased`` judges it by that)."""
        key, ms = f"{self.p}:response:{tenant}:{response_id}", max(1, int(ttl_s * 1000))
        sourced = json.dumps(list(sources))
        if expect is not None:
            keys = [key, f"{self.p}:response-events:{tenant}:{response_id}"]
            keys += [f"{self.p}:response-item:{tenant}:{i}" for i in item_ids]
            args: list[bytes | str | int] = [expect, response, items, sourced, ms, response_id, *events]
            return bool(await self.r.register_script(_PUT_IF_LUA)(keys=keys, args=args))
        pipe = self.r.pipeline(transaction=True)
        # Replaced whole: a field of the replaced one's kept (its run's token) was taken as this one's
        pipe.delete(key)
        pipe.hset(key, mapping={"tenant": tenant, "response": response, "input": items, "sources": sourced})
        if stream is not None:
            pipe.hset(key, "stream", stream)
        if leased:
            pipe.hset(key, "leased", 1)
        pipe.pexpire(key, ms)
        # A stored stream's events are the replaced response's (its id sent again): not the new one's
        pipe.delete(f"{self.p}:response-events:{tenant}:{response_id}")
        for item_id in item_ids:
            pipe.set(f"{self.p}:response-item:{tenant}:{item_id}", response_id, px=ms)
        await pipe.execute()
        return True

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
        key = f"{self.p}:response:{tenant}:{response_id}"
        # In one transaction: read apart, a retry replacing the record between the reads mixed
        # two records' fields (the replaced one's token with the new one's mark), and a response
        # never streamed read as one whose stream is there to follow
        pipe = self.r.pipeline(transaction=True)
        pipe.hexists(key, "stream")
        pipe.hexists(key, "leased")
        pipe.exists(f"{self.p}:response-events:{tenant}:{response_id}")
        token, leased, events = await pipe.execute()
        return bool(token) or not leased and bool(events)

    async def response_events(self, response_id: str, tenant: str, start: int) -> list[bytes]:
        """Its events from the ``start``-th on (none: none yet, or it was not streamed)."""
        key = f"{self.p}:response-events:{tenant}:{response_id}"
        return cast(list[bytes], await self.r.lrange(key, start, -1))

    async def responses_of_items(self, item_ids: Sequence[str], tenant: str) -> list[str | None]:
        """The response that stored each of ``tenant``'s items ``item_ids`` (None: none, or expired)."""
        if not item_ids:
            return []
        got = cast(list[bytes | None], await self.r.mget([f"{self.p}:response-item:{tenant}:{i}" for i in item_ids]))
        return [None if v is None else v.decode() for v in got]

    async def response_fields(self, response_id: str, tenant: str, *fields: str) -> list[bytes | None] | None:
        """``fields`` of ``tenant``'s stored response (``tenant`` first), or None: it has none
        under ``response_id`` (never stored, expired or deleted)."""
        key = f"{self.p}:response:{tenant}:{response_id}"
        got = cast(list[bytes | None], await self.r.hmget(key, ["tenant", *fields]))
        return None if got[0] is None else got

    async def delete_response(self, response_id: str, tenant: str, drawn: Sequence[str] = ()) -> bool:
        """Whether it was there to delete; ``drawn`` (the responses it drew items from: its previous
        response, those its item_references read) left under ``{p}:response-gone:{tenant}:{id}``
        for its remaining TTL (``drawn_by_deleted``)."""
        keys = [f"{self.p}:response:{tenant}:{response_id}", f"{self.p}:response-gone:{tenant}:{response_id}"]
        keys.append(f"{self.p}:response-events:{tenant}:{response_id}")  # (its stream's events: its text too)
        return bool(await self.r.register_script(_DELETE_LUA)(keys=keys, args=[json.dumps(list(drawn))]))

    async def drawn_by_deleted(self, response_id: str, tenant: str) -> list[str]:
        """What ``delete_response`` left of a response it deleted: the responses it drew from."""
        got = await self.r.get(f"{self.p}:response-gone:{tenant}:{response_id}")
        return [i for i in json.loads(got) if isinstance(i, str)] if got else []

    async def repoint_items(self, item_ids: Sequence[str], tenant: str, deleted: str, previous: str) -> int:
        """``tenant``'s index entries of ``item_ids`` that name ``deleted`` (a response just
        deleted) made to name ``previous`` (a response it drew those items from: the one before it
        in its chain, or one its item_references read), for its TTL; none where ``previous`` is
        gone (-1: then its own ``drawn_by_deleted`` may name one). Returns how many: every turn
        indexes its whole conversation under itself, so deleting the newest turn made an item the
        earlier turn still held a 404 to item_reference."""
        if not item_ids:
            return 0
        keys = [f"{self.p}:response:{tenant}:{previous}", *(f"{self.p}:response-item:{tenant}:{i}" for i in item_ids)]
        return int(await self.r.register_script(_REPOINT_LUA)(keys=keys, args=[deleted, previous]))

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
