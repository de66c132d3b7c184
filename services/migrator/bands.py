"""The planner ILP's groups: a worker's requests of one adapter version that the same workers hold,
split in bands of alike ones, which its variables count at their means. Pure."""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, field
from functools import cached_property

from dlora.services.migrator.costs import blocks_of, move_cost
from dlora.services.migrator.snapshot import ClusterSnapshot, RequestState, WorkerState


@dataclass
class Group:
    worker: str
    adapter: str  # the version of it its requests run on (``RequestState.key``; BASE: the base model)
    requests: list[RequestState]  # the cheapest to move per second of work first
    fits: frozenset[str]  # the workers that hold each of them whole (all, unless contexts differ)
    _blocks: dict[int, int] = field(default_factory=dict)  # mean_blocks by block size

    @property
    def size(self) -> int:
        return len(self.requests)

    @cached_property
    def mean_remaining(self) -> float:
        return sum(r.remaining_tokens for r in self.requests) / self.size

    def mean_blocks(self, block_size: int) -> int:
        """KV blocks per request, counted request by request as kv_demand counts them and rounded
        up: whole coefficients let CBC find incumbents in time (fractional ones did not at
        32 x 128 x 2,000)."""
        if block_size not in self._blocks:
            self._blocks[block_size] = -(
                -sum(blocks_of(r.context_tokens, block_size) for r in self.requests) // self.size
            )
        return self._blocks[block_size]


def grouped(snapshot: ClusterSnapshot, bands: int = 0) -> list[Group]:
    """``snapshot``'s requests by worker, adapter version and the workers that hold them, each group
    split by ``band_of`` into ``bands`` keys (none: 0)."""
    by: dict[tuple[str, str, frozenset[str], tuple[int, ...]], list[RequestState]] = defaultdict(list)
    workers = {w.worker: w for w in snapshot.workers}
    # Which workers hold a request depends only on what ``WorkerState.holds`` reads of it: its
    # length, rank, base model, where it is pinned, and its adapter where a worker's read of it
    # failed lately; one set per distinct such (the model left out, one model's request took
    # another's set; the failed adapter left out, so did its requests: reviews).
    failed = set().union(*(w.failed_adapters for w in snapshot.workers))
    fits: dict[tuple[int, int, str, str, str | None], frozenset[str]] = {}
    price: dict[str, float] = {}
    for r in snapshot.requests:
        key = (
            r.total_tokens,
            r.rank,
            r.model_digest,
            r.worker if r.pinned else "",
            r.adapter if r.adapter in failed else None,
        )
        if key not in fits:
            fits[key] = frozenset(w.worker for w in snapshot.workers if w.holds(r))
        price[r.request_id] = price_of(snapshot, workers[r.worker], r)
        by[(r.worker, r.key, fits[key], band_of(price[r.request_id], r, bands))].append(r)
    # (each set of workers sorted once: for each of 8,000 bands, 0.3 s at 128 x 1,024 x 10,000)
    order = {f: sorted(f) for f in fits.values()}
    return [
        Group(w, a, sorted(rs, key=lambda r: price[r.request_id]), fits)
        for (w, a, fits, _), rs in sorted(by.items(), key=lambda kv: (*kv[0][:2], order[kv[0][2]], kv[0][3]))
    ]


def band_of(price: float, r: RequestState, bands: int) -> tuple[int, ...]:
    """Which band of its group ``r`` falls in: the half powers of two of its ``price`` per second
    of work (``price_of``) and of its remaining tokens (``bands`` of them; none: 0). The model
    prices a group's moves at its mean, and the ones named are its cheapest per second of work:
    unbanded, those carried more work and cost less than counted, and at every bench size the ILP's
    plan did worse than the greedy one it began from (a review). Banded, its requests are alike
    within a factor of 1.4 (by powers of two, one seeded plan in four still lost: two requests
    counted at 2 s each, and the one of 2.5 s named for the busier destination). A pinned request
    is in no band: it has one place to go, home, and its group's requests alike or not stay there
    (banded, each band of it was a variable more, of the budget that sets how fine bands can be)."""
    keys = (price, float(r.remaining_tokens))[: 0 if r.pinned else bands]
    return tuple(math.floor(2 * math.log2(max(k, 1e-9))) for k in keys)


def price_of(snapshot: ClusterSnapshot, home: WorkerState, r: RequestState) -> float:
    """A move's cost per second of work it takes from ``home``. By context alone, a group of
    60-token answers 3 tokens from their end beside 200-token ones moved the ones about to finish
    (the shortest prompts) as if they carried the group's mean work (a trial on real workers)."""
    return move_cost(snapshot, r) / max(1e-9, r.remaining_tokens * home.cost(r.adapter))
