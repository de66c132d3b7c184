"""What a plan costs and what it leaves: the cluster's completion times, KV demand and adapter slots
in a snapshot, and a move's price (the planner's, the trigger's and the tests' measure). Pure."""

from __future__ import annotations

from dataclasses import replace

from dlora.common.messages import MoveRequest
from dlora.common.versions import name_of
from dlora.services.migrator.snapshot import ClusterSnapshot, RequestState, Running, WorkerState, runs_among

BASE = ""  # the base model needs no slot


def completion_times(snapshot: ClusterSnapshot) -> dict[str, float]:
    workers = {w.worker: w for w in snapshot.workers}
    out = {w.worker: w.unlisted_seconds() for w in snapshot.workers}
    for r in snapshot.requests:
        out[r.worker] += r.remaining_tokens * workers[r.worker].cost(r.adapter)
    return out


def running_adapters(snapshot: ClusterSnapshot) -> dict[str, Running]:
    """The adapter versions (``RequestState.key``: a slot each) each worker has requests of, listed or
    counted past its list (not the base model's): what its slots hold for one step to run them all;
    with more than ``slots`` it runs them a few at a time, so a move brings one only where fewer run."""
    out: dict[str, set[str]] = {w.worker: set(w.unlisted_keys) - {BASE} for w in snapshot.workers}
    for r in snapshot.requests:
        if r.adapter:
            out[r.worker].add(r.key)
    return {w.worker: Running(out[w.worker], w.by_version) for w in snapshot.workers}  # (each key once)


def blocks_of(tokens: int, block_size: int) -> int:
    return -(-tokens // block_size)


def kv_demand(snapshot: ClusterSnapshot) -> dict[str, int]:
    """KV blocks each worker's requests need for their contexts so far (waiting ones too: they will;
    and those it counts but does not list, moved ones on their way among them)."""
    size = {w.worker: w.block_size for w in snapshot.workers}
    out = {w.worker: w.unlisted_blocks for w in snapshot.workers}
    for r in snapshot.requests:
        out[r.worker] += blocks_of(r.context_tokens, size[r.worker])
    return out


def kv_overflow_cost(snapshot: ClusterSnapshot, fraction: float) -> float:
    """Seconds of recompute that KV demand above ``fraction`` of each worker's blocks will cost."""
    demand = kv_demand(snapshot)
    over = sum(max(0.0, demand[w.worker] - fraction * w.kv_blocks) * w.block_size for w in snapshot.workers)
    return over * snapshot.recompute_seconds_per_token


def move_cost(snapshot: ClusterSnapshot, r: RequestState) -> float:
    """Nothing for a request holding no KV (waiting: its prompt is computed wherever it runs)."""
    per_token = min(snapshot.recompute_seconds_per_token, snapshot.kv_transfer_seconds_per_token)
    return r.context_tokens * per_token if r.running else 0.0


def apply(snapshot: ClusterSnapshot, moves: list[MoveRequest]) -> ClusterSnapshot:
    """The snapshot as it would be after the moves (for checking a plan)."""
    dest = {m.request_id: m.to_worker for m in moves}
    reqs = [replace(r, worker=dest[r.request_id]) if r.request_id in dest else r for r in snapshot.requests]
    return replace(snapshot, requests=reqs)


def worth(snapshot: ClusterSnapshot, moves: list[MoveRequest], kv_pressure: float) -> float:
    """Seconds ``moves`` save: the longest completion time's drop and the recompute of KV demand
    over ``kv_pressure`` they spare, less their recomputes or KV shipped and the adapter reads
    their destinations make (priced as the ILP prices them)."""
    after = apply(snapshot, moves)
    by_id = {r.request_id: r for r in snapshot.requests}
    workers = {w.worker: w for w in snapshot.workers}
    running = running_adapters(snapshot)
    read = {
        (r.key, m.to_worker)
        for m in moves
        if (r := by_id[m.request_id]).key and not runs_among(running[m.to_worker], r.key)
    }
    reads = sum(read_price(snapshot, workers[w], a) for a, w in read)
    saved = max(completion_times(snapshot).values()) - max(completion_times(after).values())
    spared = kv_overflow_cost(snapshot, kv_pressure) - kv_overflow_cost(after, kv_pressure)
    return saved + spared - sum(move_cost(snapshot, by_id[m.request_id]) for m in moves) - reads


def read_price(snapshot: ClusterSnapshot, w: WorkerState, key: str) -> float:
    """Seconds ``w`` takes to read adapter version ``key`` (``RequestState.key``) for a request moved
    there, as it measures its reads, scaled to the adapter's files; nothing where it holds it."""
    if not key or w.has(key):
        return 0.0
    return w.read_seconds(snapshot.file_bytes.get(name_of(key), 0)) or snapshot.adapter_load_seconds
