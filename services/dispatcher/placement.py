"""Where adapter replicas live, for burst tolerance (dLoRA's proactive placement). Pure.

Each adapter has an expected traffic share (decayed request counts). An adapter is burst
tolerant when the workers holding it have much free KV capacity for its share; the placement
greedily adds replicas so that the worst adapter's capacity-per-share is as high as possible,
within each worker's adapter slots (one adapter of any rank per slot, as the engine holds them:
``WorkerStats.max_loras``).
Mixing ranks on one worker has a cost (padding and uneven kernels, after LoRAServe): a replica
whose rank differs from the worker's others counts ``rank_mix_penalty`` less capacity there.
"""

from __future__ import annotations

import heapq
from collections import Counter
from dataclasses import dataclass

from dlora.common.messages import WorkerStats

# Per placement interval: traffic shares follow the last minute or so (at the dispatcher's 5 s).
DECAY = 0.9


@dataclass(frozen=True)
class WorkerCapacity:
    worker: str
    # Its free KV blocks less those its queue and arrivals need; below 0, how far past its room it
    # is: a part of nothing (``free_kv_blocks``), and among workers alike by their parts, the least
    # past its room is the roomiest (``_Placing.roomier``).
    kv_room: int
    slots: int  # adapters it can hold on the device at once, of any rank (WorkerStats.max_loras)

    @property
    def free_kv_blocks(self) -> int:
        """The KV blocks it has for the adapters it holds to share: its room, none past it."""
        return max(0, self.kv_room)


# Sums of tolerance parts are kept exactly, as integers in units of 2**-1075 (every finite float is
# a whole number of them): kept up to date as parts change and rounded once when read, so an
# adapter's tolerance is the exactly rounded sum (``math.fsum``) whatever the order of its parts.
_UNIT = 1 << 1075


def _exact(x: float) -> int:
    num, den = x.as_integer_ratio()  # den: a power of two
    return num * (_UNIT // den)


class _Placing:
    """A placement being built, indexed so that a replica added costs the adapters on its worker,
    not a walk over every worker's adapters for every adapter (at 256 workers x 1,000 adapters one
    placement took 34 s of the dispatcher's loop)."""

    def __init__(
        self, workers: list[WorkerCapacity], ranks: dict[str, int], current: dict[str, list[str]], penalty: float
    ) -> None:
        self.capacity = {w.worker: w for w in workers}
        self.placed: dict[str, list[str]] = {w.worker: list(current.get(w.worker, [])) for w in workers}
        self.ranks, self.penalty = ranks, penalty
        self.holders: dict[str, set[str]] = {}  # adapter -> the workers holding it
        self.rank_counts = {w: Counter(self.rank(a) for a in held) for w, held in self.placed.items()}
        for w, held in self.placed.items():
            for a in held:
                self.holders.setdefault(a, set()).add(w)
        self.sums = {a: sum(_exact(self.part(w, a)) for w in ws) for a, ws in self.holders.items()}

    def rank(self, adapter: str) -> int:
        return self.ranks.get(adapter, 16)

    def roomier(self, w: str) -> tuple[int, str]:
        """How ``w`` ranks among workers alike by their parts (higher first): the least past its room,
        then the last by name. With every queue past its room every part is 0, and by name alone each
        replica went to the last worker, however much more queued there than elsewhere (left by the
        last session)."""
        return min(0, self.capacity[w].kv_room), w

    def free_slots(self, w: str) -> int:
        return self.capacity[w].slots - len(self.placed[w])

    def add(self, w: str, adapter: str) -> None:
        """A replica of ``adapter`` (not held there) on ``w``: the parts of the others there shrink."""
        there = set(self.placed[w])
        before = {b: _exact(self.part(w, b)) for b in there}
        self.placed[w].append(adapter)
        self.rank_counts[w][self.rank(adapter)] += 1
        self.holders.setdefault(adapter, set()).add(w)
        for b in there:
            self.sums[b] += _exact(self.part(w, b)) - before[b]
        self.sums[adapter] = self.sums.get(adapter, 0) + _exact(self.part(w, adapter))

    def part(self, w: str, adapter: str, adding: bool = False) -> float:
        """What ``w`` adds to the adapter's free KV blocks (``adding``: a replica of it put there,
        where it is not): the worker's free memory, shared by every adapter it holds, a
        ``penalty`` less where another adapter there has another rank."""
        held = len(self.placed[w]) + adding
        mixed = len(self.placed[w]) - self.rank_counts[w][self.rank(adapter)] > 0
        return self.capacity[w].free_kv_blocks / max(1, held) * (1 - self.penalty if mixed else 1.0)

    def tolerance(self, adapter: str, share: float, plus: float = 0.0) -> float:
        """Free KV blocks behind the adapter per unit of its traffic share (higher is safer), the
        holders' parts summed exactly; ``plus``: with a new replica's part too."""
        return (self.sums.get(adapter, 0) + _exact(plus)) / _UNIT / max(share, 1e-9)

    def best_replica(self, adapter: str, share: float, options: list[str]) -> str:
        """The worker of ``options`` where a replica raises the adapter's tolerance most (ties: by
        ``roomier``). That tolerance rises with the new replica's part, so only the options with the
        largest parts are summed: those that round to the best."""
        parts = sorted(((self.part(w, adapter, adding=True), w) for w in options), reverse=True)
        top, chosen = parts[0]
        best = self.tolerance(adapter, share, top)
        for part, w in parts[1:]:
            if part != top and self.tolerance(adapter, share, part) != best:
                break  # and so is every one after it
            chosen = max(chosen, w, key=self.roomier)
        return chosen


def place(
    shares: dict[str, float],
    workers: list[WorkerCapacity],
    ranks: dict[str, int],
    current: dict[str, list[str]] | None = None,
    rank_mix_penalty: float = 0.1,
) -> dict[str, list[str]]:
    """worker -> adapters it should hold. Every adapter gets at least one replica (if slots allow),
    then replicas go to the adapter with the lowest tolerance (ties: in ``shares``' order), on the
    worker that raises it most, while one can."""
    p = _Placing(workers, ranks, current or {}, rank_mix_penalty)
    for a in sorted(shares, key=lambda a: -shares[a]):  # one replica each, hottest first, roomiest worker
        if a not in p.holders:
            if fits := [w for w in p.placed if p.free_slots(w) > 0]:
                p.add(max(fits, key=lambda w: (p.capacity[w].free_kv_blocks / (1 + len(p.placed[w])), p.roomier(w))), a)
    # The least tolerant first: a heap of (tolerance, order, adapter), an entry stale once the
    # adapter's tolerance changed (a replica added beside it). One that can take no replica now
    # never can again (free slots only shrink, holders only grow), so it is dropped for good
    # (``done``: popped again at each change beside it, it cost a walk over the workers each time).
    order = {a: i for i, a in enumerate(shares)}
    now = {a: p.tolerance(a, share) for a, share in shares.items()}
    heap = [(t, order[a], a) for a, t in now.items()]
    heapq.heapify(heap)
    roomy = [w for w in p.placed if p.free_slots(w) > 0]  # in the workers' order
    done: set[str] = set()
    while heap and roomy:
        t, _, a = heapq.heappop(heap)
        if t != now[a] or a in done:
            continue
        held = p.holders.get(a, set())
        if not (options := [w for w in roomy if w not in held]):
            done.add(a)
            continue
        chosen = p.best_replica(a, shares[a], options)
        p.add(chosen, a)
        if not p.free_slots(chosen):
            roomy.remove(chosen)
        for b in ({*p.placed[chosen]} & shares.keys()) - done:  # their worker's memory is shared more ways now
            now[b] = p.tolerance(b, shares[b])
            heapq.heappush(heap, (now[b], order[b], b))
    return p.placed


def min_tolerance(
    placement: dict[str, list[str]],
    shares: dict[str, float],
    workers: list[WorkerCapacity],
    ranks: dict[str, int],
    rank_mix_penalty: float = 0.1,
) -> float:
    p = _Placing(workers, ranks, placement, rank_mix_penalty)
    return min(p.tolerance(a, s) for a, s in shares.items())


def decay(traffic: dict[str, float]) -> dict[str, float]:
    """``traffic`` (adapter -> requests dispatched, decayed) one placement interval later: counts
    worn down to nothing go."""
    return {a: c * DECAY for a, c in traffic.items() if c * DECAY > 1e-3}


def placement_of(
    traffic: dict[str, float], live: list[WorkerStats], ranks: dict[str, int]
) -> dict[str, list[str]] | None:
    """The placement for the ``live`` workers by the traffic shares of the registered adapters
    (``ranks``), each worker's current adapters (its stats') kept; None when there is no live
    worker or no traffic (the placement stays as it was)."""
    total = sum(traffic.values())
    if not live or total <= 0:
        return None
    # KV on its way or queued counts as taken: a worker that had just taken a plan's moves (or held
    # a long queue) looked as roomy as before, until they ran (``WorkerStats.arriving_kv_blocks``)
    capacity = [WorkerCapacity(w.worker, w.free_blocks - w.arriving_kv_blocks, w.max_loras) for w in live]
    shares = {a: c / total for a, c in traffic.items() if a in ranks}
    return place(shares, capacity, ranks, {w.worker: [a.name for a in w.adapters] for w in live})


def round_robin(adapters: list[str], workers: list[WorkerCapacity], ranks: dict[str, int]) -> dict[str, list[str]]:
    """The baseline: adapter i on worker i mod N, while slots last."""
    placed: dict[str, list[str]] = {w.worker: [] for w in workers}
    names = [w.worker for w in workers]
    for i, a in enumerate(adapters):
        for k in range(len(names)):
            w = names[(i + k) % len(names)]
            if len(placed[w]) < next(x.slots for x in workers if x.worker == w):
                placed[w].append(a)
                break
    return placed
