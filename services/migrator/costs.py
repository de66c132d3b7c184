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


def overflow_seconds(snapshot: ClusterSnapshot, w: WorkerState, demand: float, kv_pressure: float) -> float:
    """Seconds of ``w``'s time its preemptions take where its requests need ``demand`` KV blocks: the
    recompute of the tokens over ``kv_pressure`` of its blocks (what a preempted request recomputes
    when it runs again, on ``w``: the ILP's and ``worth``'s measure of KV pressure)."""
    over = max(0.0, demand - kv_pressure * w.kv_blocks)
    return over * w.block_size * snapshot.recompute_seconds_per_token if over else 0.0


def move_cost(snapshot: ClusterSnapshot, r: RequestState) -> float:
    """Nothing for a request holding no KV (waiting: its prompt is computed wherever it runs)."""
    per_token = min(snapshot.recompute_seconds_per_token, snapshot.kv_transfer_seconds_per_token)
    return r.context_tokens * per_token if r.running else 0.0


def ship_kv(snapshot: ClusterSnapshot) -> bool:
    """Whether a move ships its KV rather than recomputes it (the cheaper per token)."""
    return snapshot.kv_transfer_seconds_per_token < snapshot.recompute_seconds_per_token


def apply(snapshot: ClusterSnapshot, moves: list[MoveRequest]) -> ClusterSnapshot:
    """The snapshot as it would be after the moves (for checking a plan)."""
    dest = {m.request_id: m.to_worker for m in moves}
    reqs = [replace(r, worker=dest[r.request_id]) if r.request_id in dest else r for r in snapshot.requests]
    return replace(snapshot, requests=reqs)


def worth(snapshot: ClusterSnapshot, moves: list[MoveRequest], kv_pressure: float) -> float:
    """Seconds ``moves`` save (``Standing.worth``) where KV demand over ``kv_pressure`` of a worker's
    blocks is recomputed."""
    return Standing(snapshot, kv_pressure).worth(moves)


class Standing:
    """What a snapshot's plans are measured against, counted once: a plan's completion times, KV
    demand and worth then cost its moves and the workers, not the cluster's requests again. Counted
    anew for each, the planner's checks after CBC returned walked 10,000 requests a dozen times,
    outside the time it keeps back for them, and a plan took up to 1.08 s of its 1 s bound.
    ``kv_pressure``: the fraction of a worker's KV blocks past which its demand costs it the
    recompute of its preempted requests (``overflow_seconds``; ``PlannerSettings.kv_pressure``),
    one for every plan measured against this snapshot."""

    def __init__(self, snapshot: ClusterSnapshot, kv_pressure: float) -> None:
        self.snapshot = snapshot
        self.kv_pressure = kv_pressure
        self.workers = {w.worker: w for w in snapshot.workers}
        self.by_id = {r.request_id: r for r in snapshot.requests}
        self.load = completion_times(snapshot)
        self.demand = kv_demand(snapshot)
        self.running = running_adapters(snapshot)
        self._moving: dict[str, float] = {}  # request id -> ``moving``
        # The longest completion time (seconds) as the snapshot stands, each worker's counting its KV
        # recompute (``pressed``): ``MovePlan.makespan_before_s``, and what every ``worth`` drops from.
        self.longest = max(self.pressed(self.load, self.demand).values(), default=0.0)

    def moving(self, r: RequestState) -> float:
        """``move_cost`` of ``r``, once a request: the greedy pass prices it at each worker it looks at."""
        if (cost := self._moving.get(r.request_id)) is None:
            cost = self._moving[r.request_id] = move_cost(self.snapshot, r)
        return cost

    def after(self, moves: list[MoveRequest], charged: bool = False) -> tuple[dict[str, float], dict[str, int]]:
        """Each worker's completion time (seconds) and KV demand (blocks) once ``moves`` are made (in
        one order whatever theirs: the same moves, the same sums to the last digit). ``charged``: each
        move's recompute or KV shipped added where its request ends (as ``arrival``), the makespan a plan
        reports (``makespan``); left out where a plan is judged (``worth``, the gain check, the ILP's
        T), which count each move's cost once, in the total (DESIGN.md: the maximum load plus the
        cost of the moves). Charged there too, a move landing on the slowest worker paid twice."""
        load, demand = dict(self.load), dict(self.demand)
        for m in sorted(moves, key=lambda m: m.request_id):
            r = self.by_id[m.request_id]
            home, there = self.workers[r.worker], self.workers[m.to_worker]
            load[r.worker] -= self.arrival(r, home)
            load[m.to_worker] += self.arrival(r, there, charged)
            demand[r.worker] -= blocks_of(r.context_tokens, home.block_size)
            demand[m.to_worker] += blocks_of(r.context_tokens, there.block_size)
        return load, demand

    def arrival(self, r: RequestState, there: WorkerState, charged: bool = False) -> float:
        """Seconds of ``there``'s time ``r`` takes once moved there: its remaining work, and where
        ``charged`` its move's cost (the destination prefills its context, or takes its shipped KV,
        before it steps on)."""
        work = r.remaining_tokens * there.cost(r.adapter)
        return work + self.moving(r) if charged and there.worker != r.worker else work

    def makespan(self, moves: list[MoveRequest]) -> float:
        """The longest completion time (seconds) once ``moves`` are made, each move's recompute or KV
        shipped charged where its request ends, the reads they make waited for and each worker's KV
        recompute counted (``pressed``): what a plan reports (``MovePlan.makespan_after_s``, the
        bench's "after"), not what judges it."""
        load, demand = self.after(moves, charged=True)
        return max(self.waited(moves, self.pressed(load, demand), charged=True).values(), default=0.0)

    def cost(self, moves: list[MoveRequest]) -> float:
        """The recomputes or KV shipped of ``moves``, in all."""
        return sum(self.moving(self.by_id[m.request_id]) for m in moves)

    def overflow(self, worker: str, demand: float) -> float:
        """``worker``'s preemptions' recompute (seconds) where its requests need ``demand`` KV blocks
        (``overflow_seconds`` at ``kv_pressure``)."""
        return overflow_seconds(self.snapshot, self.workers[worker], demand, self.kv_pressure)

    def pressed(self, load: dict[str, float], demand: dict[str, int]) -> dict[str, float]:
        """``load`` (seconds) with each worker's preemptions' recompute where its KV demand is
        ``demand`` (``overflow``): its work, and the recompute it will do once over."""
        return {w: seconds + self.overflow(w, demand[w]) for w, seconds in load.items()}

    def worth(self, moves: list[MoveRequest]) -> float:
        """Seconds ``moves`` save: the longest completion time's drop (``after``, uncharged; the
        adapter reads they make waited for, ``waited``), each worker's counting the recompute of its
        KV demand over ``kv_pressure`` (``pressed``), less their recomputes or KV shipped in all,
        each counted once (DESIGN.md: the maximum load plus the cost of the moves): the ILP's
        objective, and what the gain check asks to be positive. A read costs only the wait of the
        requests moved for it (DESIGN.md: "every other stream steps on"): summed as a cost here
        while the gain check waited for it, each plan judged a read two ways, and where both plans
        were empty by the sum nothing went though one gained. The recompute is the pressed worker's
        time, and counts where it ends: summed over the cluster as work saved, a move off a pressed
        worker that finished early anyway was worth its relief though no completion came sooner,
        and a pressed worker's own completion was judged without it (left by the last session)."""
        load, demand = self.after(moves)
        after = max(self.waited(moves, self.pressed(load, demand)).values(), default=0.0)
        return self.longest - after - self.cost(moves)

    def waited(self, moves: list[MoveRequest], load: dict[str, float], charged: bool = False) -> dict[str, float]:
        """Each worker's completion time, ``load`` once ``moves`` are made (``after``, as ``charged``),
        with the reads they make waited for: a destination reads the adapter versions they run on that
        it neither holds nor runs (once each, one after another), and the requests moved there for
        them start after those reads, while its other streams step on beside them (added to all of
        its work, a read to a busy worker dropped a plan for a gain it brought)."""
        read: set[tuple[str, str]] = set()
        waiting: dict[str, float] = {}
        for m in moves:  # (one walk: ``worth``, the gain check and ``makespan`` each make one after CBC returns)
            r = self.by_id[m.request_id]
            if (key := r.key) and not runs_among(self.running[m.to_worker], key):
                read.add((m.to_worker, key))
                there = self.workers[m.to_worker]
                if not there.has(key):
                    waiting[there.worker] = waiting.get(there.worker, 0.0) + self.arrival(r, there, charged)
        reads: dict[str, float] = {}
        for w, key in sorted(read):  # (one order: the same sums whatever the set's)
            reads[w] = reads.get(w, 0.0) + read_price(self.snapshot, self.workers[w], key)
        out = dict(load)
        for w, seconds in reads.items():
            if seconds:
                out[w] = max(load[w] - waiting.get(w, 0.0), seconds) + waiting.get(w, 0.0)
        return out


def read_price(snapshot: ClusterSnapshot, w: WorkerState, key: str) -> float:
    """Seconds ``w`` takes to read adapter version ``key`` (``RequestState.key``) for a request moved
    there, as it measures its reads, scaled to the adapter's files; nothing where it holds it."""
    if not key or w.has(key):
        return 0.0
    return w.read_seconds(snapshot.file_bytes.get(name_of(key), 0)) or snapshot.adapter_load_seconds
