"""A worker's adapter reads, pure: the order they are read in, one at a time (``ReadOrder``), and
what they take (``ReadCosts``). The worker's reads (``adapters``) and the simulator's follow them."""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Container
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from dlora.services.worker.engine import LLMEngine

# The weight of a read in the figures a worker's stats give (``ReadCosts``): the last ten reads or
# so, as a disk's load changes.
READ_WEIGHT = 0.2
# A read that requests wait for begins past max_cpu_loras once it has waited this long for room:
# the adapters held may each have requests coming for ever, and none then ends to make room (a
# review: a rare adapter's read waited through 300 steps behind one busy adapter at max_cpu_loras 1).
# One read at a time: host memory grows by one adapter a wait at most, not one a request.
READ_ROOM_WAIT_S = 2.0


@dataclass
class ReadCosts:
    """What a worker's adapter reads take, as its stats say it (``WorkerStats.adapter_read_*``):
    decayed means of their seconds and of the bytes of the files read, and the line through them
    fitted by decayed least squares (seconds a byte more), once reads of more than one size were
    seen. A read has a part its size does not change (opening, parsing, checking the files): a
    trial read rank 8 in 4-11 ms, ranks 16-64 in 7-18 ms and rank 512 in 45 ms, so a price in
    proportion to the size from zero made rank 8 six times too cheap. Bytes, not ranks: an adapter
    on q and v only reads a fifth of one on all seven projections at its rank (Llama-7B). Pure: the
    worker's reads and the simulator's."""

    seconds: float = 0.0  # decayed mean (0: none read)
    nbytes: float = 0.0  # of the files read (0: not known)
    _var: float = 0.0  # decayed variance of the sizes
    _cov: float = 0.0  # and covariance of sizes and seconds

    def observe(self, seconds: float, nbytes: int) -> None:
        if self.seconds == 0.0:
            self.seconds, self.nbytes = seconds, float(nbytes)
            return
        w = READ_WEIGHT
        db, ds = nbytes - self.nbytes, seconds - self.seconds
        self.seconds += w * ds
        self.nbytes += w * db
        self._var = (1 - w) * (self._var + w * db * db)
        self._cov = (1 - w) * (self._cov + w * db * ds)

    @property
    def per_byte(self) -> float | None:
        """The fitted seconds a byte more, between 0 and in proportion from zero (``seconds /
        nbytes``); None while the reads' sizes hardly varied (then priced in proportion)."""
        if self.nbytes <= 0 or self._var <= 1e-6 * self.nbytes * self.nbytes:
            return None
        return min(max(0.0, self._cov / self._var), self.seconds / self.nbytes)

    def stats(self) -> dict[str, Any]:
        """``WorkerStats``' fields of the same names."""
        return {
            "adapter_read_seconds": self.seconds,
            "adapter_read_bytes": self.nbytes,
            "adapter_read_seconds_per_byte": self.per_byte,
        }


class ReadOrder:
    """The adapter reads asked for and not begun, in the order they are read one at a time: those
    requests wait for first, then prefetches, each in turn of asking; a prefetch's a request asks
    for goes ahead with the requests'. Pure: the worker's reads and the simulator's follow it."""

    def __init__(self) -> None:
        self._heap: list[tuple[bool, int, str]] = []  # (a prefetch's only, turn, key); stale entries skipped
        self._queued: dict[str, bool] = {}  # key -> asked for by prefetches only
        self._turns = itertools.count()

    def __contains__(self, key: object) -> bool:
        return key in self._queued

    def __len__(self) -> int:
        return len(self._queued)

    def ask(self, key: str, prefetch: bool) -> None:
        """``key`` asked for (again: where only prefetches asked, a request's now)."""
        if (only_prefetches := self._queued.get(key)) is None or only_prefetches and not prefetch:
            self._queued[key] = prefetch
            heapq.heappush(self._heap, (prefetch, next(self._turns), key))

    def requested(self) -> bool:
        """Whether a request waits for the next read (not prefetches only)."""
        return False in self._queued.values()

    def drop(self, key: str) -> bool:
        """``key`` no longer read, if only prefetches asked for it and it has not begun; whether it was."""
        if self._queued.get(key) is True:
            del self._queued[key]  # (its heap entry is skipped as stale)
            return True
        return False

    def next(self) -> str | None:
        """The key to read now, taken out; None when none is asked for."""
        while self._heap:
            key = heapq.heappop(self._heap)[2]
            if self._queued.pop(key, None) is not None:  # else begun already (asked for twice)
                return key
        return None


def has_room(engine: LLMEngine, not_begun: Container[str]) -> bool:
    """Whether ``engine``'s host memory has room for a read to begin (``WorkerAdapters.room``), its
    reads asked for and not begun being ``not_begun``: the worker's and the simulator's rule."""
    e = engine
    begun = sum(1 for k in e.loading if k not in not_begun)  # (not installed yet)
    if not e.runnable() and not begun:
        return True
    # A request moved in with its cache waits holding KV blocks the requests on adapters held
    # may need to end and make room: the reads go on meanwhile rather than wait on them.
    if any(s.adapter in e.loading and e.blocks.holds(rid) for rid, s in e.seqs.items()):
        return True
    busy = e.adapters_in_use()
    return sum(1 for k in e.adapters if k in busy) + begun < e.config.max_cpu_loras


def read_may_begin(engine: LLMEngine, order: ReadOrder, since: float | None, now: float) -> tuple[bool, float | None]:
    """Whether the next read of ``order`` may begin at ``now`` (seconds, the caller's clock): none
    is asked for, host memory has room (``has_room``), or a read a request waits for has waited
    for room since ``since`` for ``READ_ROOM_WAIT_S``; and since when it has waited (None: it does
    not). The worker's rule and the simulator's."""
    if not order or has_room(engine, order):
        return True, None
    if not order.requested():
        return False, None
    since = now if since is None else since
    return now - since >= READ_ROOM_WAIT_S, since
