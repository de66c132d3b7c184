"""The sending side of the migrator's moves, pure: which of a plan's moves this worker takes, and
what a moved request becomes on the wire (the request resumed at its next token, and its KV cache
in chunks when the plan ships it). The worker shell does the I/O; ``kv_inbox`` is the receiving side.
"""

from __future__ import annotations

import enum
import uuid
from collections.abc import Container
from dataclasses import dataclass

import msgspec

from dlora.common.messages import GenerateRequest, KVChunk, MovePlan, WorkerStats
from dlora.common.plans import PLAN_MAX_AGE_S

# KV bytes per chunk: under NATS's default 1 MiB payload limit.
KV_CHUNK_BYTES = 512 << 10
# Bytes a move's message grows by when it ships the cache (a chunk count, a transfer id, its export
# time), kept free when its size is checked before the cache is exported.
KV_FIELDS_BYTES = 64
# The most refused moves a worker's stats say (the latest; ~50 bytes each): a plan moves a few
# hundred at most (BENCHMARKS.md's migration section), and its stats list up to 4,096 requests.
MAX_REFUSED = 1024


@dataclass(frozen=True)
class Move:
    """One request to hand to another worker at the next step boundary."""

    request_id: str
    to_worker: str
    ship_kv: bool  # its KV cache goes along; else the destination recomputes it
    trigger: str = "none"  # the bound that set its plan off (PlanTrigger's value; "none": the plan says not)
    to_marks_taken: bool = False  # the destination marks what it takes up (WorkerStats.marks_taken)
    plan_id: str = ""  # the plan it is of (MovePlan.plan_id): its refusal names it (``Refusals``)


def plan_max_age(stats_interval_s: float) -> float:
    """Seconds after a worker sends its stats that a plan made from them still holds, where it sends
    them every ``stats_interval_s``: ``PLAN_MAX_AGE_S`` past one interval. The migrator plans from
    the latest stats it has heard, up to an interval old when it looks; a fixed 5 s dropped every
    plan made from a worker's stats sent every 5 s or more (left by the last session)."""
    return PLAN_MAX_AGE_S + stats_interval_s


def moves_to_take(
    plan: MovePlan,
    worker_id: str,
    epoch_seen: int,
    now: float,
    held: Container[str] | None = None,
    max_age_s: float = PLAN_MAX_AGE_S,
) -> list[Move] | None:
    """The plan's moves of requests away from ``worker_id`` that it ``held`` (None: every one;
    one gone by the time it is applied is skipped then); None when the plan is stale: made from
    this worker's stats sent more than ``max_age_s`` (``plan_max_age``) before ``now`` (Unix
    seconds, this worker's clock; an older migrator's plan by its ``created``) or from a migrator
    epoch below ``epoch_seen``, a leader since deposed. Every worker hears every plan: a move of
    another's request cost a thread hop and the step in flight taken in early (a trial: a plan of
    4,000 moves elsewhere stalled an uninvolved worker's stream 0.47 s)."""
    if now - plan.stats_sent.get(worker_id, plan.created) > max_age_s or plan.epoch < epoch_seen:
        return None
    trigger = plan.trigger.value if plan.trigger else "none"
    return [
        Move(m.request_id, m.to_worker, m.ship_kv, trigger, m.to_marks_taken, plan.plan_id)
        for m in plan.moves
        if m.to_worker != worker_id and (held is None or m.request_id in held)
    ]


class Refusals:
    """The planned moves this worker refused lately, the request staying here (its progress record
    lagging Redis, Redis unreachable, or the request too large to send): what its stats say
    (``WorkerStats.refused_moves``) for ``age_s``, as long as a plan made from its stats
    holds (``plan_max_age``), so that a stats message lost on the way leaves later ones to say it, and past that until
    one stats message has said it (a worker whose ``stats_interval_s`` is ``PLAN_MAX_AGE_S`` or
    more let one expire unsaid, and its request stayed pinned ``settle_s``: left by the last
    session). The migrator then frees those requests for its next plan: it could not tell a refused
    move from one in transit, and pinned the request where it was for ``settle_s`` (10 s).

    A request refused for its size (``oversized``: ``TooLarge.WHILE_HERE``) stays too large while it
    is here (its tokens only grow): its stats pin it here (``RequestLoad.pinned``), in the message that says the
    refusal, so the migrator does not plan it again (it was planned and refused every ``settle_s``,
    its cache exported each time: left by the last session).

    Refusals come in episodes, each logged once (``add``): one opens at a request's refusal here for
    a reason, and lasts while its refusals for that reason are still said (``lately``: each within
    ``age_s`` of the last, or not said yet); it ends when the request leaves (``left``, or found gone
    at the next stats) or its last refusal is said no more. A refusal after that is news again: the
    condition came back, or the request came back, and the log shows each time it stayed."""

    def __init__(self, stats_interval_s: float = 0.0) -> None:
        # how long a plan made from this worker's stats, sent every ``stats_interval_s``, holds
        self.age_s = plan_max_age(stats_interval_s)
        # (plan id, request id) -> when refused (monotonic), and whether a stats message has said it
        self._at: dict[tuple[str, str], tuple[float, bool]] = {}
        self.oversized: set[str] = set()  # requests refused a move for their size (pinned here)
        # request id -> why its last move was refused, when, and whether a stats message has said it
        # since (its episode's, ``add``)
        self._last: dict[str, tuple[str, float, bool]] = {}

    def add(self, move: Move, now: float, why: str = "", oversized: bool = False) -> bool:
        """``move`` refused at ``now`` (monotonic seconds) for ``why``; ``oversized``: for its request's
        size. Whether that is news to log: the first of an episode (the class's docstring), i.e. not
        for the reason of its request's last refusal while here, or that one said no more. Refused
        only for now (Redis lagging, its held stop text), a request is planned and refused again at
        each plan until that passes, and its "it stays here" line was logged at every plan; kept
        once per request and reason for as long as it was here, the same reason coming back later
        (Redis lagging again a minute on, the request moved away and back) was not logged at all
        (left by the last sessions)."""
        last = self._last.get(move.request_id)
        news = last is None or last[0] != why or (now - last[1] >= self.age_s and last[2])
        self._last[move.request_id] = (why, now, False)
        key = (move.plan_id, move.request_id)
        self._at.pop(key, None)
        self._at[key] = (now, False)  # (last: the latest kept past ``MAX_REFUSED``)
        while len(self._at) > MAX_REFUSED:
            del self._at[next(iter(self._at))]
        if oversized:
            self.oversized.add(move.request_id)
        return news

    def left(self, request_id: str) -> None:
        """``request_id`` left this worker (its move went through): its episode ends now, not at the
        next stats, so that a refusal after it comes back is news however soon. What its stats say
        of its refusals is kept (the migrator frees only a refusal of the plan that moved it last)."""
        self._last.pop(request_id, None)
        self.oversized.discard(request_id)

    def lately(self, now: float, held: Container[str] | None = None) -> dict[str, list[str]]:
        """Plan id -> the request ids of its moves refused within ``age_s`` of ``now``, or
        earlier and not said yet; each is said from here on (the caller sends it). ``held``: the
        requests still here, whose episodes go on (the others' end); None: every one's."""
        self._at = {k: (at, True) for k, (at, said) in self._at.items() if now - at < self.age_s or not said}
        self._last = {r: (why, at, True) for r, (why, at, _) in self._last.items() if held is None or r in held}
        out: dict[str, list[str]] = {}
        for plan_id, request_id in self._at:
            out.setdefault(plan_id, []).append(request_id)
        return out

    def stated(self, stats: WorkerStats, now: float, held: Container[str]) -> WorkerStats:
        """``stats`` as they go out at ``now``: with the moves refused lately (``lately``) and the
        requests too large to move pinned; ``held``: the requests still here (the others are
        forgotten)."""
        refused = self.lately(now, held)
        self.oversized = {r for r in self.oversized if r in held}
        if not self.oversized:
            return msgspec.structs.replace(stats, refused_moves=refused)
        loads = [
            msgspec.structs.replace(r, pinned=True) if r.request_id in self.oversized and not r.pinned else r
            for r in stats.requests
        ]
        return msgspec.structs.replace(stats, refused_moves=refused, requests=loads)


class TooLarge(enum.Enum):
    """Why a move's message is over the bus's payload limit (``too_large``)."""

    FOR_NOW = "held text"  # by the text held back for a stop string, which the next token may release
    WHILE_HERE = "tokens"  # even without that text: it only grows, and stays pinned here


def too_large(resumed: GenerateRequest, max_payload: int) -> TooLarge | None:
    """Whether ``resumed`` (``handoff``'s, without its cache) is over ``max_payload`` bytes with a
    shipped cache's fields, and why; None: it fits. Its held text (``resume_text_held``) is only the
    end of its text that could still grow into a stop string (``stopping.partial_stop``): the next
    token that breaks the match releases all of it, so the message can shrink by all of its bytes
    (a token id more). Over without it, it never fits while here (its tokens only grow); over only
    by it, it is refused this time and planned again. Judged as a fixed window of the longest stop
    string less one (counted at a byte a character), a request over by a held ``"Observ"`` was
    pinned for good though its next token (``"e the"``) would have let it go (the stop-string
    hold-back now holds only a partial match)."""

    full = len(msgspec.json.encode(resumed)) + KV_FIELDS_BYTES
    if full <= max_payload:
        return None
    if not resumed.resume_text_held:
        return TooLarge.WHILE_HERE
    # Its bytes without the held text, not the whole request encoded again (over the limit: over 1 MiB
    # on the event loop): its field goes, the comma before it too (``omit_defaults``; request_id,
    # required, comes first), '{"resume_text_held":"..."}' less a brace
    held = len(msgspec.json.encode({"resume_text_held": resumed.resume_text_held})) - 1
    return TooLarge.FOR_NOW if full - held <= max_payload else TooLarge.WHILE_HERE


def handoff(
    request: GenerateRequest,
    output_ids: list[int],
    text_pending: int,
    next_seq: int,
    kv: bytes | None,
    kv_export_s: float,
    text_held: str = "",
    queued_s: float = 0.0,
) -> tuple[GenerateRequest, list[KVChunk]]:
    """What to send the destination: ``request`` resumed after ``output_ids`` (the tokens produced
    here, the text of the last ``text_pending`` not yet sent) with its client's next chunk number
    ``next_seq`` and the text they made not sent yet (``text_held``), and ``kv`` (a ``KVSnapshot``'s bytes,
    None when recomputed) split into chunks of at most ``KV_CHUNK_BYTES``. ``kv_export_s``: what
    exporting the cache took, seconds, for the destination's measure of a shipped cache's cost.
    ``queued_s``: the seconds it has waited unscheduled so far, where it has sent no token yet."""
    data = kv or b""
    transfer = uuid.uuid4().hex if data else ""
    chunks = [
        KVChunk(
            request_id=request.request_id,
            index=i // KV_CHUNK_BYTES,
            total=-(-len(data) // KV_CHUNK_BYTES),
            data=data[i : i + KV_CHUNK_BYTES],
            transfer=transfer,
        )
        for i in range(0, len(data), KV_CHUNK_BYTES)
    ]
    resumed = msgspec.structs.replace(
        request,
        resume_token_ids=list(output_ids),
        resume_text_pending=text_pending,
        resume_text_held=text_held,
        next_seq=next_seq,
        kv_chunks=len(chunks),
        kv_transfer=transfer,
        kv_export_s=kv_export_s if kv is not None else 0.0,
        queued_s=queued_s,
        recorded=True,  # the source records it at the destination before sending it
        continued=True,
    )
    return resumed, chunks
