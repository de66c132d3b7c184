"""A pure simulation of one replica for policy tests: requests, steps with modelled costs, no model.

It applies a policy's decisions the way the engine's scheduler does (merged filter, adapter
slots, batch size; memory is unlimited) and measures, for every request, the longest run of
seconds it spent in the FCFS batch without running — the quantity the wait bound is about.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from dlora.services.worker.policy import BatchLimits, Policy, QueuedRequest, StepRecord, fcfs_batch


@dataclass
class Arrival:
    step: int  # first step at which the request is queued
    adapter: str | None
    length: int  # steps it must run (prefill + decodes)
    rank: int = 16


@dataclass
class SimResult:
    steps: int = 0
    seconds: float = 0.0
    t_max: float = 0.0  # longest step (switches excluded)
    max_displaced: dict[str, float] = field(default_factory=dict)  # request -> longest wait in F
    finished: set[str] = field(default_factory=set)
    merges: int = 0
    credit_totals: list[float] = field(default_factory=list)


def step_seconds(tokens: int, adapters: set[str], ranks: dict[str, int]) -> float:
    """A made-up but plausible cost: base grows with tokens; unmerged LoRA adds per adapter and rank."""
    base = 0.02 + 0.001 * tokens
    if not adapters:
        return base
    return base * (1.1 + 0.01 * sum(ranks[a] for a in adapters) / 16)


MERGE_S, UNMERGE_S = 0.03, 0.005


def simulate(policy: Policy, arrivals: list[Arrival], limits: BatchLimits, max_steps: int = 2000) -> SimResult:
    pending = sorted(enumerate(arrivals), key=lambda ia: (ia[1].step, ia[0]))
    queue: list[dict] = []  # live requests in arrival order
    ranks: dict[str, int] = {}
    merged: str | None = None
    res = SimResult()
    current: dict[str, float] = {}
    order = 0
    for step in range(max_steps):
        while pending and pending[0][1].step <= step:
            i, a = pending.pop(0)
            queue.append(
                {
                    "id": f"q{i}",
                    "adapter": a.adapter,
                    "left": a.length,
                    "arrival": order,
                    "ran": False,
                    "rank": a.rank if a.adapter else 0,
                }
            )
            if a.adapter:
                ranks[a.adapter] = a.rank
            order += 1
        if not queue:
            if not pending:
                break
            continue
        view = [QueuedRequest(r["id"], r["adapter"], r["arrival"], r["ran"], 1, r["rank"]) for r in queue]
        decision = policy.decide(view, merged)
        merge_s = unmerge_s = 0.0
        if decision.merged != merged:
            unmerge_s = UNMERGE_S if merged is not None else 0.0
            merge_s = MERGE_S if decision.merged is not None else 0.0
            res.merges += decision.merged is not None
            merged = decision.merged
        by_id = {r["id"]: r for r in queue}
        ran, adapters = [], set()
        for rid in decision.request_ids:
            r = by_id.get(rid)
            if r is None or len(ran) == limits.max_num_seqs:
                continue
            if merged is not None and r["adapter"] != merged:
                continue
            if merged is None and r["adapter"] is not None and r["adapter"] not in adapters:
                if len(adapters) == limits.max_adapters:
                    continue
                adapters.add(r["adapter"])
            ran.append(r)
        seconds = step_seconds(len(ran), adapters if merged is None else set(), ranks)
        ran_ids = {r["id"] for r in ran}
        for r in fcfs_batch(view, limits):
            if r.request_id in ran_ids:
                current.pop(r.request_id, None)
            else:
                current[r.request_id] = current.get(r.request_id, 0.0) + seconds
                res.max_displaced[r.request_id] = max(res.max_displaced.get(r.request_id, 0.0), current[r.request_id])
        policy.observe(
            decision,
            StepRecord(
                merged=merged,
                request_ids=[r["id"] for r in ran],
                adapters=[r["adapter"] for r in ran],
                num_tokens=len(ran),
                lora_rank_sum=sum(ranks[a] for a in adapters) if merged is None else 0,
                seconds=seconds,
                merge_seconds=merge_s,
                unmerge_seconds=unmerge_s,
            ),
        )
        res.steps += 1
        res.seconds += seconds + merge_s + unmerge_s
        res.t_max = max(res.t_max, seconds)
        for r in ran:
            r["left"] -= 1
            r["ran"] = True
        for r in [r for r in queue if r["left"] == 0]:
            res.finished.add(r["id"])
            queue.remove(r)
        credits = getattr(policy, "credits", None)
        if credits is not None:
            res.credit_totals.append(credits.total())
    return res
