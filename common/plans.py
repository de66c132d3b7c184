"""The migrator's side of the wire contract: the requests' load it plans from, its move plans,
their moves and the KV chunks a move ships. Re-exported by ``common/messages.py``, the one place
services import messages from."""

from __future__ import annotations

import enum

import msgspec

# A worker ignores a plan made from its stats sent longer ago than this past its stats interval
# (seconds, on its own clock: ``MovePlan.stats_sent``; ``worker.moves.plan_max_age``): they no
# longer hold. Here, below both, as the migrator's solve bound must stay under it (its settings).
PLAN_MAX_AGE_S = 5.0


class MoveRequest(msgspec.Struct, kw_only=True, frozen=True):
    """One running request to move, with its adapter (migration issue)."""

    request_id: str
    adapter: str | None
    to_worker: str
    # Ship the KV cache (cheaper than recomputing this context) rather than recompute.
    ship_kv: bool = False
    # The destination marks what it takes up (its stats' ``marks_taken``), recorded with the move.
    to_marks_taken: bool = False


class KVChunk(msgspec.Struct, kw_only=True, frozen=True, array_like=True):
    """One piece of a moved request's KV cache (safetensors bytes), msgpack-encoded on
    ``subjects.kv_transfer(worker, request_id)``."""

    request_id: str
    index: int
    total: int
    data: bytes
    transfer: str = ""  # one move's shipment (``GenerateRequest.kv_transfer``)


class PlanMethod(enum.StrEnum):
    """How the migration planner found a plan."""

    NONE = "none"  # nothing to plan (fewer than two workers, or no requests)
    ILP = "ilp"  # the ILP solved to optimality
    ILP_INCUMBENT = "ilp-incumbent"  # the ILP's best solution when its time bound expired
    # the greedy pass, where the ILP found nothing (``MovePlan.ilp_fallback`` says why) or planned worse
    GREEDY = "greedy"


class IlpFallback(enum.StrEnum):
    """Why the planner's ILP gave way to the greedy pass."""

    TOO_LARGE = "ilp-too-large"  # more request->worker variables than fit the time bound
    BUILD_TIMEOUT = "ilp-build-timeout"  # the greedy pass or the build left no time to solve (at its pace)
    FAILED = "ilp-failed"  # the solver ended without a solution


class PlanTrigger(enum.StrEnum):
    """Which of the migrator's bounds the cluster passed."""

    QUEUE_DELAY = "queue-delay"  # the most loaded worker's completion time exceeds the mean
    REQUEST_COUNT = "request-count"  # the most loaded worker holds too many requests over the mean
    KV_PRESSURE = "kv-pressure"  # a worker's KV demand is over the bound while another's is under


class MovePlan(msgspec.Struct, kw_only=True, frozen=True):
    """The migrator's decision, published on ``subjects.MOVES``. A worker moves only requests it
    still holds, and ignores plans made from its stats sent more than its stats interval plus
    ``PLAN_MAX_AGE_S`` before (``stats_sent``): a stale or partly failed plan leaves the other
    requests where they are."""

    plan_id: str
    # The migrator lease's epoch when the plan was made: workers drop plans of an epoch below the
    # highest they have seen (from a leader that has since been deposed).
    epoch: int = 0
    # Unix seconds the plan was made (the migrator's clock).
    created: float = 0.0
    # The stats it was made from: each worker's ``WorkerStats.sent``, on that worker's own clock, by
    # which the worker judges the plan's age (two hosts' clocks compared, a GPU host running 5 s
    # fast ignored every plan: a helper's trial). Empty: an older migrator; ``created`` then.
    stats_sent: dict[str, float] = {}
    moves: list[MoveRequest] = []
    method: PlanMethod = PlanMethod.NONE
    # Why the ILP gave way to the greedy pass (method GREEDY only; None there: the ILP's plan was worse).
    ilp_fallback: IlpFallback | None = None
    # The moves found were dropped for not shortening the longest completion by more than they cost.
    no_gain: bool = False
    # Which bound set it off (the migrator's [migrator.trigger] settings).
    trigger: PlanTrigger | None = None
    solve_seconds: float = 0.0
    # Estimated longest worker completion time before and after the moves.
    makespan_before_s: float = 0.0
    makespan_after_s: float = 0.0

    @property
    def label(self) -> str:
        """The method in one word for logs and benchmarks: ``greedy (ilp-too-large):no-gain``."""
        fallback = f" ({self.ilp_fallback})" if self.ilp_fallback else ""
        return f"{self.method}{fallback}{':no-gain' if self.no_gain else ''}"


class RequestLoad(msgspec.Struct, kw_only=True, frozen=True, array_like=True):
    """One unfinished request on a worker, for the migration planner."""

    request_id: str
    adapter: str | None
    context_tokens: int  # prompt + generated so far
    # Tokens it is expected still to generate: output lengths are unknown, so an estimate from
    # recently finished requests, never above max_tokens - generated (see worker/lengths.py).
    remaining_tokens: int
    # Prompt + max_tokens: what a worker it moves to must hold whole (WorkerStats.max_model_len).
    total_tokens: int = 0
    # In the running batch (its KV cached), rather than waiting for its prefill.
    running: bool = True
    # Its adapter's LoRA rank (0: the base model, or not read yet): a worker whose max_lora_rank is
    # below it cannot take it.
    rank: int = 0
    # It stays here: its adapter's version was replaced or removed (this worker may be the last to
    # hold it: moved, it failed mid-stream where no other worker could load it), or is being read;
    # or its worker's progress writes fail (Redis): a move would be refused (worker/move_out.py);
    # or a move of it was refused for its size, past what NATS carries (worker/moves.py's Refusals).
    pinned: bool = False
    # The version of its adapter it runs on ("": the base model, or an older worker that does not
    # say): a worker holding only another version must read this one to take it (the migrator).
    # Last, and defaulted: an older reader drops it, and a newer one reads an older list as "".
    version: str = ""
