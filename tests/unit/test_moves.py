"""The sending side of a move alone: which moves a worker takes, and a request handed off with its
cache in chunks that the receiving side's inbox puts back together."""

from __future__ import annotations

import asyncio

import msgspec
import pytest
import torch

from dlora.common.messages import (
    GenerateRequest,
    MovePlan,
    MoveRequest,
    PlanTrigger,
    RequestLoad,
    SamplingParams,
    WorkerStats,
)
from dlora.services.worker import moves
from dlora.services.worker.engine import stopping
from dlora.services.worker.engine.kv_transfer import KVSnapshot
from dlora.services.worker.kv_inbox import KVInbox
from tests.unit.planner_cases import worker_stats

REQ = GenerateRequest(request_id="r", reply_to="_INBOX.r", prompt_token_ids=[1, 2, 3], params=SamplingParams())


def plan(
    epoch: int = 3,
    created: float = 100.0,
    trigger: PlanTrigger | None = None,
    stats_sent: dict[str, float] | None = None,
) -> MovePlan:
    return MovePlan(
        plan_id="p",
        epoch=epoch,
        created=created,
        stats_sent=stats_sent or {},
        trigger=trigger,
        moves=[
            MoveRequest(request_id="a", adapter="x", to_worker="w1", ship_kv=True),
            MoveRequest(request_id="b", adapter=None, to_worker="w0", ship_kv=False),
        ],
    )


def test_a_worker_takes_the_moves_away_from_it() -> None:
    assert moves.moves_to_take(plan(), "w0", epoch_seen=3, now=101.0) == [moves.Move("a", "w1", True, plan_id="p")]


def test_a_move_carries_its_plan_s_trigger() -> None:
    taken = moves.moves_to_take(plan(trigger=PlanTrigger.KV_PRESSURE), "w0", epoch_seen=3, now=101.0)
    assert taken == [moves.Move("a", "w1", True, "kv-pressure", plan_id="p")]
    assert moves.moves_to_take(plan(), "w0", epoch_seen=3, now=101.0) == [
        moves.Move("a", "w1", True, "none", plan_id="p")
    ]


def test_a_move_carries_whether_its_destination_marks_what_it_takes_up() -> None:
    """Recorded with the move (``put_inflight``'s ``marks_taken``): an older destination's loss is
    counted as a death whether it took the request up or not."""
    marking = MovePlan(
        plan_id="p",
        epoch=3,
        created=100.0,
        moves=[MoveRequest(request_id="a", adapter=None, to_worker="w1", to_marks_taken=True)],
    )
    assert moves.moves_to_take(marking, "w0", epoch_seen=3, now=101.0) == [
        moves.Move("a", "w1", False, "none", True, plan_id="p")
    ]
    assert moves.moves_to_take(plan(), "w0", epoch_seen=3, now=101.0) == [
        moves.Move("a", "w1", True, "none", False, plan_id="p")
    ]


def test_stale_plans_are_refused() -> None:
    assert moves.moves_to_take(plan(epoch=2), "w0", epoch_seen=3, now=101.0) is None  # a deposed leader's
    assert moves.moves_to_take(plan(), "w0", epoch_seen=0, now=100.0 + moves.PLAN_MAX_AGE_S + 1) is None


def test_a_plans_age_is_read_on_the_workers_own_clock() -> None:
    """A helper's multi-host trial: a GPU host whose clock ran 10 s fast ignored every plan (the
    migrator's ``created`` against its own clock). Its stats' ``sent`` is on its own clock."""
    made_from = plan(stats_sent={"w0": 110.0})  # the migrator's clock said 100; w0's, 110
    assert moves.moves_to_take(made_from, "w0", epoch_seen=3, now=111.0) == [moves.Move("a", "w1", True, plan_id="p")]
    assert moves.moves_to_take(made_from, "w0", epoch_seen=3, now=110.0 + moves.PLAN_MAX_AGE_S + 1) is None


def test_a_plan_holds_past_the_worker_s_stats_interval() -> None:
    """A worker sending its stats every 8 s: the migrator plans from the latest it heard, up to 8 s
    old, and a plan made from them holds ``PLAN_MAX_AGE_S`` past that, as its refusals are said for
    that long. A fixed 5 s dropped each plan made from stats sent more than 5 s before (left by the
    last session: every plan, with stats sent every 5 s or more)."""
    refusals = moves.Refusals(stats_interval_s=8.0)
    made_from = plan(stats_sent={"w0": 100.0})
    taken = moves.moves_to_take(made_from, "w0", epoch_seen=3, now=107.0, max_age_s=refusals.age_s)
    assert taken == [moves.Move("a", "w1", True, plan_id="p")]
    assert moves.moves_to_take(made_from, "w0", epoch_seen=3, now=113.5, max_age_s=refusals.age_s) is None
    refusals.add(moves.Move("a", "w1", True, plan_id="p"), now=10.0)
    assert refusals.lately(now=10.5) == refusals.lately(now=22.5) == {"p": ["a"]}
    assert refusals.lately(now=23.5) == {}


def test_a_recomputed_move_sends_no_cache() -> None:
    resumed, chunks = moves.handoff(REQ, [7, 8], 1, next_seq=2, kv=None, kv_export_s=0.3)
    assert chunks == [] and (resumed.resume_token_ids, resumed.next_seq, resumed.kv_chunks, resumed.kv_export_s) == (
        [7, 8],
        2,
        0,
        0.0,
    )
    assert resumed.prompt_token_ids == REQ.prompt_token_ids and resumed.request_id == "r"


async def test_a_shipped_cache_arrives_whole(monkeypatch) -> None:
    monkeypatch.setattr(moves, "KV_CHUNK_BYTES", 1000)  # several chunks from a small cache
    kv = KVSnapshot(tokens=4, k=torch.randn(2, 4, 1, 64), v=torch.randn(2, 4, 1, 64))
    data = kv.to_bytes()
    resumed, chunks = moves.handoff(REQ, [7], 0, next_seq=1, kv=data, kv_export_s=0.01)
    assert len(chunks) == resumed.kv_chunks == -(-len(data) // 1000) > 1
    assert all(c.total == len(chunks) and len(c.data) <= 1000 for c in chunks)
    assert resumed.kv_transfer and {c.transfer for c in chunks} == {resumed.kv_transfer}  # this move's shipment
    inbox = KVInbox(wait_s=2.0)
    waiting = asyncio.create_task(inbox.take("r", resumed.kv_transfer))
    for c in reversed(chunks):
        inbox.put(c)
    got = await waiting
    assert got is not None and torch.equal(got.k, kv.k) and torch.equal(got.v, kv.v)


def test_a_worker_takes_only_the_moves_of_requests_it_holds() -> None:
    """Every worker hears every plan: one that queued each move of another's request paid a thread
    hop and its step in flight taken in early for each (a trial: 4,000 moves elsewhere stalled an
    uninvolved worker's stream 0.47 s)."""
    assert moves.moves_to_take(plan(), "w0", epoch_seen=3, now=101.0, held={"a"}) == [
        moves.Move("a", "w1", True, plan_id="p")
    ]
    assert moves.moves_to_take(plan(), "w2", epoch_seen=3, now=101.0, held={"c"}) == []


def test_a_worker_says_the_moves_it_refused_for_as_long_as_a_plan_holds() -> None:
    """A source that refuses a planned move (its progress record lagging Redis) keeps the request:
    its stats say so (``WorkerStats.refused_moves``), by plan, until ``PLAN_MAX_AGE_S`` has passed
    (a stats message lost leaves the next ones to say it), the latest ``MAX_REFUSED`` at most."""
    refusals = moves.Refusals()
    refusals.add(moves.Move("a", "w1", True, plan_id="p1"), now=10.0)
    refusals.add(moves.Move("b", "w1", True, plan_id="p1"), now=11.0)
    refusals.add(moves.Move("a", "w2", True, plan_id="p2"), now=12.0)  # moved again by a later plan
    assert refusals.lately(now=12.0) == {"p1": ["a", "b"], "p2": ["a"]}
    assert refusals.lately(now=10.0 + moves.PLAN_MAX_AGE_S) == {"p1": ["b"], "p2": ["a"]}
    for i in range(moves.MAX_REFUSED + 5):
        refusals.add(moves.Move(f"r{i}", "w1", True, plan_id="p3"), now=13.0)
    said = refusals.lately(now=13.0)
    assert (
        list(said) == ["p3"] and len(said["p3"]) == moves.MAX_REFUSED and said["p3"][-1] == f"r{moves.MAX_REFUSED + 4}"
    )


def test_a_refusal_is_said_at_least_once_however_long_between_stats() -> None:
    """With ``stats_interval_s`` at ``PLAN_MAX_AGE_S`` or more, a refusal expired before any stats
    carried it, and its request stayed pinned ``settle_s`` (left by the last session): kept until
    one message has said it, then for ``PLAN_MAX_AGE_S`` as before."""
    refusals = moves.Refusals()
    refusals.add(moves.Move("a", "w1", True, plan_id="p1"), now=10.0)
    later = 10.0 + 2 * moves.PLAN_MAX_AGE_S  # the next stats, at a 10 s interval
    assert refusals.lately(now=later) == {"p1": ["a"]}
    assert refusals.lately(now=later + 1) == {}  # said, and past the age
    refusals.add(moves.Move("b", "w1", True, plan_id="p2"), now=20.0)
    assert refusals.lately(now=20.5) == refusals.lately(now=21.0) == {"p2": ["b"]}  # said, and within it
    refusals.add(moves.Move("b", "w2", True, plan_id="p2"), now=22.0)  # refused again: said again
    assert refusals.lately(now=22.0 + 2 * moves.PLAN_MAX_AGE_S) == {"p2": ["b"]}


def _stats(*ids: str) -> WorkerStats:
    loads = [RequestLoad(request_id=r, adapter=None, context_tokens=10, remaining_tokens=5) for r in ids]
    return worker_stats("w0", loads, spt=0.01)


def test_a_request_too_large_to_move_is_said_refused_and_pinned_while_it_is_here() -> None:
    """A request grown past what NATS carries was refused without a word: the migrator held it moved
    for ``settle_s`` and then planned it again, refused again, its cache exported each time (left by
    the last session). Its refusal is said as the others', and its stats pin it here, in the same
    message, for as long as it is here (its tokens only grow)."""
    refusals = moves.Refusals()
    refusals.add(moves.Move("big", "w1", True, plan_id="p1"), now=10.0, oversized=True)
    refusals.add(moves.Move("lag", "w1", True, plan_id="p1"), now=10.0)  # its record lagging: free next
    st = refusals.stated(_stats("big", "lag", "other"), now=11.0, held={"big", "lag", "other"})
    assert st.refused_moves == {"p1": ["big", "lag"]}
    assert {r.request_id: r.pinned for r in st.requests} == {"big": True, "lag": False, "other": False}
    st = refusals.stated(_stats("big"), now=10.0 + 2 * moves.PLAN_MAX_AGE_S, held={"big"})
    assert st.refused_moves == {} and [r.pinned for r in st.requests] == [True]  # pinned after the refusal
    st = refusals.stated(_stats("big"), now=40.0, held={"other"})  # ended here (an id used again: free)
    assert [r.pinned for r in st.requests] == [False] and refusals.oversized == set()


def test_a_request_refused_for_now_is_news_once_a_reason() -> None:
    """Refused only for now (Redis lagging), a request is planned and refused again at each plan, and
    its "it stays here" line was logged at every one (left by the last session): ``add`` says a
    refusal is news (to log) at its request's first, or where the reason changes, and again once
    the request has left and come back (forgotten with the requests no longer here)."""
    refusals = moves.Refusals()
    said = [
        refusals.add(moves.Move(r, "w1", True, plan_id=p), now=10.0, why=why)
        for r, p, why in (("a", "p1", "outage"), ("a", "p2", "outage"), ("b", "p2", "outage"), ("a", "p3", "held text"))
    ]
    assert said == [True, False, True, True]
    refusals.stated(_stats("b"), now=11.0, held={"b"})  # "a" gone from here
    assert refusals.add(moves.Move("a", "w1", True, plan_id="p4"), now=12.0, why="held text")
    assert not refusals.add(moves.Move("b", "w1", True, plan_id="p4"), now=12.0, why="outage")


def test_a_reason_that_comes_back_later_is_news_again() -> None:
    """Kept once per request and reason for as long as the request was here, a refusal for a reason
    that had cleared and come back (Redis lagging again later), or of a request moved away and back
    before the next stats, was not logged at all (left by the last session). A refusal episode
    lasts while its refusals are still said (each within ``age_s`` of the last, or not said yet)."""
    refusals = moves.Refusals()  # (age_s: PLAN_MAX_AGE_S, 5 s)

    def refused(plan_id: str, now: float) -> bool:
        return refusals.add(moves.Move("a", "w1", True, plan_id=plan_id), now=now, why="outage")

    assert refused("p1", now=10.0)
    refusals.lately(now=10.5)
    assert not refused("p2", now=13.0)  # the next plan, the same lag: one episode
    refusals.lately(now=13.5)
    assert not refused("p3", now=17.5)  # 7.5 s after the first, within the age of the last
    refusals.lately(now=18.0)
    refusals.lately(now=30.0)  # its refusals said no more: the episode is over
    assert refused("p4", now=40.0)  # Redis lagging again
    assert not refused("p5", now=50.0)  # p4's not said yet (a stats interval past the age): the same one
    refusals.left("a")  # moved away (and back, before the next stats)
    assert refused("p6", now=50.5)


def test_a_request_over_the_payload_only_by_its_held_stop_text_is_not_pinned() -> None:
    """The text held back for a stop string is only an end that could still grow into one
    (``stopping.visible_end``): the next token that breaks the match releases all of it, so a
    request over the limit by no more than that text fits once it comes (a token id more):
    refused for now, not pinned. Judged as a fixed window of the longest stop string less one,
    its characters at a byte each, one over by a held ``"Observ"`` was pinned for good. Over
    even without it, it never fits while here: pinned."""
    params = SamplingParams(stop=["Observation:"])
    ids, text = [7] * 50, "Thought: I should look. Observ"
    shown = stopping.visible_end(text, 0, params, finished=False)
    held = text[shown:]
    assert held == "Observ"
    req = msgspec.structs.replace(REQ, params=params)
    resumed, _ = moves.handoff(req, ids, 0, next_seq=1, kv=None, kv_export_s=0.0, text_held=held)
    size = len(msgspec.json.encode(resumed)) + moves.KV_FIELDS_BYTES
    assert moves.too_large(resumed, size) is None
    assert moves.too_large(resumed, size - 1) is moves.TooLarge.FOR_NOW
    text += "e the result"  # the next token: no stop string after all, the held text sent
    assert stopping.visible_end(text, shown, params, finished=False) == len(text)
    after, _ = moves.handoff(req, [*ids, 7], 0, next_seq=2, kv=None, kv_export_s=0.0)
    assert moves.too_large(after, size - 1) is None  # (it fits then)
    released = len(msgspec.json.encode(msgspec.structs.replace(resumed, resume_text_held=""))) + moves.KV_FIELDS_BYTES
    assert moves.too_large(resumed, released) is moves.TooLarge.FOR_NOW
    assert moves.too_large(resumed, released - 1) is moves.TooLarge.WHILE_HERE


def test_a_request_over_the_payload_is_encoded_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """Over the limit, a request was encoded a second time without its held text to see whether
    that text alone put it over: more than the bus's payload limit (1 MiB by default) encoded again
    on the event loop at every refused plan, where only the held text's size was new. Judged the
    same as by that second encoding (its size at the boundary, above), from one."""
    params = SamplingParams(stop=["Observation:"])
    req = msgspec.structs.replace(REQ, params=params)
    resumed, _ = moves.handoff(req, [7] * 50, 0, next_seq=1, kv=None, kv_export_s=0.0, text_held='Obs"erv')
    full = len(msgspec.json.encode(resumed)) + moves.KV_FIELDS_BYTES
    released = len(msgspec.json.encode(msgspec.structs.replace(resumed, resume_text_held=""))) + moves.KV_FIELDS_BYTES
    encode, encoded = msgspec.json.encode, []

    def counted(obj: object, *args: object, **kwargs: object) -> bytes:
        encoded.append(obj)
        return encode(obj, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(msgspec.json, "encode", counted)
    for limit, over in [(full, None), (released, moves.TooLarge.FOR_NOW), (released - 1, moves.TooLarge.WHILE_HERE)]:
        encoded.clear()
        assert moves.too_large(resumed, limit) is over
        assert sum(isinstance(o, GenerateRequest) for o in encoded) == 1, limit
    unheld = msgspec.structs.replace(resumed, resume_text_held="")
    assert moves.too_large(unheld, released - 1) is moves.TooLarge.WHILE_HERE
