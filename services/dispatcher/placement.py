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

from dataclasses import dataclass

from dlora.common.messages import WorkerStats

# Per placement interval: traffic shares follow the last minute or so (at the dispatcher's 5 s).
DECAY = 0.9


@dataclass(frozen=True)
class WorkerCapacity:
    worker: str
    free_kv_blocks: int
    slots: int  # adapters it can hold on the device at once, of any rank (WorkerStats.max_loras)


def _tolerance(
    adapter: str,
    holders: list[str],
    share: float,
    capacity: dict[str, WorkerCapacity],
    placed: dict[str, list[str]],
    ranks: dict[str, int],
    penalty: float,
) -> float:
    """Free KV blocks behind the adapter per unit of its traffic share (higher is safer)."""
    total = 0.0
    for w in holders:
        others = [ranks.get(a, 16) for a in placed[w] if a != adapter]
        mixed = any(r != ranks.get(adapter, 16) for r in others)
        # A worker's free memory is shared by every adapter it holds.
        total += capacity[w].free_kv_blocks / max(1, len(placed[w])) * (1 - penalty if mixed else 1.0)
    return total / max(share, 1e-9)


def place(
    shares: dict[str, float],
    workers: list[WorkerCapacity],
    ranks: dict[str, int],
    current: dict[str, list[str]] | None = None,
    rank_mix_penalty: float = 0.1,
) -> dict[str, list[str]]:
    """worker -> adapters it should hold. Every adapter gets at least one replica (if slots allow),
    then replicas go to the adapter with the lowest tolerance, on the worker that raises it most."""
    capacity = {w.worker: w for w in workers}
    placed: dict[str, list[str]] = {w.worker: list((current or {}).get(w.worker, [])) for w in workers}

    def free_slots(w: str) -> int:
        return capacity[w].slots - len(placed[w])

    def holders(a: str) -> list[str]:
        return [w for w, adapters in placed.items() if a in adapters]

    for a in sorted(shares, key=lambda a: -shares[a]):  # one replica each, hottest first, roomiest worker
        if not holders(a):
            fits = [w for w in placed if free_slots(w) > 0]
            if fits:
                placed[max(fits, key=lambda w: (capacity[w].free_kv_blocks / (1 + len(placed[w])), w))].append(a)
    while True:
        scored = sorted(
            shares, key=lambda a: _tolerance(a, holders(a), shares[a], capacity, placed, ranks, rank_mix_penalty)
        )
        for a in scored:  # the least tolerant adapter that can still get a replica
            options = [w for w in placed if a not in placed[w] and free_slots(w) > 0]
            if options:

                def gain(w: str, a: str = a) -> float:
                    placed[w].append(a)
                    value = _tolerance(a, holders(a), shares[a], capacity, placed, ranks, rank_mix_penalty)
                    placed[w].remove(a)
                    return value

                placed[max(options, key=lambda w: (gain(w), w))].append(a)
                break
        else:
            return placed


def replan(
    traffic: dict[str, float], live: list[WorkerStats], ranks: dict[str, int]
) -> tuple[dict[str, float], dict[str, list[str]] | None]:
    """One placement interval: ``traffic`` (adapter -> requests dispatched, decayed) decayed once
    more, and the placement for the ``live`` workers by the shares of the registered adapters
    (``ranks``), each worker's current adapters (its stats') kept; None when there is no live
    worker or no traffic (the placement stays as it was)."""
    traffic = {a: c * DECAY for a, c in traffic.items() if c * DECAY > 1e-3}
    total = sum(traffic.values())
    if not live or total <= 0:
        return traffic, None
    capacity = [WorkerCapacity(w.worker, w.free_blocks, w.max_loras) for w in live]
    shares = {a: c / total for a, c in traffic.items() if a in ranks}
    return traffic, place(shares, capacity, ranks, {w.worker: [a.name for a in w.adapters] for w in live})


def min_tolerance(
    placement: dict[str, list[str]],
    shares: dict[str, float],
    workers: list[WorkerCapacity],
    ranks: dict[str, int],
    rank_mix_penalty: float = 0.1,
) -> float:
    capacity = {w.worker: w for w in workers}
    return min(
        _tolerance(a, [w for w, ads in placement.items() if a in ads], s, capacity, placement, ranks, rank_mix_penalty)
        for a, s in shares.items()
    )


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
