"""From worker stats to a planner snapshot, and whether it is worth planning. Pure."""

from __future__ import annotations

from collections.abc import Mapping

import msgspec

from dlora.common.messages import PlanTrigger, WorkerStats
from dlora.common.reads import pooled_read
from dlora.services.migrator.costs import completion_times, kv_demand
from dlora.services.migrator.snapshot import ClusterSnapshot, RequestState, WorkerState


def snapshot_from_stats(
    stats: list[WorkerStats],
    file_bytes: dict[str, int],
    held: Mapping[str, frozenset[str]] | None = None,
    **costs: float,
) -> ClusterSnapshot:
    """The planner's view of ``stats`` (``file_bytes``: adapter -> its files' bytes, of the
    registry: what reading it costs); ``held``: the adapter names some of them hold, where the
    caller has them (a simulated cluster's dispatcher, from the same messages: 1,000 adapters on
    each of 256 workers took most of a look to list again; their versions are then not read, each
    taken as held at any version). Every worker is priced at the cluster's mean measured
    seconds per token (per adapter where measured somewhere, unweighted). A worker's own figure
    is a running average of its steps' times shared among their tokens, so it says as much about
    the batch sizes it ran at as about its speed: between workers of one model the differences
    are load history, and priced by them the planner moved requests between equally placed
    workers (simulated, BENCHMARKS.md: 1,561 moves for no gain, 291 at the mean), as dispatch did
    (``choose.py``). Known limit: workers on different hardware are priced alike too (their
    stats name device and dtype; a mean per device would keep that apart)."""
    measured = [s.seconds_per_token for s in stats if s.seconds_per_token > 0]
    mean = sum(measured) / len(measured) if measured else 0.01
    per_adapter: dict[str, list[float]] = {}
    for s in stats:
        for adapter, spt in s.adapter_seconds_per_token.items():
            per_adapter.setdefault(adapter, []).append(spt)
    adapter_mean = {a: sum(v) / len(v) for a, v in per_adapter.items()}
    unread = pooled_read(stats)  # one unmeasured: at their mean (as dispatch)
    workers = [
        WorkerState(
            s.worker,
            s.total_blocks,
            s.block_size,
            s.max_loras,
            (held or {}).get(s.worker) or frozenset(a.name for a in s.adapters),
            mean,
            adapter_mean,
            s.max_model_len,
            *(
                (s.adapter_read_seconds, s.adapter_read_bytes, s.adapter_read_seconds_per_byte)
                if s.adapter_read_seconds
                else unread
            ),
            max_lora_rank=s.max_lora_rank,
            model_digest=s.model_digest,
            failed_adapters=frozenset(s.failed_adapters),
            unlisted_tokens=s.unlisted_remaining_tokens,
            versions=None if (held or {}).get(s.worker) else _versions(s),
            by_version=s.unlisted_by_version is not None,
            unlisted_keys=frozenset(s.unlisted_by_adapter if s.unlisted_by_version is None else s.unlisted_by_version),
            unlisted_blocks=s.unlisted_kv_blocks,
        )
        for s in stats
    ]
    requests = [
        RequestState(
            r.request_id,
            s.worker,
            r.adapter,
            r.context_tokens,
            float(r.remaining_tokens),
            r.total_tokens,
            rank=r.rank,
            pinned=r.pinned,
            running=r.running,
            model_digest=s.model_digest,
            version=r.version,
        )
        for s in stats
        for r in s.requests
    ]
    return ClusterSnapshot(workers, requests, file_bytes, **costs)


def _versions(s: WorkerStats) -> frozenset[tuple[str, str]] | None:
    """The (name, version) pairs ``s`` holds; None where it says no version (``WorkerState.versions``)."""
    said = frozenset((a.name, a.version) for a in s.adapters)
    return said if any(v for _, v in said) else None


class TriggerBounds(msgspec.Struct, kw_only=True, frozen=True, forbid_unknown_fields=True):
    """When the cluster is out of balance enough to plan (``[migrator.trigger]`` in ``dlora.toml``);
    each bound may be turned off (None, ``null`` in the file or environment)."""

    # Queue-delay spread: the most loaded worker's estimated completion time exceeds the mean by
    # this fraction, and by at least min_gain_s seconds (also the least gain a plan must bring).
    imbalance: float | None = 0.25
    min_gain_s: float = 0.5
    # Request-count excess: the most loaded worker holds this many requests more than the mean.
    request_excess: int | None = None
    # KV pressure: a worker's KV demand (its requests' contexts) above this fraction of its blocks
    # while another worker is below it (someone could take the excess). Plans also price KV demand
    # above it, as the recompute it will cause.
    kv_pressure: float | None = 0.9
    # Plan only after this many consecutive imbalanced looks, and not within cooldown_s seconds of
    # the last solve (a plan's moves must show in the stats first; an imbalance no plan pays for
    # is not re-solved every look).
    patience: int = 2
    cooldown_s: float = 3.0
    # A request a plan moved is not moved again for this many seconds: its stats, and its new
    # worker's speed, read wrong for a while after (a trial: one moved 4 times in 2 s, w0 -> w2 ->
    # w1 -> w2 -> w1, and a 40-request burst took 5.3 s with the migrator against 2.0 s without).
    # A move its source refused (``WorkerStats.refused_moves``) frees its request at once.
    settle_s: float = 10.0

    def check(self) -> list[tuple[str, object, str]]:
        """Problems as (field, value, why); empty when the values are usable."""
        bad: list[tuple[str, object, str]] = []
        if self.imbalance is not None and self.imbalance < 0:
            bad.append(("imbalance", self.imbalance, "must be >= 0 or null"))
        if self.request_excess is not None and self.request_excess < 0:
            bad.append(("request_excess", self.request_excess, "must be >= 0 or null"))
        if self.kv_pressure is not None and not 0 < self.kv_pressure <= 1:
            bad.append(("kv_pressure", self.kv_pressure, "must be a fraction in (0, 1] or null"))
        if self.patience < 1:
            bad.append(("patience", self.patience, "must be >= 1"))
        if self.settle_s < 0:
            bad.append(("settle_s", self.settle_s, "must be >= 0"))
        return bad


def triggered(snapshot: ClusterSnapshot, bounds: TriggerBounds) -> PlanTrigger | None:
    """Which bound the cluster passes, or None."""
    if len(snapshot.workers) < 2:
        return None
    demand = kv_demand(snapshot)
    if bounds.imbalance is not None:
        times = list(completion_times(snapshot).values())
        mean, worst = sum(times) / len(times), max(times)
        # No plan brings the longest completion below the mean, nor below the longest request's
        # own: moved, a request takes as long elsewhere (every worker is priced alike; a price per
        # device would undo this bound). Spread that only one long request makes (a replica running
        # one 2,000-token answer beside idle ones) was solved for every cool-down, 0.5 s of CBC
        # each, for a plan that could not gain. Where a worker's KV is past what the planner prices
        # (its bound, or all of it), a move also relieves that: the mean alone bounds it then.
        workers = {w.worker: w for w in snapshot.workers}
        limit = bounds.kv_pressure if bounds.kv_pressure is not None else 1.0
        if any(demand[w.worker] > limit * w.kv_blocks for w in snapshot.workers):
            longest = 0.0
        else:
            longest = max(
                (r.remaining_tokens * workers[r.worker].cost(r.adapter) for r in snapshot.requests), default=0.0
            )
        if worst > mean * (1 + bounds.imbalance) and worst - max(mean, longest) > bounds.min_gain_s:
            return PlanTrigger.QUEUE_DELAY
    if bounds.request_excess is not None:
        counts = {w.worker: 0 for w in snapshot.workers}
        for r in snapshot.requests:
            counts[r.worker] += 1
        if max(counts.values()) - sum(counts.values()) / len(counts) > bounds.request_excess:
            return PlanTrigger.REQUEST_COUNT
    if bounds.kv_pressure is not None:
        pressure = [demand[w.worker] / max(1, w.kv_blocks) for w in snapshot.workers]
        if max(pressure) > bounds.kv_pressure and min(pressure) < bounds.kv_pressure:
            return PlanTrigger.KV_PRESSURE
    return None
