"""What the workers published, read off the bus: every reply chunk (``dlora.reply.>``: which
worker, which attempt, which sequence number, how many tokens) and every worker's stats.

This is how "nothing generated twice" is checked: the client sees only what the gateway kept after
dropping duplicates, but the tap sees every chunk any worker sent, so a request that two attempts
generated side by side (a stalled worker resuming after its request was re-dispatched) shows up as
chunks of the earlier attempt arriving after the later attempt's first, beyond the position the
later attempt started from.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field

import msgspec
import nats
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

from dlora.common import bus, subjects
from dlora.common.messages import TokenChunk, WorkerStats

_chunk = msgspec.json.Decoder(TokenChunk)
_stats = msgspec.json.Decoder(WorkerStats)


@dataclass(frozen=True)
class Seen:
    at: float  # monotonic, when the tap got it
    worker: str  # "" for the dispatcher or a gateway
    attempt: int  # the request's recoveries: its attempt number
    seq: int
    tokens: int
    error: bool


@dataclass
class Generation:
    """One request's chunks as the workers published them, and what they say about duplication."""

    published_tokens: int = 0
    attempts: int = 1  # distinct attempts that published anything
    last_attempt: int = 0  # the latest attempt that published: above 0, a recovery served it
    # The same chunk (attempt and sequence number) published again by the worker that generated it:
    # sent twice, not generated twice (a worker re-sends its recent chunks after a NATS reconnect,
    # since what went out meanwhile may be lost; one attempt generates each position once).
    same_attempt_duplicates: int = 0
    # Chunks a later attempt published again (a resume starts where the record says, which lags by
    # the step that went out just before the worker died): harmless (the gateway drops them) as long
    # as there is at most one per takeover.
    regenerated: int = 0
    # Chunks of an earlier attempt published after a later attempt's first: two attempts running at
    # once, i.e. generated twice (what fencing exists to stop). Not the chunk at or before the later
    # attempt's start: that step was done and handed to NATS when the worker stopped (in the
    # process's buffer, it goes out on SIGCONT), the one a resume regenerates (see ``regenerated``).
    stale_after_takeover: int = 0
    workers: list[str] = field(default_factory=list)
    # Per attempt: its workers, chunks, sequence numbers and when its first and last chunk came
    # (monotonic): the evidence when something was generated twice.
    timeline: list[dict[str, object]] = field(default_factory=list)

    @property
    def twice(self) -> bool:
        """Whether something was generated twice beyond the one re-sent step a takeover may cost."""
        return bool(self.stale_after_takeover or self.regenerated > self.attempts - 1)


def generation(chunks: list[Seen]) -> Generation:
    g = Generation()
    ours = [c for c in chunks if c.worker]  # the dispatcher's and gateways' error chunks generate nothing
    if not ours:
        return g
    g.published_tokens = sum(c.tokens for c in ours)
    g.attempts = len({c.attempt for c in ours})
    g.last_attempt = max(c.attempt for c in ours)
    g.workers = sorted({c.worker for c in ours})
    per_chunk = Counter((c.worker, c.attempt, c.seq) for c in ours)
    g.same_attempt_duplicates = sum(n - 1 for n in per_chunk.values())
    by_seq: dict[int, set[int]] = {}  # chunk -> the attempts that generated it
    for c in ours:
        by_seq.setdefault(c.seq, set()).add(c.attempt)
    g.regenerated = sum(len(a) - 1 for a in by_seq.values())
    first_of: dict[int, Seen] = {}  # attempt -> its first chunk to come
    for c in sorted(ours, key=lambda c: c.at):
        first_of.setdefault(c.attempt, c)
    g.stale_after_takeover = sum(
        int(any(a > c.attempt and f.at < c.at and c.seq > f.seq for a, f in first_of.items())) for c in ours
    )
    for attempt in sorted(first_of):
        mine = [c for c in ours if c.attempt == attempt]
        g.timeline.append(
            {
                "attempt": attempt,
                "workers": sorted({c.worker for c in mine}),
                "chunks": len(mine),
                "seqs": [min(c.seq for c in mine), max(c.seq for c in mine)],
                "first_at": min(c.at for c in mine),
                "last_at": max(c.at for c in mine),
            }
        )
    return g


class BusTap:
    """Subscribes to every reply and every worker's stats; rides out NATS restarts (it reconnects
    for ever and resubscribes, as nats-py does; chunks published while NATS is down are not seen)."""

    def __init__(self) -> None:
        self.chunks: dict[str, list[Seen]] = {}
        self.stats: dict[str, tuple[WorkerStats, float]] = {}  # latest per worker, and when
        self.incarnations: dict[str, list[tuple[str, float]]] = {}  # per worker: each incarnation, first seen
        self.nc: NATS | None = None
        self.errors = 0  # connection errors while NATS restarted (nats-py would print each)

    async def start(self, url: str) -> None:
        self.nc = await nats.connect(url, max_reconnect_attempts=-1, reconnect_time_wait=0.25, error_cb=self._on_error)
        await self.nc.subscribe(f"{subjects.PREFIX}.reply.>", cb=self._on_chunk)
        await self.nc.subscribe(subjects.STATS_ALL, cb=self._on_stats)
        await bus.flush(self.nc)

    async def _on_error(self, e: Exception) -> None:
        self.errors += 1

    async def _on_chunk(self, msg: Msg) -> None:
        try:
            c = _chunk.decode(msg.data)
        except msgspec.DecodeError:
            return
        seen = Seen(time.monotonic(), c.worker, c.recoveries, c.seq, len(c.token_ids), c.error is not None)
        self.chunks.setdefault(c.request_id, []).append(seen)

    async def _on_stats(self, msg: Msg) -> None:
        try:
            st = _stats.decode(msg.data)
        except msgspec.DecodeError:
            return
        now = time.monotonic()
        self.stats[st.worker] = (st, now)
        seen = self.incarnations.setdefault(st.worker, [])
        if not seen or seen[-1][0] != st.incarnation:
            seen.append((st.incarnation, now))

    def incarnation(self, worker: str) -> str | None:
        seen = self.incarnations.get(worker)
        return seen[-1][0] if seen else None

    def busy(self, worker: str) -> int:
        """Requests the worker's latest stats say it runs or queues."""
        st = self.stats.get(worker)
        return 0 if st is None else st[0].running + st[0].waiting

    def of(self, request_id: str) -> list[Seen]:
        return self.chunks.get(request_id, [])

    async def close(self) -> None:
        if self.nc is not None and not self.nc.is_closed:
            await self.nc.close()
