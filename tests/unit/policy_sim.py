"""A pure simulation of one replica for policy tests: requests, steps with modelled costs, no model.

It applies a policy's decisions the way the engine's scheduler does (merged and mixed steps,
adapter slots, batch size; memory is unlimited) and measures, for every request, the longest run
of seconds it spent in the FCFS batch without running (the quantity the wait bound is about; once
it ran, a stream's pause) and its normalized latency (seconds from arrival to finish over the
steps it ran). Step times may be perturbed (``Noise``) to test a policy against measurements it
cannot trust.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from dlora.services.worker.policy import (
    BatchLimits,
    Policy,
    QueuedRequest,
    StepRecord,
    fcfs_batch,
    free_slots,
    lora_work,
)


@dataclass
class Arrival:
    step: int  # first step at which the request is queued
    adapter: str | None
    length: int  # steps it must run (prefill + decodes)
    rank: int = 16


@dataclass(frozen=True)
class Profile:
    """A made-up but plausible replica: base steps grow with tokens; LoRA adds ``per_adapter`` of
    the base step per adapter whose deltas run, and ``per_rank`` per rank on every token."""

    per_adapter: float = 0.05
    per_rank: float = 0.02 / 16
    merge_s: float = 0.03
    unmerge_s: float = 0.005

    def step_seconds(self, tokens: int, segments: int, rank_tokens: int) -> float:
        base = 0.02 + 0.001 * tokens
        return base * (1 + self.per_adapter * segments + self.per_rank * rank_tokens / max(1, tokens))


CPU_LIKE = Profile()
# LoRA as dear as in the dLoRA artifact's constants (unmerged 27 ms vs merged 15 ms at Llama-7B).
GPU_LIKE = Profile(per_adapter=0.1, per_rank=0.7 / 16, merge_s=0.02, unmerge_s=0.02)


@dataclass(frozen=True)
class Noise:
    """Measured step times off by up to ``jitter`` either way, and now and then ``stall`` times longer."""

    seed: int
    jitter: float = 0.5
    stall_p: float = 0.02
    stall: float = 5.0

    def factors(self) -> random.Random:
        return random.Random(self.seed)


@dataclass
class SimResult:
    steps: int = 0
    seconds: float = 0.0
    t_max: float = 0.0  # longest step (switches excluded)
    max_displaced: dict[str, float] = field(default_factory=dict)  # request -> longest wait in F
    max_paused: dict[str, float] = field(default_factory=dict)  # request -> longest such wait once it ran
    finished: set[str] = field(default_factory=set)
    merges: int = 0
    mixed_steps: int = 0
    credit_totals: list[float] = field(default_factory=list)
    norm_latency: dict[str, float] = field(default_factory=dict)  # request -> seconds per step it ran

    @property
    def mean_norm_latency(self) -> float:
        return sum(self.norm_latency.values()) / max(1, len(self.norm_latency))


def simulate(
    policy: Policy,
    arrivals: list[Arrival],
    limits: BatchLimits,
    max_steps: int = 2000,
    profile: Profile = CPU_LIKE,
    noise: Noise | None = None,
) -> SimResult:
    pending = sorted(enumerate(arrivals), key=lambda ia: (ia[1].step, ia[0]))
    rng = noise.factors() if noise is not None else None
    queue: list[dict] = []  # live requests in arrival order
    ranks: dict[str, int] = {}
    merged: str | None = None
    res = SimResult()
    current: dict[str, float] = {}
    order = 0
    for step in range(max_steps):
        while pending and pending[0][1].step <= step:
            i, a = pending.pop(0)
            rank = a.rank if a.adapter else 0
            queue.append(
                {"id": f"q{i}", "adapter": a.adapter, "left": a.length, "len": a.length, "arrival": order}
                | {"ran": False, "rank": rank, "at": res.seconds}
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
            unmerge_s = profile.unmerge_s if merged is not None else 0.0
            merge_s = profile.merge_s if decision.merged is not None else 0.0
            res.merges += decision.merged is not None
            merged = decision.merged
        by_id = {r["id"]: r for r in queue}
        ran, adapters = [], set()
        slots = free_slots(limits.max_adapters, merged)
        for rid in decision.request_ids:
            r = by_id.get(rid)
            if r is None or len(ran) == limits.max_num_seqs:
                continue
            if merged is not None and r["adapter"] != merged and not decision.mixed:
                continue
            if r["adapter"] not in (None, merged) and r["adapter"] not in adapters:
                if len(adapters) >= slots:
                    continue
                adapters.add(r["adapter"])
            ran.append(r)
        segments, rank_tokens = lora_work([(r["adapter"], 1) for r in ran], merged, ranks)
        seconds = profile.step_seconds(len(ran), segments, rank_tokens)
        if rng is not None and noise is not None:
            seconds *= 1 + rng.uniform(-noise.jitter, noise.jitter)
            if rng.random() < noise.stall_p:
                seconds *= noise.stall
        ran_ids = {r["id"] for r in ran}
        for r in fcfs_batch(view, limits):
            if r.request_id in ran_ids:
                current.pop(r.request_id, None)
            else:
                current[r.request_id] = current.get(r.request_id, 0.0) + seconds
                res.max_displaced[r.request_id] = max(res.max_displaced.get(r.request_id, 0.0), current[r.request_id])
                if r.running:
                    res.max_paused[r.request_id] = max(res.max_paused.get(r.request_id, 0.0), current[r.request_id])
        record = StepRecord(
            merged=merged,
            request_ids=[r["id"] for r in ran],
            adapters=[r["adapter"] for r in ran],
            num_tokens=len(ran),
            seconds=seconds,
            merge_seconds=merge_s,
            unmerge_seconds=unmerge_s,
            lora_segments=segments,
            lora_rank_tokens=rank_tokens,
        )
        policy.observe(decision, record)
        res.mixed_steps += record.mode == "mixed"
        res.steps += 1
        res.seconds += seconds + merge_s + unmerge_s
        res.t_max = max(res.t_max, seconds)
        for r in ran:
            r["left"] -= 1
            r["ran"] = True
        for r in [r for r in queue if r["left"] == 0]:
            res.finished.add(r["id"])
            res.norm_latency[r["id"]] = (res.seconds - r["at"]) / r["len"]
            queue.remove(r)
        credits = getattr(policy, "credits", None)
        if credits is not None:
            res.credit_totals.append(credits.total())
    return res
