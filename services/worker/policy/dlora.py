"""The dLoRA policy: dynamic merge/unmerge with an adaptive band and credits against starvation.

Every step, with F the batch plain FCFS would run (``fcfs_batch``) and n_a the queued requests
of adapter a (capped at a batch):

1. **Starvation first.** If an adapter with queued requests is owed more than
   ``starvation_s`` seconds of credit, run F unmerged, the starving adapters' requests first.
2. **Stay merged** on m while m is eligible and n_m >= L_m * |F|.
3. **Enter merged** on the most-queued eligible adapter a when n_a >= R_a * |F| and, by the
   measured costs, serving a merged for a typical merged epoch saves more than the switch costs.
4. Otherwise run F unmerged.

Eligible: not the base model, and credit >= -debt_floor_s. The thresholds are per adapter,
R_a = R / (1 + overhead(rank_a)) (and L_a likewise): an adapter that costs more to run unmerged
(higher rank, by the measured cost model) is merged at a smaller share of the batch.

**Credits** (``CreditLedger``) flow from the merged adapter, or from the adapters whose requests
jumped into the batch, to every adapter with a request in F that did not run; an owed adapter
is settled once nothing of it is displaced.

**Wait bound.** A request in F that does not run makes its adapter gain the step's seconds, and
no adapter's balance goes below -(debt_floor_s + (max_adapters + 1) * t_max) (only eligible
adapters are merged; one step moves at most one t_max per displaced adapter; settling never
crosses zero). So once in F, a request waits at most ``wait_bound_s(t_max)`` =
starvation_s + debt_floor_s + (max_adapters + 2) * t_max seconds of steps before it runs, t_max
being the longest step: its adapter then starves, and the next step is F. (It assumes the
scheduler admits what the policy chose; a step short of KV memory moves no credit.)

**Band.** At each change of mode the epoch that ended is compared with what the other mode would
have done over the same steps (the FCFS batches unmerged, or the most-queued adapter merged plus
the switches), using measured step and switch times. Merged epochs that lost raise R by
``band_up``; unmerged epochs that merging would have beaten by ``band_margin`` scale R by
``band_down``. L = ``band_ratio`` * R keeps the hysteresis.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any

import msgspec

from dlora.services.worker.policy.base import (
    BatchLimits,
    Policy,
    QueuedRequest,
    StepDecision,
    StepRecord,
    fcfs_batch,
)
from dlora.services.worker.policy.config import PolicyConfig
from dlora.services.worker.policy.costs import CostModel
from dlora.services.worker.policy.credits import BASE, CreditLedger


@dataclass
class _Epoch:
    """Actual and counterfactual work since the last change of mode."""

    merged: str | None
    steps: int = 0
    tokens: int = 0
    seconds: float = 0.0
    cf_tokens: int = 0
    cf_seconds: float = 0.0
    cf_adapter: str | None = None  # unmerged epochs: adapter the counterfactual has merged


@dataclass
class _Pending:
    """What decide() saw, handed back to observe() in the decision (``StepDecision.basis``)."""

    fcfs: list[QueuedRequest]
    best: str | None  # most-queued eligible adapter
    best_tokens: int  # tokens a merged step on it would feed


def _key(adapter: str | None) -> str:
    return BASE if adapter is None else adapter


class DLoraPolicy(Policy):
    """dLoRA's batching policy (OSDI'24): each step either merges the most-queued
    adapter or runs many adapters unmerged, by thresholds adapted from the throughput each mode
    measured (and what the other would have done), counting the cost of a switch; credits that grow
    while an adapter's requests wait serve a starving adapter first.

    Pure: ``decide`` sees the queue, ``observe`` the step that ran; the engine calls both from its
    own thread. ``checkpoint`` / ``restore`` carry its learned state across worker restarts.
    """

    def __init__(self, limits: BatchLimits, config: PolicyConfig | None = None) -> None:
        super().__init__(limits)
        self.config = config or PolicyConfig()
        self.r = self.config.r_initial
        self.credits = CreditLedger()
        self.costs = CostModel()
        self.ranks: dict[str, int] = {}
        self._epoch: _Epoch | None = None
        # Running estimate of how many steps a merged epoch lasts, for amortising a switch.
        self.merged_epoch_steps = 8.0

    # ---- thresholds -----------------------------------------------------------------------
    @property
    def l(self) -> float:  # noqa: E743 - the paper's L
        return self.config.band_ratio * self.r

    def _threshold(self, base: float, adapter: str) -> float:
        return base / (1.0 + self.costs.overhead(self.ranks.get(adapter, 0)))

    def wait_bound_s(self, t_max: float) -> float:
        c = self.config
        return c.starvation_s + c.debt_floor_s + (self.limits.max_adapters + 2) * t_max

    # ---- the decision ---------------------------------------------------------------------
    def decide(self, queue: list[QueuedRequest], merged_now: str | None) -> StepDecision:
        fcfs = fcfs_batch(queue, self.limits)
        if not queue:
            return StepDecision(merged=merged_now, request_ids=[])
        for r in queue:
            if r.adapter is not None:
                self.ranks[r.adapter] = r.rank
        by_adapter: dict[str, list[QueuedRequest]] = {}
        for r in queue:
            if r.adapter is not None and len(by_adapter.setdefault(r.adapter, [])) < self.limits.max_num_seqs:
                by_adapter[r.adapter].append(r)
        floor = -self.config.debt_floor_s
        eligible = {a: rs for a, rs in by_adapter.items() if self.credits[a] >= floor}
        # Most queued first; among equals the one whose oldest request came first.
        best = max(eligible, key=lambda a: (len(eligible[a]), -eligible[a][0].arrival), default=None)
        best_rs = eligible[best] if best is not None else []
        seen = _Pending(fcfs, best, sum(r.num_new for r in best_rs))

        queued_keys = {_key(r.adapter) for r in queue}
        starving = {k for k in queued_keys if self.credits[k] > self.config.starvation_s}
        if starving:
            first = [r for r in fcfs if _key(r.adapter) in starving]
            rest = [r for r in fcfs if _key(r.adapter) not in starving]
            return StepDecision(merged=None, request_ids=[r.request_id for r in first + rest], basis=seen)

        n_fcfs = len(fcfs)
        if merged_now in eligible and len(eligible[merged_now]) >= self._threshold(self.l, merged_now) * n_fcfs:
            return StepDecision(merged=merged_now, request_ids=[r.request_id for r in eligible[merged_now]], basis=seen)
        if (
            best is not None
            and len(best_rs) >= self._threshold(self.r, best) * n_fcfs
            and self._pays_off(fcfs, best_rs)
        ):
            return StepDecision(merged=best, request_ids=[r.request_id for r in best_rs], basis=seen)
        return StepDecision(merged=None, request_ids=[r.request_id for r in fcfs], basis=seen)

    def _pays_off(self, fcfs: list[QueuedRequest], group: list[QueuedRequest]) -> bool:
        """Would merging ``group`` win back the switch within a typical merged epoch?

        Per step, serving the group merged saves (unmerged seconds per token - merged seconds per
        token) x its tokens; over ``merged_epoch_steps`` steps that must exceed the merge and
        unmerge it costs. Before both modes are measured, the count rule alone decides.
        """
        f_tokens = sum(r.num_new for r in fcfs)
        g_tokens = sum(r.num_new for r in group)
        ranks = {r.adapter: r.rank for r in fcfs if r.adapter is not None}
        unmerged = self.costs.step_seconds(f_tokens, sum(ranks.values()))
        merged = self.costs.step_seconds(g_tokens, 0)
        if unmerged is None or merged is None or not f_tokens or not g_tokens:
            return True
        saving = g_tokens * (unmerged / f_tokens - merged / g_tokens)
        return self.merged_epoch_steps * saving > self.costs.switch_seconds()

    # ---- learning from what ran -----------------------------------------------------------
    def observe(self, decision: StepDecision, record: StepRecord) -> None:
        self.costs.observe_step(record.num_tokens, record.lora_rank_sum, record.seconds)
        self.costs.observe_switch(record.merge_seconds or None, record.unmerge_seconds or None)
        pending = decision.basis
        if not isinstance(pending, _Pending):  # decided elsewhere: its times teach, its batch moves no credit
            return
        self._move_credits(pending, record)
        self._account(pending, record)

    def _move_credits(self, pending: _Pending, record: StepRecord) -> None:
        ran = set(record.request_ids)
        fcfs_ids = {r.request_id for r in pending.fcfs}
        displaced = {_key(r.adapter) for r in pending.fcfs if r.request_id not in ran}
        if record.merged is not None:
            payers: dict[str, float] = {record.merged: 1.0}
        else:  # whoever jumped in ahead of FCFS pays (nobody, for a batch this policy chose)
            jumped = (_key(a) for rid, a in zip(record.request_ids, record.adapters) if rid not in fcfs_ids)
            payers = dict(Counter(jumped))
        self.credits.transfer(displaced, payers, record.seconds)
        for key in [k for k, v in self.credits.balances.items() if v > 0 and k not in displaced]:
            self.credits.settle(key)

    def _account(self, pending: _Pending, record: StepRecord) -> None:
        epoch = self._epoch
        if epoch is None or epoch.merged != record.merged:
            if epoch is not None:
                self._adapt(epoch)
            epoch = self._epoch = _Epoch(merged=record.merged)
        epoch.steps += 1
        epoch.tokens += record.num_tokens
        epoch.seconds += record.seconds + record.switch_seconds
        if record.merged is not None:  # counterfactual: the FCFS batch, unmerged
            fcfs_tokens = sum(r.num_new for r in pending.fcfs)
            ranks = {r.adapter: r.rank for r in pending.fcfs if r.adapter is not None}
            cf = self.costs.step_seconds(fcfs_tokens, sum(ranks.values()))
            if cf is not None:
                epoch.cf_tokens += fcfs_tokens
                epoch.cf_seconds += cf
        elif pending.best is not None:  # counterfactual: the most-queued adapter, merged
            cf = self.costs.step_seconds(pending.best_tokens, 0)
            if cf is not None:
                if pending.best != epoch.cf_adapter:
                    cf += self.costs.switch_seconds()
                    epoch.cf_adapter = pending.best
                epoch.cf_tokens += pending.best_tokens
                epoch.cf_seconds += cf

    def _adapt(self, epoch: _Epoch) -> None:
        if epoch.merged is not None:
            self.merged_epoch_steps = 0.8 * self.merged_epoch_steps + 0.2 * epoch.steps
        if epoch.seconds <= 0 or epoch.cf_seconds <= 0 or epoch.cf_tokens == 0:
            return
        c = self.config
        seconds = epoch.seconds
        if epoch.merged is not None:  # its unmerge is paid by the next epoch's first step
            seconds += self.costs.unmerge_seconds or 0.0
        actual = epoch.tokens / seconds
        counterfactual = epoch.cf_tokens / epoch.cf_seconds
        if epoch.merged is not None and actual < counterfactual:
            self.r = min(c.r_max, self.r + c.band_up)
        elif epoch.merged is None and counterfactual > actual * (1 + c.band_margin):
            self.r = max(c.r_min, self.r * c.band_down)

    # ---- checkpoint -----------------------------------------------------------------------
    def checkpoint(self) -> dict[str, Any]:
        return {
            "r": self.r,
            "credits": dict(self.credits.balances),
            "costs": self.costs.to_dict(),
            "config": msgspec.to_builtins(self.config),
        }

    def restore(self, state: dict[str, Any]) -> None:
        self.r = float(state.get("r", self.config.r_initial))
        self.credits = CreditLedger({k: float(v) for k, v in state.get("credits", {}).items()})
        if "costs" in state:
            self.costs = CostModel.from_dict(state["costs"])
