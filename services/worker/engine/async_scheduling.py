"""Async scheduling (vLLM's ``--async-scheduling``): the host works on step N+1 while the device
runs step N.

Synchronous, a step waits for its sampled tokens on the host before it takes them in (text, stop
conditions, the outputs) and before the next step is decided, scheduled and launched: on a GPU
the device idles through all of that host work (issue 15 measured it idle 71 % of a 7B-width
step). Here the next step needs only the tokens' places, not their values: each sampled token
is ``reserve``d on the host (a ``RESERVED`` placeholder that gives the sequence its new length),
so the next step is scheduled and launched at once, its inputs taking the tokens on the device
(``inputs.Carry``); only then does the host wait for the last step's tokens (a copy started as
soon as they were drawn) and take them in, while the device runs the new step.

What it costs: a step's outputs come one call of ``step`` later, and a request that the last
step ended (a stop string, EOS) runs once more, its row dropped. ``LLMEngine.drain`` takes the
step in flight at once: call it before reading a running sequence's tokens from outside (a
move). Tokens are those of the synchronous engine: greedy, seeded and penalised draws read the
same history (sampling for step N+1 is queued after step N's tokens are taken in); unseeded
draws may differ where the batches do.

The prefix cache names a step's blocks when it is launched, and its logits are looked at a call
later, after the next step was scheduled: a prefill of that step that took from the cache blocks
then found not finite is preempted before anything is drawn from it and computes them again
(``recompute``), rather than failing beside the request that made them NaN.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from dlora.kernels.host import to_device
from dlora.services.worker.engine.faults import raise_if_lost
from dlora.services.worker.engine.inputs import Carry, rows_of
from dlora.services.worker.engine.outputs import LaunchedLogprobs, RequestOutput, launch_logprobs, reserve
from dlora.services.worker.engine.preparing import preempted
from dlora.services.worker.engine.queue_view import kv_room
from dlora.services.worker.engine.sampler import Sampled, sample_sequences
from dlora.services.worker.engine.scheduler import forget_lookup, preempt
from dlora.services.worker.engine.sequence import Sequence, Status
from dlora.services.worker.engine.taking import fail_chunks, written
from dlora.services.worker.policy import StepDecision

if TYPE_CHECKING:
    from dlora.services.worker.engine.engine import LLMEngine
    from dlora.services.worker.engine.placement import PreparedStep


@dataclass
class InFlight:
    """A step launched whose tokens are not on the host yet: what sampled (row i of ``sampled``),
    with its logits (B, vocab), its logprobs where asked (computed with the draw), and the seconds
    of its own host work in the call that launched it (``step``'s accounting)."""

    decision: StepDecision
    step: PreparedStep
    ran: list[Sequence]
    logits: torch.Tensor
    sampled: Sampled
    logprobs: LaunchedLogprobs | None
    launched_s: float


def step(engine: LLMEngine, decision: StepDecision | None) -> list[RequestOutput]:
    """``LLMEngine.step`` under async scheduling: decide, prepare and launch this step (the
    reserved tokens of the one in flight taken on the device), take in the one in flight (its
    outputs are what this returns, then this step's failures), then queue this step's sampling
    and leave it in flight.

    A step's seconds for the stats and the policy are host time within the calls, split where
    the last step was taken in: its own call from then (or from its start, with nothing taken),
    and the next call up to its being taken in, less that call's switch and graph recording. The
    worker's work between calls is left out, as the synchronous step leaves it out."""
    e = engine
    call_start = e.clock()
    last = e._in_flight  # left in flight should deciding or preparing raise
    if e.seqs:
        decision = decision or e.policy.decide(e.queue(), e.merger.merged, kv_room(e.blocks))
    prepared = e._prepare(decision) if e.seqs and decision is not None else None
    e._in_flight = None
    failures: list[tuple[Sequence, str]] = []
    recording_s = 0.0
    if prepared is not None:
        graphs = e.graphs
        rows = {s.request_id: (s, i) for i, s in enumerate(last.ran)} if last is not None else {}
        carry = Carry(last.sampled.tokens, rows) if last is not None else None
        ran, logits, failures = e._forward(prepared.batch, prepared.slots, carry)
        recorded, recording_s = graphs.take_recorded() if graphs is not None else (0, 0.0)
        e.stats.record_graphs(recorded, recording_s)
    if last is not None:  # kept on the engine until returned: a raise below must not lose them
        switch_s = prepared.merge_s + prepared.unmerge_s if prepared is not None else 0.0
        e._taken += take(e, last, call_start, switch_s + recording_s)
    # Failed after the last step's token came in, and only where its request goes on.
    e._taken += [e._fail(seq, why) for seq, why in failures if e.holds(seq)]
    e._taken += fail_chunks(e)  # the last step's prompt chunks (one step later than the sync step)
    tainted = e.blocks.checked()
    if prepared is None or decision is None:
        return e._hand_out()
    begun = e.clock() if last is not None else prepared.started + recording_s
    # Not ended by the last step, nor reading blocks it left NaN (``recompute``)
    live = [i for i, s in enumerate(ran) if e.holds(s) and not (tainted and recompute(e, s, tainted))]
    if len(live) < len(ran):
        ran, logits = [ran[i] for i in live], rows_of(logits, live)
    ran, logits = written(e, ran, logits)
    e.last_logits = dict(zip((s.request_id for s in ran), logits)) if logits is not None else {}
    if logits is None or not ran:  # prefill chunks, or requests the last step ended: no token
        prepared.made = [False] * len(prepared.batch)
        e._observe(decision, prepared, 0, [e.clock() - begun])
        return e._hand_out()
    sampled = sample_sequences(logits, ran, e._rng, e.eos_ids, e.grammars)
    for s in ran:
        reserve(s)
    logprobs = _logprobs(logits, ran, sampled)
    e._in_flight = InFlight(decision, prepared, ran, logits, sampled, logprobs, e.clock() - begun)
    return e._hand_out()


def recompute(engine: LLMEngine, seq: Sequence, tainted: set[int]) -> bool:
    """Whether ``seq``, a prefill of the step just launched, took from the prefix cache blocks
    that the last step's check has found not finite (``tainted``: ``BlockManager.checked``); then
    it is preempted, its row of this step dropped before anything is drawn from it, and computes
    its prompt again: the last step named its blocks before their logits were looked at (they are
    looked at here, after this step was scheduled), and a request sent beside a NaN one failed
    with it. Its cached tokens are no longer counted as found (usage's ``cached_tokens``): one
    that looked up this step looks up again as for the first time, and the stats and its usage
    count what that finds (the blocks the NaN step named are gone; those before it stay). One past
    its first chunk is left: that chunk's logits, looked at before this, read its blocks finite."""
    blocks, rid = engine.blocks, seq.request_id
    if seq.status is not Status.WAITING or blocks.stepped(rid) or tainted.isdisjoint(blocks.table(rid)):
        return False
    # Its forward ran and the KV it wrote is thrown away: a preemption for the request as for the
    # engine (vLLM preempts a request an earlier step scheduled), though its next lookup counts.
    preempt(seq, blocks)
    forget_lookup(seq)
    preempted(engine, [seq])
    return True


def _logprobs(logits: torch.Tensor, ran: list[Sequence], sampled: Sampled) -> LaunchedLogprobs | None:
    """The drawn tokens' logprobs for the sequences that ask, queued with the draw (taken in
    from the logits later, they would wait for the step launched since); None: none asks, or it
    failed here (``token_logprobs`` then computes them from the logits)."""
    tops = {i: s.params.logprobs for i, s in enumerate(ran) if s.params.logprobs is not None}
    if not tops:
        return None
    try:
        chosen = sampled.tokens.index_select(0, to_device(list(tops), torch.int64, logits.device))
        return launch_logprobs(logits, chosen, tops)
    except Exception as e:  # noqa: BLE001 - see the docstring
        raise_if_lost(e)
        return None


def take(engine: LLMEngine, f: InFlight, since: float, later_s: float = 0.0) -> list[RequestOutput]:
    """Take in a step left in flight: its tokens into their sequences (those still here), its
    record to the stats and the policy. Its seconds: those of its launch, and these since
    ``since`` (this call's start) less ``later_s`` spent meanwhile on the next step."""
    e = engine
    outputs = e._postprocess(f.ran, f.logits, f.sampled.result(), reserved=True, launched=f.logprobs)
    produced = {o.request_id for o in outputs if o.new_token_ids}
    f.step.made = [s.request_id in produced for s in f.step.batch]  # read now: the next step may preempt them
    e._observe(f.decision, f.step, len(produced), [f.launched_s + e.clock() - since - later_s])
    return outputs


def drain(engine: LLMEngine) -> list[RequestOutput]:
    """``LLMEngine.drain``: the step in flight taken in now, and the last step's prompt chunks
    checked (a step of chunks only leaves none in flight); none: nothing."""
    f, engine._in_flight = engine._in_flight, None
    outputs = take(engine, f, engine.clock()) if f is not None else []
    outputs += fail_chunks(engine)
    engine.blocks.checked()  # nothing scheduled since took the blocks it forgot
    return outputs
