"""What the dLoRA policy learns from the steps that ran (``DLoraPolicy``'s other half): step and
switch times into its cost model, credits moved for the requests a step displaced, and epochs
accounted against their counterfactual to adapt the band and trip the watchdog. Pure.

**Band.** At each change of mode the epoch that ended is compared with what the other mode would
have done over the same steps (the FCFS batches unmerged, or the most-queued adapter merged plus
the switches), using measured step and switch times: each step what the scheduler would feed of
that batch (``within_budget``), a prompt prefilled once an epoch, chunk by chunk where the token
budget cuts it, then decoding, the step cut anew from what it has fed (``cf_step``). (The
authors' artifact, ``_adjust_merge_threshold``, counts requests a batch, ``min(len(batch),
max_num_seqs)``, with no token budget; here tokens of work.) Merged epochs that lost raise R by
``band_up``; unmerged epochs that merging would have beaten by ``band_margin`` scale R by
``band_down``. L = ``band_ratio`` * R keeps the hysteresis.

R moves on a loss only, so it seldom moves (a review traced it: once in a policy ablation, never
in 22 epochs of a probe). Each step already takes the mode its price says is cheaper per token,
waiting counted as here, so an epoch loses only where the cost model mispredicted; an epoch ends
only when the merged adapter changes (one unmerged epoch held 2,453 steps, most of a stride-32
ablation run); one mostly mixed is not judged; and in such runs an unmerged epoch's merged
counterfactual lost by 2.6 to over 1,000 times (the busiest adapter held a decode or two while
the steps prefilled others' prompts), past any fix of a few tens of per cent. The artifact moves
its thresholds on a win too: a merged epoch that won lowers R by ``aimd_add`` (0.05, not below L),
one that lost multiplies it by ``aimd_mul`` (1.1); unmerged epochs move L the same way, up when
they won, down when they lost.

**Watchdog.** A merged or mixed epoch whose predicted steps (three at least) took
``watchdog_ratio`` times their predicted time holds the policy unmerged for ``watchdog_steps``
steps.
"""

from __future__ import annotations

from dlora.services.worker.policy.base import Mode, Policy, StepDecision, StepRecord
from dlora.services.worker.policy.config import PolicyConfig
from dlora.services.worker.policy.costs import CostModel
from dlora.services.worker.policy.credits import CreditLedger
from dlora.services.worker.policy.dlora_steps import Basis, Epoch, Facts, cf_step, facts_of, owe_prefills, step_work


class EpochLearning(Policy):
    """``observe`` for the dLoRA policy: the state it learns lives on the policy, which decides by it."""

    learns = True  # costs, credits, band and watchdog: a repeated step may be decided otherwise

    config: PolicyConfig
    r: float  # dLoRA's R: the share of F an adapter's requests need to enter a merged epoch
    credits: CreditLedger
    costs: CostModel
    ranks: dict[str, int]
    _epoch: Epoch | None
    merged_epoch_steps: float  # running estimate of a merged (or mixed) epoch's steps
    fallback_steps: int  # steps the watchdog still holds the policy unmerged
    watchdog_trips: int

    def _round_trip(self, adapter: str) -> float:
        """Seconds of merging ``adapter`` in, and out again (the policy's cost model says)."""
        raise NotImplementedError

    def observe(self, decision: StepDecision, record: StepRecord) -> None:
        self.observe_repeated(decision, record, [record.seconds])

    def observe_repeated(self, decision: StepDecision, record: StepRecord, seconds: list[float]) -> None:
        basis = decision.basis
        if not isinstance(basis, Basis):  # decided elsewhere: its times teach, its batch moves no credit
            for i, t in enumerate(seconds):
                self._learn(record, t, i)
            return
        facts = facts_of(basis, record, self.ranks)
        for i, t in enumerate(seconds):
            self._learn(record, t, i, basis.merged_now)
            self._move_credits(facts, t)
            self._account(basis, record, facts, t, i)

    def _learn(self, record: StepRecord, seconds: float, repeat: int = 0, merged_before: str | None = None) -> None:
        """The ``repeat``-th run of ``record``'s step (decodes: one more context token a request
        each time); ``merged_before``: the adapter merged before the step (what an unmerge took
        out; None: not known)."""
        context = record.context_tokens + repeat * len(record.request_ids)
        self.costs.observe_step(record.num_tokens, seconds, record.lora_segments, record.lora_rank_tokens, context)
        if record.merge_seconds or record.unmerge_seconds:  # a repeated step's are 0
            ranks = (self.ranks.get(record.merged or "", 0), self.ranks.get(merged_before or "", 0))
            self.costs.observe_switch(record.merge_seconds or None, record.unmerge_seconds or None, *ranks)
        if self.fallback_steps > 0:
            self.fallback_steps -= 1

    def _move_credits(self, facts: Facts, seconds: float) -> None:
        if facts.transfers:
            self.credits.transfer(facts.displaced, facts.payers, seconds)
        # (not while a request of it in F waits, fed by the unmerged step or not: that would cancel
        # what it is owed before it runs)
        for key in [k for k, v in self.credits.balances.items() if v > 0 and k not in facts.waiting]:
            self.credits.settle(key)

    def _account(self, basis: Basis, record: StepRecord, facts: Facts, seconds: float, repeat: int = 0) -> None:
        # ``repeat``: as in ``_learn``; the counterfactual steps' requests each attend one more token too.
        # An epoch lasts while the same adapter stays merged (or none): mixed and merged steps of one
        # merge are one epoch, its mode the last step's.
        epoch = self._epoch
        if epoch is None or epoch.merged != record.merged:
            if epoch is not None:
                self._adapt(epoch)
            epoch = self._epoch = Epoch(mode=facts.mode, merged=record.merged)
        else:
            epoch.mode = facts.mode
        epoch.mixed_steps += facts.mode is Mode.MIXED
        epoch.steps += 1
        epoch.tokens += facts.served  # tokens of work (``QueuedRequest.work``)
        # A step that leaves requests of F waiting has put their work off, not saved it: it counts
        # as long as it would take to serve them too (as ``_price`` counts a candidate's waiting),
        # or a merged epoch's throughput, and the counterfactual merged one, flatter merging.
        epoch.seconds += seconds * facts.slowdown + record.switch_seconds
        if basis.predicted is not None:
            epoch.predicted += basis.predicted
            epoch.predicted_actual += seconds
            epoch.predicted_steps += 1
            self._watch(epoch)
        if facts.cf is not None:  # counterfactual: the unmerged step, what one step of it feeds (``Basis.fed``)
            # A waiting prompt is prefilled once an epoch, in chunks where the budget cuts it, then
            # decodes, as in the merged one below (``cf_step``; a review: a prompt the merged epoch
            # left waiting was counted prefilled at every step, and unmerged serving looked better
            # than it was). (Priced over all of F, it fed the prompts past the token budget in one
            # step too.)
            (tokens, segments, rank_tokens, context), work, seqs = facts.cf, facts.cf_work, len(basis.fed)
            step = cf_step(basis.fed, basis.fcfs, epoch, self.limits, None, basis.merged_now, basis.kv)
            owe_prefills(epoch, basis, record)
            if step is not None:  # (None: decodes alone, as the step saw them, worked out once)
                (batch, work), seqs = step, len(step[0])
                tokens, segments, rank_tokens, context = step_work(batch, None, self.ranks, basis.merged_now)
            cf = self.costs.step_seconds(tokens, segments, rank_tokens, context + repeat * seqs)
            if cf is not None:
                epoch.cf_tokens += work
                epoch.cf_seconds += cf
        elif basis.best is not None and basis.best_run:  # counterfactual: the most-queued adapter, merged
            # What one merged step on it feeds (``Basis.best_run``: within the token budget, as the
            # candidate is priced; once it has fed any, cut anew from what it has fed), each prompt
            # prefilled once an epoch, in chunks where the budget cuts it (``cf_step``): one that
            # waits for room through many steps would be prefilled by the first merged steps, not
            # by every one (counted at each, a long prompt queued a while made merging look many
            # times better than it was); and one merged step feeds no more than the budget (a
            # review: all of ``best_group`` was priced, past it).
            step = cf_step(basis.best_run, basis.best_group, epoch, self.limits, basis.best, basis.merged_now, basis.kv)
            owe_prefills(epoch, basis, record)
            batch, work = step or (basis.best_run, sum(r.work for r in basis.best_run))
            tokens, _, _, context = step_work(batch, basis.best, self.ranks, basis.merged_now)
            cf = self.costs.step_seconds(tokens, context=context + repeat * len(batch))
            if cf is not None:
                # F's requests it leaves waiting count as in ``Facts.slowdown``: per request it runs.
                cf *= 1 + facts.cf_others / len(batch)
                if basis.best != epoch.cf_adapter:
                    cf += self._round_trip(basis.best)
                    epoch.cf_adapter = basis.best
                epoch.cf_tokens += work
                epoch.cf_seconds += cf

    def _watch(self, epoch: Epoch) -> None:
        """The watchdog: a merged or mixed epoch whose steps took ``watchdog_ratio`` times what was
        predicted of them falls back to unmerged for ``watchdog_steps`` steps."""
        c = self.config
        if epoch.merged is None or epoch.predicted_steps < 3:
            return
        if epoch.predicted_actual <= c.watchdog_ratio * epoch.predicted:
            return
        self.fallback_steps = c.watchdog_steps
        self.watchdog_trips += 1
        epoch.predicted = epoch.predicted_actual = 0.0
        epoch.predicted_steps = 0

    def _adapt(self, epoch: Epoch) -> None:
        if epoch.merged is not None:
            self.merged_epoch_steps = 0.8 * self.merged_epoch_steps + 0.2 * epoch.steps
        if epoch.seconds <= 0 or epoch.cf_seconds <= 0 or epoch.cf_tokens == 0 or 2 * epoch.mixed_steps > epoch.steps:
            return  # mostly mixed: it displaced (almost) nobody, and says nothing about merged steps' band
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
