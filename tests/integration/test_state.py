"""The Redis state store against a real redis-server."""

from __future__ import annotations

import asyncio

import msgspec
from redis.asyncio import Redis

from dlora.common.inflight import Copy, Sent
from dlora.common.messages import AdapterEntry, GenerateRequest, SamplingParams, WorkerStats
from dlora.common.state import StateStore
from dlora.services.gateway.responses_lease import closing


async def test_registry_placement_and_policy(redis: Redis) -> None:
    s = StateStore(redis)
    assert await s.put_adapter(AdapterEntry(name="b", path="/b", rank=8, created=1.0, version="v1"))
    assert await s.put_adapter(AdapterEntry(name="a", path="/a", rank=16, created=2.0))
    # a taken name is refused, atomically; replace overwrites; each version stays findable
    assert not await s.put_adapter(AdapterEntry(name="b", path="/b2", rank=8, created=3.0, version="v2"))
    assert (await s.get_adapter("b")).path == "/b"
    assert await s.put_adapter(AdapterEntry(name="b", path="/b2", rank=8, created=3.0, version="v2"), replace=True)
    assert (await s.get_adapter("b")).version == "v2" and (await s.get_adapter("b", "v1")).path == "/b"
    assert [e.name for e in await s.list_adapters()] == ["a", "b"]
    assert (await s.get_adapter("a")).rank == 16 and await s.get_adapter("zz") is None
    assert await s.delete_adapter("b") and not await s.delete_adapter("b")

    await s.set_placement("w1", ["a", "c"])
    await s.set_placement("w2", ["a"])
    await s.set_placement("w1", ["c"])
    assert await s.workers_with("a") == {"w2"} and await s.workers_with("c") == {"w1"}

    await s.save_policy("w1", {"r": 0.4, "credits": {"a": -1.5}})
    assert await s.load_policy("w1") == {"r": 0.4, "credits": {"a": -1.5}}
    assert await s.load_policy("w9") is None


async def test_heartbeats_expire(redis: Redis) -> None:
    s = StateStore(redis)
    stats = WorkerStats(worker="w1", running=1, waiting=0, free_blocks=1, total_blocks=2, block_size=16, max_loras=4)
    await s.heartbeat(stats, ttl_s=0.2)
    assert [w.worker for w in await s.live_workers()] == ["w1"]
    await asyncio.sleep(0.3)
    assert await s.live_workers() == []


async def test_inflight_progress_and_recovery_index(redis: Redis) -> None:
    s = StateStore(redis)
    req = GenerateRequest(request_id="r1", reply_to="x", prompt_token_ids=[1, 2])
    await s.put_inflight(req, "w1")
    assert await s.record_progress("w1", {"r1": Sent(0, 0, [7, 8], 1), "unknown": Sent(0, 0, [9], 0)}, {}) == set()
    await s.record_progress("w1", {"r1": Sent(0, 1, [10], 2, "ab")}, {})
    await s.record_progress("w1", {"r1": Sent(0, 1, [10], 2, "ab")}, {})  # retried, its reply lost: not twice
    rec = await s.get_inflight("r1")
    assert (rec.worker, rec.request, rec.next_seq, rec.tokens, rec.text_pending) == ("w1", req, 2, [7, 8, 10], 2)
    assert rec.text_held == "ab"  # held back (it could begin a stop string): a resume sends it first
    # A chunk appended since by an earlier version's script (no held text): the held text is stale.
    await redis.hset("dlora:inflight:r1", mapping={"next": 3})
    assert (await s.get_inflight("r1")).text_held == ""
    await redis.hset("dlora:inflight:r1", mapping={"next": 2})
    # a write that failed is written before the next step's, in order (here seq 1 was in fact
    # written before its reply was lost: not twice)
    await s.record_progress(
        "w1", {"r1": Sent(0, 3, [12], 2)}, {}, earlier=[("r1", Sent(0, 1, [10], 2)), ("r1", Sent(0, 2, [11], 2))]
    )
    rec = await s.get_inflight("r1")
    assert (rec.next_seq, rec.tokens) == (4, [7, 8, 10, 11, 12])
    assert await s.get_inflight("unknown") is None  # no half-record for a request without one
    assert await s.inflight_on("w1") == ["r1"]
    assert 0 < await redis.pttl("dlora:inflight:r1") <= 600_000  # it expires unless refreshed

    # A resume elsewhere moves the record, keeps the first request and the progress.
    resumed = GenerateRequest(
        request_id="r1", reply_to="x", prompt_token_ids=[1, 2], resume_token_ids=[7, 8, 10, 11, 12]
    )
    await s.put_inflight(resumed, "w2")
    rec = await s.get_inflight("r1")
    assert (rec.worker, rec.request, rec.tokens) == ("w2", req, [7, 8, 10, 11, 12])
    assert await s.inflight_on("w1") == [] and await s.inflight_on("w2") == ["r1"]

    await s.record_progress("w2", {}, {"r1": 0})
    assert await s.get_inflight("r1") is None and await s.inflight_on("w2") == []
    assert await s.claim_recovery("w1:a:1") and not await s.claim_recovery("w1:a:1")
    assert await s.claim_recovery("w1:a:2")  # the same worker lost again is another loss


async def test_a_given_up_attempt_is_fenced(redis: Redis) -> None:
    """A worker that stalled past the heartbeat had its request re-dispatched (attempt 1, maybe to
    itself): the stalled copy's progress and its end are refused, and it learns it is fenced."""
    s = StateStore(redis)
    req = GenerateRequest(request_id="r", reply_to="x", prompt_token_ids=[1])
    await s.put_inflight(req, "w1")
    await s.record_progress("w1", {"r": Sent(0, 0, [5], 0)}, {})
    again = msgspec.structs.replace(req, resume_token_ids=[5], recoveries=1)
    assert await s.put_inflight(again, "w2", expect=("w1", 0))
    assert not await s.put_inflight(again, "w3", expect=("w1", 0))  # a second dispatcher is too late
    assert await s.fenced("w1", {"r": Copy(0, False)}) == {"r"}
    assert await s.fenced("w2", {"r": Copy(1, False)}) == set()
    # no record: sent straight to the worker, or Redis lost it; or, for a recorded copy asked after
    # a stall, over (finished elsewhere)
    assert await s.fenced("w2", {"gone": Copy(0, False)}) == set()
    assert await s.fenced("w2", {"gone": Copy(0, True)}) == {"gone"}
    assert await s.record_progress("w2", {"gone": Sent(0, 0, [6], 0)}, {}) == set()  # progress goes on
    assert await s.record_progress("w1", {"r": Sent(0, 1, [6], 0)}, {}) == {"r"}
    assert await s.record_progress("w1", {}, {"r": 0}) == {"r"}  # its end does not drop the new record
    rec = await s.get_inflight("r")
    assert (rec.worker, rec.recoveries, rec.tokens) == ("w2", 1, [5])
    # re-dispatched back to the same worker: only the attempt tells the copies apart
    third = msgspec.structs.replace(again, recoveries=2)
    assert await s.put_inflight(third, "w1", expect=("w2", 1))
    assert await s.record_progress("w1", {"r": Sent(0, 1, [6], 0)}, {}) == {"r"}
    assert await s.record_progress("w1", {"r": Sent(2, 1, [6], 0)}, {}) == set()


async def test_a_record_is_dropped_only_by_whoever_holds_its_attempt(redis: Redis) -> None:
    """A dispatcher that fails (or drops) a request it was re-dispatching must not drop the record
    of the attempt another dispatcher sent meanwhile."""
    s = StateStore(redis)
    req = GenerateRequest(request_id="r", reply_to="x", prompt_token_ids=[1])
    await s.put_inflight(req, "w1")
    assert await s.put_inflight(msgspec.structs.replace(req, recoveries=1), "w2", expect=("w1", 0))
    assert not await s.delete_inflight("r", expect=("w1", 0))  # the late dispatcher's view
    rec = await s.get_inflight("r")
    assert rec is not None and (rec.worker, rec.recoveries) == ("w2", 1)
    assert await s.delete_inflight("r", expect=("w2", 1))
    assert await s.get_inflight("r") is None and await s.inflight_on("w2") == []
    assert await s.delete_inflight("gone")  # nothing there: nothing to keep
    assert await s.delete_inflight("gone", expect=("w2", 1))  # run again after its reply was lost
    # a first dispatch run again after its reply was lost is still the dispatcher's own
    fresh = GenerateRequest(request_id="f", reply_to="x", prompt_token_ids=[1])
    assert await s.put_inflight(fresh, "w1", new=True) and await s.put_inflight(fresh, "w1", new=True)
    assert not await s.put_inflight(msgspec.structs.replace(fresh, reply_to="y"), "w1", new=True)  # another's


async def test_a_sweep_without_grace_takes_a_record_written_in_its_own_millisecond(redis: Redis) -> None:
    """A CI run: a worker's late hand-back (grace 0: every record still naming it) left out a
    request whose record was written in the sweep's own millisecond ("changed hands more than 0 ms
    ago"), to wait for the heartbeat TTL and count as a death."""
    s = StateStore(redis)
    for i in range(20):  # each written and swept at once: most in one millisecond
        rid = f"just-{i}"
        await s.put_inflight(GenerateRequest(request_id=rid, reply_to="x", prompt_token_ids=[1]), "w1", incarnation="a")
        lost, _ = await s.sweep_inflight("w1", "a", set(), grace_s=0.0)
        assert rid in lost


async def test_sweep_hands_back_what_a_worker_does_not_hold(redis: Redis) -> None:
    s = StateStore(redis)
    for rid in ("held", "lost", "fresh"):
        await s.put_inflight(
            GenerateRequest(request_id=rid, reply_to="x", prompt_token_ids=[1]), "w1", incarnation="old"
        )
    # sent to this incarnation, and never arrived
    await s.put_inflight(
        GenerateRequest(request_id="unsent", reply_to="x", prompt_token_ids=[1]), "w1", incarnation="new"
    )
    await asyncio.sleep(0.25)
    await s.put_inflight(GenerateRequest(request_id="fresh", reply_to="x", prompt_token_ids=[1]), "w1")
    await redis.pexpire("dlora:inflight:held", 1000)
    # "fresh" changed hands within the grace: its message may still be on its way
    assert await s.sweep_inflight("w1", "new", {"held"}, grace_s=0.2) == ({"lost": 0, "unsent": 0}, {"unsent"})
    assert await redis.pttl("dlora:inflight:held") > 1000  # refreshed by its holder
    await redis.delete("dlora:inflight:lost", "dlora:inflight:unsent")  # expired: the index forgets them
    assert await s.sweep_inflight("w1", "new", {"held"}, grace_s=0.2) == ({}, set())
    assert await s.inflight_on("w1") == ["fresh", "held"]


async def test_a_record_counts_the_deaths_its_request_met_not_its_hand_backs(redis: Redis) -> None:
    s = StateStore(redis)
    req = GenerateRequest(request_id="r", reply_to="x", prompt_token_ids=[1])
    await s.put_inflight(req, "w1")
    again = msgspec.structs.replace(req, recoveries=1)
    assert await s.put_inflight(again, "w2", expect=("w1", 0), died=False)  # its message never came
    third = msgspec.structs.replace(req, recoveries=2)
    assert await s.put_inflight(third, "w1", expect=("w2", 1), died=True)
    rec = await s.get_inflight("r")
    assert rec is not None and (rec.recoveries, rec.deaths) == (2, 1)


async def test_a_record_is_taken_only_by_the_worker_and_attempt_it_names(redis: Redis) -> None:
    """Only a worker's loss after it took the attempt up is the request's death (Inflight.taken):
    marked at its arrival there, or by a progress write; another worker's or attempt's mark, or one
    for a record that is gone, does nothing."""
    s = StateStore(redis)
    req = GenerateRequest(request_id="t", reply_to="x", prompt_token_ids=[1])
    await s.put_inflight(req, "w1", new=True)
    assert (rec := await s.get_inflight("t")) is not None and not rec.taken
    await s.mark_taken("w2", {"t": 0})  # not its worker
    await s.mark_taken("w1", {"t": 1, "gone": 0})  # not its attempt; no record
    assert (rec := await s.get_inflight("t")) is not None and not rec.taken and await s.get_inflight("gone") is None
    await s.mark_taken("w1", {"t": 0})
    assert (rec := await s.get_inflight("t")) is not None and rec.taken
    again = msgspec.structs.replace(req, recoveries=1)
    assert await s.put_inflight(again, "w2", expect=("w1", 0), died=True)
    assert (rec := await s.get_inflight("t")) is not None and not rec.taken  # the next attempt: not yet
    await s.record_progress("w2", {"t": Sent(1, 0, [7], 0)}, {})  # running there: taken
    assert (rec := await s.get_inflight("t")) is not None and rec.taken
    assert await s.put_inflight(again, "w3")  # moved on (a move keeps the attempt): w3 has not taken it
    assert (rec := await s.get_inflight("t")) is not None and rec.recoveries == 1 and not rec.taken


async def test_a_record_says_whether_its_worker_marks_what_it_takes_up(redis: Redis) -> None:
    """``Inflight.marks_taken`` is the put's word for the worker it names: a put for an older
    worker says not, and one by an older version (which leaves the field) names another worker."""
    s = StateStore(redis)
    req = GenerateRequest(request_id="m", reply_to="x", prompt_token_ids=[1])
    assert await s.put_inflight(req, "w1", new=True, marks_taken=True)
    assert (rec := await s.get_inflight("m")) is not None and rec.marks_taken
    assert await s.put_inflight(req, "w2")  # not said: an older worker
    assert (rec := await s.get_inflight("m")) is not None and not rec.marks_taken
    assert await s.put_inflight(req, "w1", marks_taken=True)
    await redis.hset("dlora:inflight:m", "worker", "w3")  # an older version's put: worker changed, marks left
    assert (rec := await s.get_inflight("m")) is not None and not rec.marks_taken


async def test_traffic_and_lease(redis: Redis) -> None:
    s = StateStore(redis)
    await s.save_traffic({"a": 3.5, "b": 0.25})
    assert await s.load_traffic() == {"a": 3.5, "b": 0.25}
    await s.save_traffic({})
    assert await s.load_traffic() == {}
    first = await s.hold_lease("x", "one", 1.0)
    assert first > 0 and await s.hold_lease("x", "one", 1.0) == first  # a renewal keeps the epoch
    assert await s.hold_lease("x", "two", 1.0) == 0
    await s.release_lease("x", "two")  # not the holder: no effect
    assert await s.lease_holder("x") == "one"
    await s.release_lease("x", "one")
    second = await s.hold_lease("x", "two", 1.0)
    assert second > first  # a takeover: a later epoch
    await s.hold_lease("x", "two", 0.1)  # renewed with a short ttl, then left to lapse
    await asyncio.sleep(0.2)
    third = await s.hold_lease("x", "two", 1.0)
    assert third > second  # the same holder after a lapse: someone may have held it between
    await redis.delete(f"{s.p}:lease-epoch:x")  # Redis lost the counter (a restart without persistence)
    await s.release_lease("x", "two")
    await asyncio.sleep(0.002)  # a restart takes longer than the millisecond the clock counts in
    assert await s.hold_lease("x", "one", 1.0) > third  # still later: epochs start from Redis's clock


async def test_a_burst_beyond_the_pool_waits_for_a_connection(redis_server) -> None:  # type: ignore[no-untyped-def]
    """redis-py's default pool fails past its size ("Too many connections"): a burst of requests
    was answered 500. With the bounded, blocking pool the burst queues for its connections."""
    from dlora.common.redis_client import redis_client

    client = redis_client(redis_server.url, max_connections=2, pool_timeout_s=10)
    try:
        s = StateStore(client)
        await s.put_adapter(AdapterEntry(name="a", path="/a", rank=8, created=1.0, version="v1"))
        found = await asyncio.gather(*(s.get_adapter("a") for _ in range(300)))
        assert all(e is not None and e.version == "v1" for e in found)
    finally:
        await client.aclose()


async def test_an_untaken_delete_drops_only_that_request_never_taken_up(redis: Redis) -> None:
    """A dispatcher taking back its own cut-off write (take_back.py): the record must still hold
    that very request and be untaken, checked in the one script that deletes (a review: read then
    deleted, a worker's mark in between was lost). An older worker that marks nothing is left alone."""
    s = StateStore(redis)
    req = GenerateRequest(request_id="t", reply_to="x", prompt_token_ids=[1], params=SamplingParams(seed=7))
    assert await s.put_inflight(req, "w1", new=True, marks_taken=True)
    assert await s.delete_inflight("t", ("w1", 0), untaken=req) and await s.get_inflight("t") is None
    assert await s.put_inflight(req, "w1", new=True, marks_taken=True)
    await s.mark_taken("w1", {"t": 0})  # its worker took it up
    assert not await s.delete_inflight("t", ("w1", 0), untaken=req) and await s.get_inflight("t") is not None
    await s.delete_inflight("t")
    retry = msgspec.structs.replace(req, params=SamplingParams(seed=8))  # a retry under the same id
    assert await s.put_inflight(retry, "w1", new=True, marks_taken=True)
    assert not await s.delete_inflight("t", ("w1", 0), untaken=req)
    await s.delete_inflight("t")
    assert await s.put_inflight(req, "w1", new=True)  # an older worker: marks nothing
    assert not await s.delete_inflight("t", ("w1", 0), untaken=req)
    assert await s.delete_inflight("gone", ("w1", 0), untaken=req)  # nothing there: nothing to keep


async def test_a_background_responses_lease_is_renewed_while_its_record_is_its_runs_and_ended_once(
    redis: Redis,
) -> None:
    """A run renews its lease only while its record is what it wrote last; with its lease gone,
    the first reader ends the record (``end_unleased``), a second reading the same record finds
    it ended, not ended again; while it is held, nothing changes."""
    s = StateStore(redis)
    queued, running, failed = b'{"status":"queued"}', b'{"status":"in_progress"}', b'{"status":"failed"}'
    await s.lease_response("resp_1", "t", "gw-a", 60.0)
    await s.put_response("resp_1", "t", queued, b"[]", 60.0, leased=True)
    assert await s.end_unleased("resp_1", "t", queued, failed, closing(failed)) == queued  # (held)
    assert await s.swap_response("resp_1", "t", queued, running)
    assert not await s.lease_response("resp_1", "t", "gw-a", 60.0, expect=queued)  # (not its last write)
    assert await s.lease_response("resp_1", "t", "gw-a", 60.0, expect=running)
    await redis.delete(f"{s.p}:response-lease:t:resp_1")  # (lapsed: its gateway died)
    assert await s.end_unleased("resp_1", "t", running, failed, closing(failed)) == failed
    again = b'{"status":"failed","again":1}'
    assert await s.end_unleased("resp_1", "t", running, again, closing(again)) == failed
    assert not await s.lease_response("resp_1", "t", "gw-a", 60.0, expect=running)  # (its run then stops)
    assert await s.end_unleased("resp_2", "t", running, failed, closing(failed)) is None  # (none such)


async def test_a_streamed_background_responses_lapse_ends_its_stream_and_closes_it_to_its_run(redis: Redis) -> None:
    """A streamed run's lease gone: the reader that ends its record ends its stream too, with the
    failed object's ``response.failed`` numbered after its others, and its run's token no longer
    appends (a run that lived on past its lease); the response is still one made streamed."""
    s = StateStore(redis)
    running, failed = b'{"status":"in_progress"}', b'{"status":"failed"}'
    await s.put_response("resp_1", "t", running, b"[]", 60.0, stream="run-a", leased=True)
    assert await s.append_events("resp_1", "t", "run-a", [b"e0", b"e1"], 60.0)
    assert await s.end_unleased("resp_1", "t", running, failed, closing(failed)) == failed
    event = {"type": "response.failed", "response": {"status": "failed"}, "sequence_number": 2}
    last = b"event: response.failed\ndata: " + msgspec.json.encode(event) + b"\n\n"
    assert await s.response_events("resp_1", "t", 0) == [b"e0", b"e1", last]
    assert 0 < await redis.pttl(f"{s.p}:response-events:t:resp_1") <= 60_000
    assert not await s.append_events("resp_1", "t", "run-a", [b"e3"], 60.0)
    assert await s.streamed("resp_1", "t")
    await s.put_response("resp_2", "t", running, b"[]", 60.0, leased=True)  # (not streamed: no stream made)
    assert await s.end_unleased("resp_2", "t", running, failed, closing(failed)) == failed
    assert await s.response_events("resp_2", "t", 0) == []


async def test_whether_a_response_is_streamed_is_read_in_one_transaction(redis: Redis) -> None:
    """``streamed`` reads three things of a record (its run token, its ``leased`` mark, its events'
    key): read apart, a retry replacing the record between them mixed two records' fields. They
    are read in one MULTI/EXEC (counted by Redis's own command statistics, not by timing a race)."""
    s = StateStore(redis)
    await s.put_response("resp_1", "t", b'{"status":"in_progress"}', b"[]", 60.0, stream="run-a", leased=True)
    before = (await redis.info("commandstats")).get("cmdstat_exec", {}).get("calls", 0)
    assert await s.streamed("resp_1", "t")
    assert (await redis.info("commandstats"))["cmdstat_exec"]["calls"] == before + 1


async def test_an_items_holders_set_drops_expired_holders_as_it_is_written(redis: Redis) -> None:
    """An item sent back with every request (a client's own item id) is held anew before its last
    holder expires, so its set never expired: its expired holders, dropped by lookups alone, piled
    up while no item_reference read it. Each write drops them."""
    s, key = StateStore(redis), f"{StateStore(redis).p}:response-holders:t:msg_x"
    await s.put_response("resp_0", "t", b"{}", b"[]", 60.0, ["msg_x"])  # (the set outlives resp_1)
    await s.put_response("resp_1", "t", b"{}", b"[]", 0.001, ["msg_x"])
    for _ in range(10_000):  # (until Redis has expired it: a bound by count, not time)
        if not await redis.exists(f"{s.p}:response:t:resp_1"):
            break
        await asyncio.sleep(0.001)
    await s.put_response("resp_2", "t", b"{}", b"[]", 60.0, ["msg_x"])
    assert await redis.zrange(key, 0, -1) == [b"resp_0", b"resp_2"]


async def test_an_older_gateways_index_entry_is_read_when_the_items_set_has_no_holder_left(redis: Redis) -> None:
    """Rolling upgrade: an older gateway indexed an item as one string naming its turn; a newer
    gateway's turn holding it too made a set, and an older gateway's DELETE of that turn (which
    knows no set) left the set naming only a holder gone. The lookup read the set alone: a 404
    though the older turn still held the item. None left in the set, the older entry is read."""
    s = StateStore(redis)
    await s.put_response("resp_old", "t", b"{}", b"[]", 60.0)  # (an older gateway's: no set)
    await redis.set(f"{s.p}:response-item:t:msg_x", "resp_old", px=60_000)
    assert await s.responses_of_items(["msg_x"], "t") == ["resp_old"]
    await s.put_response("resp_new", "t", b"{}", b"[]", 60.0, ["msg_x"])
    assert await s.responses_of_items(["msg_x"], "t") == ["resp_new"]
    await redis.delete(f"{s.p}:response:t:resp_new")  # (an older gateway's DELETE: the record alone)
    assert await s.responses_of_items(["msg_x"], "t") == ["resp_old"]
