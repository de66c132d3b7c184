"""The dLoRA policy with a third mode: each step unmerged, merged or mixed, chosen by measured
costs and their uncertainty, with credits against starvation.

Every step, with F the batch plain FCFS would run (``fcfs_refilled``: within the device slots,
a slot held only by a prompt the step cannot feed going to the next adapter in line, as the
scheduler gives it) and n_a the queued requests of adapter a (capped at a batch). Counts, prices
and waiting are of what one step of a batch can feed (``within_budget``: its prompts cut to the
token budget as the scheduler cuts them):

1. **Starvation first** (before the watchdog, too). If an adapter with queued requests is owed
   more than ``starvation_s`` seconds of credit, its requests in F run first: in a mixed step
   beside the adapter merged now where that step feeds each of them that F unmerged, them first,
   would feed (each request of F, if that adapter is not eligible: it may then displace nobody),
   with no switch; else in F unmerged.
2. **Watchdog.** For ``watchdog_steps`` steps after a merged or mixed epoch's predicted steps
   (three at least) took ``watchdog_ratio`` times their predicted time, run F unmerged.
3. **The cheapest candidate per token** by the cost model (``CostModel``), the switch it needs
   spread over a typical merged epoch. A prompt's tokens are what it would feed under the
   candidate's merged state: the prefix cache's key holds that state (``engine/block_manager.py``),
   so a switch makes a prompt compute again what the cache holds for it now, at the candidate's
   cost and to no one's gain (priced per token of work, ``QueuedRequest.work``):
   - unmerged: F;
   - mixed on m, for m the most-queued eligible adapter and the one merged now (eligible, or its
     mixed batch leaves none of F waiting, so it owes nothing more): the FCFS batch in which m's
     requests need no slot and its correction holds one (refilled as F is);
   - merged on m, only where dLoRA's band lets it: stay while n_m >= L_m * |F|, enter at
     n_m >= R_m * |F| when serving m merged for a typical epoch wins back the switch. A merged
     step makes everyone else wait, which its cost per token does not show: the band and the
     credits bound that.
   Each request of F a candidate leaves waiting counts as much as one it serves (waiting is
   work put off, not saved). The incumbent (the mode and adapter of the last step) is left only
   for a candidate cheaper by ``kappa`` standard errors of the difference, so noisy measurements
   hold the policy still rather than walk it into a mode that stalls. Until the overhead fit has
   seen enough steps against measured base steps (``CostModel.fitted``) dLoRA's count rule
   decides, with mixed rather than merged steps (they stall nobody, and measure both), counting
   the adapter's requests the mixed step feeds (behind the others in it), not those a merged
   step would: the adapter merged now stays only while that step feeds L of F of them.

Eligible: not the base model, and credit >= -debt_floor_s. The thresholds are per adapter,
R_a = R / (1 + overhead(rank_a)) (and L_a likewise): an adapter that costs more to run unmerged
(higher rank, by the measured cost model) is merged at a smaller share of the batch.

**Credits** (``CreditLedger``) flow from the merged adapter (merged or mixed), or from the
adapters whose requests jumped into the batch, to every adapter with a request that F's own step
feeds (on the starvation path: F's with the starving adapters' requests first) that did not run;
a request of F that step would not feed either (a prompt past the token budget) waits either way,
and nobody owes it for that. An owed adapter is settled once nothing of it in F waits. F is
dLoRA's FCFS batch, which its credits compare the batch run with (the authors' artifact:
``_adjust_credit(scheduled_by_fcfs, scheduled)``, ``scheduled_by_fcfs`` being its FCFS step,
``queued[:max_num_seqs]``: it models no token budget, which ours counts): what FCFS itself runs,
so a request in a slot FCFS gives it too (the refill) jumps no one and pays nothing, and a step
that leaves it waiting owes it as any request of F.

**Wait bound.** A request that F's own step feeds and the step run does not makes its adapter gain
the step's seconds, and no adapter's balance goes below -(debt_floor_s + (max_adapters + 1) *
t_max): only eligible adapters are merged, merged or mixed (a merged adapter in debt runs only
mixed steps that leave none waiting of what the unmerged step, F's own or the starving adapters'
first, would feed: they move no credit); one step displaces at most the max_adapters adapters and
the base model of F, less the payer, each moving one t_max; settling never crosses zero. So a
request waits at most ``wait_bound_s(t_max)`` = starvation_s + debt_floor_s + (max_adapters + 2) *
t_max seconds of the steps F's own step would feed it in, t_max being the longest step: its
adapter then starves, and the next step serves it. (It assumes the scheduler admits what the
policy chose, as ``within_budget`` foresees it: a request it leaves out for memory or the token
budget all the same still counts as displaced and moves credit, from a merged adapter in debt
too, which can take the payer below that floor and lengthen the bound of the payer's own
requests. Nor does it bound the wait before F's own step feeds a request: a prompt past the token
budget waits behind the requests of F before it, as under FCFS; a prompt the blocks free cannot
hold whole (``QueuedRequest.fits``) enters F only first in the queue, or once finished requests
free its blocks, however much credit its adapter holds; and a starving adapter's prompt put first
in F still waits where the requests of F that came before it hold the blocks its next chunk
needs: the scheduler evicts none of them for a prompt, ``_fits``.) A
running request's adapter starves at ``running_starvation_s`` (the lesser) instead: a stream
pauses at most that bound with it (``wait_bound_s(t_max, running=True)``). A lone stream of a
rarely used adapter beside a busy one gains nothing by waiting (it has nobody of its adapter to
share a step's LoRA work with later) and its price does not show that: one step's price counts a
request it leaves waiting as an average request's share of the step, and the busy adapter's new
prompt that takes its place as prompt tokens of work, so merged epochs held such a stream to a
token a second under ``starvation_s`` alone.

**Seconds, not steps**, on every device, on purpose: credit counts the measured seconds of the
steps that left an adapter waiting, and what the thresholds bound is a wait a client feels in
seconds (time to first token, a stream's pause), which ``wait_bound_s`` states and the worker
exports (``dlora_wait_bound_seconds``). Counted in steps (or scaled by the measured step time,
the same thing) the bound would follow the device instead: 20 steps are 0.2 s of 10 ms GPU steps
and 4 s of 200 ms CPU ones. What seconds cost a slow device, merged epochs cut short after a few
steps, the policy already weighs: a merge must win its switch back within the epochs it measured
(``merged_epoch_steps``, ``_pays_off``), and a starving adapter that fits beside the merged one
runs there in a mixed step, which ends no epoch. (The authors' artifact counts credit in
displaced requests per step, 1/max_num_seqs each, against a threshold 10^4 above where credit
starts: no figure to carry over.)

**Band** and **watchdog**: what ``observe`` learns from the steps that ran (``dlora_learning.py``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import msgspec

from dlora.services.worker.policy.base import (
    BatchLimits,
    KvRoom,
    Mode,
    QueuedRequest,
    StepDecision,
    fcfs_refilled,
    within_budget,
)
from dlora.services.worker.policy.config import PolicyConfig
from dlora.services.worker.policy.costs import CostModel
from dlora.services.worker.policy.credits import CreditLedger
from dlora.services.worker.policy.dlora_learning import EpochLearning
from dlora.services.worker.policy.dlora_shape import QueueShape, shape_of
from dlora.services.worker.policy.dlora_steps import Basis, key_of, step_work


@dataclass(frozen=True)
class _Price:
    """A candidate's estimated cost per token served, split by where its uncertainty comes from."""

    key: int  # the base estimate it rests on (its step's token count, or bucket)
    seconds: float  # the step's own estimated time
    cost: float  # seconds per token served, the switch spread over an epoch
    base_std: float  # standard error of the cost from the base step estimate(s)
    other_std: float  # and from the overhead fit and the switch


@dataclass(frozen=True)
class _Candidate:
    mode: Mode
    merged: str | None
    batch: list[QueuedRequest]
    # F's requests it leaves waiting: its cost per token counts them (see _price).
    waiting: int = 0
    price: _Price | None = None
    # What one step of ``batch`` feeds (``within_budget``): what ``waiting`` and the price count.
    run: list[QueuedRequest] = field(default_factory=list)

    def decision(self, basis: Basis, shape: QueueShape | None = None) -> StepDecision:
        """The decision to run it, decided on ``basis``; ``shape``: the queue's it was built from
        (its ids and excess kept there: one candidate a mode and merged adapter)."""

        def made() -> tuple[dict[str, int], list[str], list[QueuedRequest]]:
            prompts = [r for r in self.batch if not r.running]
            return self._excess(basis.merged_now), [r.request_id for r in self.batch], prompts

        if shape is None:
            excess, ids, prompts = made()
        else:
            excess, ids, prompts = shape.piece(("decision", self.mode, self.merged), made)
        basis.excess, basis.prompts = excess, prompts  # (shared with the shape's piece: read, never changed)
        return StepDecision(self.merged, ids, basis, mixed=self.mode is Mode.MIXED)

    def _excess(self, merged_now: str | None) -> dict[str, int]:
        # Prompt tokens its merged state makes a request feed beyond its work: computed again, not served.
        return {r.request_id: x for r in self.batch if (x := r.fed(self.merged, merged_now) - r.work) > 0}


class DLoraPolicy(EpochLearning):
    """dLoRA's batching policy (OSDI'24) with mixed steps: each step runs unmerged across many
    adapters, merged on the most-queued one, or mixed (that one merged, the rest beside it), by
    the costs each measured and how sure they are; thresholds adapted from measured throughput
    keep merged steps to where they pay, and credits that grow while an adapter's requests wait
    serve a starving adapter first.

    Pure: ``decide`` sees the queue, ``observe`` the step that ran; the engine calls both from its
    own thread. ``checkpoint`` / ``restore`` carry its learned state across worker restarts.
    """

    def __init__(self, limits: BatchLimits, config: PolicyConfig | None = None) -> None:
        super().__init__(limits)
        self.config = config or PolicyConfig()
        self.r = self.config.r_initial
        self.credits = CreditLedger()
        self.costs = CostModel()
        self.ranks = {}
        self._epoch = None
        # Running estimate of how many steps a merged (or mixed) epoch lasts, for amortising a switch.
        self.merged_epoch_steps = 8.0
        self.fallback_steps = 0  # steps the watchdog still holds the policy unmerged
        self.watchdog_trips = 0
        self._shape: QueueShape | None = None  # the last queue's reading, kept while it is the same

    # ---- thresholds -----------------------------------------------------------------------
    @property
    def l(self) -> float:  # noqa: E743 - the paper's L
        return self.config.band_ratio * self.r

    def _threshold(self, base: float, adapter: str) -> float:
        rank = self.ranks.get(adapter, 0)
        return base / (1.0 + self.costs.overhead(1, rank) if rank else 1.0)

    def _forget_gone(self, queue: list[QueuedRequest], merged_now: str | None) -> None:
        """Forget requests and adapters no longer queued, once they far outnumber those that are
        (amortised O(1) a step): an epoch's prompts prefilled (or chunked) in its counterfactual
        grew by one id a request for as long as one adapter stayed merged, the ranks by one key an
        adapter version ever queued (a helper's finding: 9,000 ids with 6 requests in flight)."""
        epoch, bound = self._epoch, 4 * len(queue) + 256
        if epoch is not None and len(epoch.cf_prefilled) + len(epoch.cf_chunked) + len(epoch.cf_owed) > bound:
            ids = {r.request_id for r in queue}
            epoch.cf_prefilled &= ids
            epoch.cf_chunked = {k: n for k, n in epoch.cf_chunked.items() if k in ids}
            epoch.cf_owed = {k: r for k, r in epoch.cf_owed.items() if k in ids}
        if len(self.ranks) > bound:
            keep = {r.adapter for r in queue} | {merged_now}
            self.ranks = {a: rank for a, rank in self.ranks.items() if a in keep}

    def wait_bound_s(self, t_max: float, running: bool = False) -> float:
        """Seconds of steps a request in F waits at most (a ``running`` one: a stream's pause),
        ``t_max`` being the longest step; see the module's docstring."""
        c = self.config
        starvation = min(c.starvation_s, c.running_starvation_s) if running else c.starvation_s
        return starvation + c.debt_floor_s + (self.limits.max_adapters + 2) * t_max

    # ---- the decision ---------------------------------------------------------------------
    def decide(self, queue: list[QueuedRequest], merged_now: str | None, kv: KvRoom | None = None) -> StepDecision:
        if not queue:
            return StepDecision(merged=merged_now, request_ids=[])
        shape = self._shape
        if shape is None or not shape.same(queue, merged_now, kv, self.limits):
            shape = self._shape = shape_of(queue, merged_now, kv, self.limits)
        self._forget_gone(queue, merged_now)
        self.ranks.update(shape.ranks)
        fcfs, f_run = shape.fcfs, shape.f_run
        floor = -self.config.debt_floor_s
        eligible = {a: rs for a, rs in shape.by_adapter.items() if self.credits[a] >= floor}
        # Most queued first; among equals the one whose oldest request came first; never one that
        # must not be merged.
        mergeable = [a for a in eligible if a not in self.unmergeable]
        best = max(mergeable, key=lambda a: (len(eligible[a]), -eligible[a][0].arrival), default=None)

        def merged_piece(a: str) -> _Candidate:  # (worked out once a queue shape: ``shape.piece``)
            return shape.piece(
                (Mode.MERGED, a), partial(self._candidate, Mode.MERGED, a, eligible[a], f_run, merged_now, kv)
            )

        group = eligible.get(best or "", [])
        # (what one merged step on it feeds: its candidate's run, the merged counterfactual's step)
        best_run = merged_piece(best).run if best is not None else []
        basis = Basis(fcfs, f_run, best, group, merged_now, best_run=best_run, kv=kv)
        unmerged = shape.piece(("unmerged",), lambda: _Candidate(Mode.UNMERGED, None, fcfs, run=f_run))

        starving = self._starving(shape)
        if starving:
            chosen, basis.fed = self._serve_starving(queue, fcfs, starving, merged_now, merged_now in eligible, kv)
            return chosen.decision(basis)
        if self.fallback_steps > 0:
            return unmerged.decision(basis, shape)

        # dLoRA's band: the merged adapter stays merged at L of F, another enters at R.
        merged = {a: merged_piece(a) for a in (merged_now, best) if a in eligible}
        stay = merged_now in merged and len(merged[merged_now].run) >= self._threshold(self.l, merged_now) * len(f_run)
        enter = best not in (None, merged_now) and len(merged[best].run) >= self._threshold(self.r, best) * len(f_run)
        candidates = [unmerged]
        for m in dict.fromkeys(a for a in (merged_now, best) if a is not None):
            mixed = shape.piece((Mode.MIXED, m), partial(self._mixed, queue, m, f_run, merged_now, kv))
            if m in eligible or (m == merged_now and mixed.waiting == 0):  # displacing nobody, it owes nothing
                candidates.append(mixed)
        if stay and merged_now is not None:
            candidates.append(merged[merged_now])
        if enter and best is not None and self._pays_off(shape, merged[best].run, best):
            candidates.append(merged[best])

        priced = [self._price(c, merged_now, shape) for c in candidates]
        if any(c.price is None for c in priced) or not self.costs.fitted:
            # Not measured enough to price LoRA (the overhead fit learns only where base steps of
            # the same size were measured, which unmerged replicas rarely run): dLoRA's count
            # rule, with a mixed step where it would merge. Mixed steps of the hot adapter alone
            # measure base steps; the others beside it, the overhead. It counts the adapter's
            # requests the mixed step feeds, as dLoRA counts those its merged step serves: in a
            # mixed batch they come behind the others, not first as in a merged one, and where the
            # budget feeds few of them a switch buys little, its correction taking a slot from the
            # next adapter in line. The adapter merged now stays only while that step feeds L of F
            # of them too: dLoRA's merged steps always run its requests, and a mixed step feeding
            # none of them pays the correction on every token it runs, and a slot, to put off one
            # switch.
            on = {c.merged: c for c in candidates if c.mode is Mode.MIXED}  # the mixed candidates, by merged adapter
            fed = {a: sum(r.adapter == a for r in c.run) for a, c in on.items() if a in eligible}
            target = next(
                (
                    a
                    for a, share in ((merged_now, self.l), (best, self.r))  # stay at L, enter at R
                    if a in fed and a is not None and fed[a] >= self._threshold(share, a) * len(f_run)
                ),
                None,
            )
            if target not in (None, merged_now) and not self._switch_can_pay(shape, target):
                target = None
            return on.get(target, unmerged).decision(basis, shape)
        chosen = self._choose(priced, self._incumbent(priced, merged_now))
        basis.predicted = chosen.price.seconds if chosen.price else None
        return chosen.decision(basis, shape)

    def _mixed(
        self, queue: list[QueuedRequest], m: str, f_run: list[QueuedRequest], merged_now: str | None, kv: KvRoom | None
    ) -> _Candidate:
        """The mixed candidate with ``m`` merged: FCFS in which ``m``'s requests need no slot and its
        correction holds one (refilled as F is)."""
        batch = fcfs_refilled(queue, self.limits, m, merged_now, kv)
        return self._candidate(Mode.MIXED, m, batch, f_run, merged_now, kv)

    def _starving(self, shape: QueueShape) -> set[str]:
        """Keys of the adapters owed more than ``starvation_s`` of credit, or ``running_starvation_s``
        (the lesser) where a running request of theirs is in F: a stream paused, not a prompt yet
        to begin."""
        c = self.config
        threshold = {k: min(c.starvation_s, c.running_starvation_s) for k in shape.running_keys}
        return {k for k in shape.queued_keys if self.credits[k] > threshold.get(k, c.starvation_s)}

    def _serve_starving(
        self,
        queue: list[QueuedRequest],
        fcfs: list[QueuedRequest],
        starving: set[str],
        merged_now: str | None,
        eligible: bool,
        kv: KvRoom | None,
    ) -> tuple[_Candidate, list[QueuedRequest]]:
        """The starving adapters' requests in F first: beside the adapter merged now (no switch;
        the mixed batch refilled as F is) where that step feeds each of them that F unmerged, them
        first, would feed (``within_budget``), or each request of F, where that adapter may not
        displace anyone (not ``eligible``); else F unmerged, them first. With what that unmerged
        step feeds, which the step's credits are counted against (``Basis.fed``): the requests of
        F it leaves waiting are the starving adapters' to put off, not the merged adapter's to pay."""
        first = [r for r in fcfs if key_of(r.adapter) in starving]
        unmerged = first + [r for r in fcfs if key_of(r.adapter) not in starving]
        run = within_budget(unmerged, self.limits, None, merged_now, kv)
        if merged_now is not None:
            ordered = [r for r in queue if key_of(r.adapter) in starving]
            ordered += [r for r in queue if key_of(r.adapter) not in starving]
            mixed = fcfs_refilled(ordered, self.limits, merged_now, merged_now, kv)
            must = {r.request_id for r in (first if eligible else fcfs)}
            # Fed, not in the batch: a starving prompt the mixed step's budget leaves out (the merged
            # state changes what a prompt finds cached, so what it feeds) waits again, and gains
            # credit its merged adapter pays, where the unmerged step would have fed it and settled
            # its balance. One neither step feeds waits either way.
            fed = {r.request_id for r in run}
            if (must & fed) <= {r.request_id for r in within_budget(mixed, self.limits, merged_now, merged_now, kv)}:
                return _Candidate(Mode.MIXED, merged_now, mixed), run
        return _Candidate(Mode.UNMERGED, None, unmerged), run

    def _candidate(
        self,
        mode: Mode,
        m: str | None,
        batch: list[QueuedRequest],
        f_run: list[QueuedRequest],
        merged_now: str | None,
        kv: KvRoom | None,
    ) -> _Candidate:
        """``batch`` as a candidate, counted within the token budget (``f_run``: what one step of F
        feeds): a step's queued prompts, all counted, priced a merged step on ~35 requests and
        thousands of prompt tokens the scheduler would not admit, which made one that left most of
        F idle look ten times cheaper per token (issue 21's regime map: 0.69 of unmerged-only at
        overhead 1.2, Zipf 1, load 1.4)."""
        run = within_budget(batch, self.limits, m, merged_now, kv)
        ids = {r.request_id for r in run}
        return _Candidate(mode, m, batch, sum(r.request_id not in ids for r in f_run), run=run)

    def _price(self, c: _Candidate, merged_now: str | None, shape: QueueShape) -> _Candidate:
        """``c`` (``shape``'s) with its price (of what one step of it feeds); unpriced before a base
        step was measured."""
        # (its merged adapter's rank is read where none of its requests is in the step)
        rank = self.ranks.get(c.merged or "", 0)
        tokens, segments, rank_tokens, context = shape.piece(
            ("work", c.mode, c.merged, rank), lambda: step_work(c.run, c.merged, self.ranks, merged_now)
        )
        base = self.costs.base_estimate(tokens)
        if base is None or tokens == 0:
            return c
        factor, factor_std = self.costs.factor(tokens, segments, rank_tokens)
        seconds = total = self.costs.at_context(base, context, factor)
        base_var, other_var = (base.sem * factor) ** 2, (base.mean * factor_std) ** 2
        if c.merged != merged_now:
            switch, switch_std = self._switch(c.merged, merged_now)
            epoch = max(1.0, self.merged_epoch_steps)
            total += switch / epoch
            other_var += (switch_std / epoch) ** 2
        # Per token served, with each request of F it leaves waiting costing as much as one it
        # serves: a step that advances half of F costs twice what its time alone says (a merged
        # step puts the others' work off; it does not save it).
        scale = (1 + c.waiting / len(c.run)) / max(1, sum(r.work for r in c.run))
        price = _Price(self.costs.key(tokens), seconds, total * scale, base_var**0.5 * scale, other_var**0.5 * scale)
        return _Candidate(mode=c.mode, merged=c.merged, batch=c.batch, waiting=c.waiting, price=price, run=c.run)

    def _incumbent(self, priced: list[_Candidate], merged_now: str | None) -> _Candidate | None:
        """The candidate that goes on as the last step ran (None: none does)."""
        mode = self._epoch.mode if self._epoch is not None and merged_now is not None else Mode.UNMERGED
        same = [c for c in priced if c.merged == merged_now]
        return next((c for c in same if c.mode is mode), same[0] if same else None)

    def _choose(self, priced: list[_Candidate], incumbent: _Candidate | None) -> _Candidate:
        """The cheapest candidate, unless the incumbent is within ``kappa`` standard errors of the
        difference. Two steps of the same size rest on one base estimate: its error moves both
        costs together, and only the difference of its shares counts."""
        cheapest = min(priced, key=lambda c: c.price.cost if c.price else math.inf)
        if incumbent is None or cheapest is incumbent or not (a := cheapest.price) or not (b := incumbent.price):
            return cheapest
        if a.key == b.key:
            base_std = abs(a.base_std - b.base_std)
        else:
            base_std = math.hypot(a.base_std, b.base_std)
        margin = self.config.kappa * math.hypot(base_std, a.other_std, b.other_std)
        return cheapest if a.cost + margin < b.cost else incumbent

    def _switch(self, to: str | None, merged_now: str | None) -> tuple[float, float]:
        """(mean, standard error) seconds of merging ``to`` in place of ``merged_now`` (either None:
        none), each at its adapter's rank (``CostModel.switch_seconds``)."""
        ranks = self.ranks
        merge_rank, unmerge_rank = ranks.get(to or "", 0), ranks.get(merged_now or "", 0)
        return self.costs.switch_seconds(to is not None, merged_now is not None, merge_rank, unmerge_rank)

    def _round_trip(self, adapter: str) -> float:
        """Seconds of merging ``adapter`` in, and out again (what a merged epoch must win back)."""
        return self._switch(adapter, adapter)[0]

    def _switch_can_pay(self, shape: QueueShape, target: str) -> bool:
        """Before LoRA's overhead is measured (the count rule decides): whether a switch could win
        its time back within a merged epoch at all, were merging to save two base steps of F each
        step (it saves the overhead: unmerged steps measured at 1.1x base on this CPU, 2.5x on an
        H200 before its kernels were tuned). A trial here: a rank-512 merge of 1.6 s for one
        8-token request, against 47 ms steps, paused every stream, and again for the next adapter.
        Yes while the switch or F's base step was never measured."""
        tokens, _, _, context = self._f_work(shape)
        base = self.costs.base_seconds(tokens, context)
        switch = self._round_trip(target)
        return base is None or not switch or self.merged_epoch_steps * 2 * base > switch

    def _f_work(self, shape: QueueShape) -> tuple[int, int, int, int]:
        """``step_work`` of what one step of F feeds, unmerged (no rank of the policy's is read):
        the unmerged candidate's, under ``_price``'s key for it (its run is F's, no adapter merged)."""
        return shape.piece(
            ("work", Mode.UNMERGED, None, 0), lambda: step_work(shape.f_run, None, self.ranks, shape.merged_now)
        )

    def _pays_off(self, shape: QueueShape, group: list[QueuedRequest], adapter: str) -> bool:
        """Would merging ``group`` (what one step of it feeds) win back the switch within a typical
        merged epoch, against F (what one step of ``shape``'s feeds)?

        Per step, serving the group merged saves (unmerged seconds per token - merged seconds per
        token) x its tokens; over ``merged_epoch_steps`` steps that must exceed the merge and
        unmerge it costs. Tokens of work (``QueuedRequest.work``): a prompt whose cached blocks
        the merge would make it compute again takes longer merged, and serves no more. Before both
        modes are measured, the count rule alone decides.
        """
        f_tokens, seg, rank_tokens, f_context = self._f_work(shape)
        merged_now = shape.merged_now
        g_tokens, g_context, f_work, g_work = shape.piece(
            ("pays", adapter),
            lambda: (
                sum(r.fed(r.adapter, merged_now) for r in group),
                sum(r.attends(r.adapter, merged_now) for r in group),
                sum(r.work for r in shape.f_run),
                sum(r.work for r in group),
            ),
        )
        unmerged = self.costs.step_seconds(f_tokens, seg, rank_tokens, f_context)
        merged = self.costs.step_seconds(g_tokens, context=g_context)
        if unmerged is None or merged is None or not f_work or not g_work:
            return True
        saving = g_work * (unmerged / f_work - merged / g_work)
        return self.merged_epoch_steps * saving > self._round_trip(adapter)

    def forget_adapter(self, name: str, keep: str | None = None) -> None:
        gone = [k for k in [*self.credits.balances, *self.ranks] if k.partition("@")[0] == name and k != keep]
        self.credits.drop(gone, keep)  # (a helper's finding: a deleted adapter's balance was kept for good)
        self.ranks = {a: rank for a, rank in self.ranks.items() if a not in gone}

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
