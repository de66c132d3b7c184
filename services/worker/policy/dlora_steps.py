"""What the dLoRA policy keeps of a step between ``decide`` and ``observe``: what it saw
(``Basis``), what the step tells beside its seconds (``Facts``, however often it repeats), and
the epoch it accounts it to (``Epoch``). Pure."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field, replace

from dlora.services.worker.policy.base import (
    BatchLimits,
    KvRoom,
    Mode,
    QueuedRequest,
    StepRecord,
    lora_work,
    within_budget,
)
from dlora.services.worker.policy.credits import BASE


@dataclass
class Epoch:
    """Actual and counterfactual work since the last change of mode."""

    mode: Mode
    merged: str | None
    steps: int = 0
    mixed_steps: int = 0
    tokens: int = 0
    seconds: float = 0.0
    predicted: float = 0.0  # what the cost model expected of the steps it predicted
    predicted_actual: float = 0.0  # what those steps took
    predicted_steps: int = 0  # how many
    cf_tokens: int = 0
    cf_seconds: float = 0.0
    cf_adapter: str | None = None  # unmerged epochs: adapter the counterfactual has merged
    cf_prefilled: set[str] = field(default_factory=set)  # requests whose prompt the counterfactual served
    cf_chunked: dict[str, int] = field(default_factory=dict)  # by request: prompt tokens it has left, fed in chunks
    # By request: a prompt the steps that ran fed (in part or whole) before the counterfactual fed
    # all of it, as queued then: it owes the prefill (less ``cf_chunked``'s part it fed), where
    # the queues after show it running.
    cf_owed: dict[str, QueuedRequest] = field(default_factory=dict)


@dataclass(frozen=True)
class Facts:
    """What a step tells ``observe`` beside its seconds: the same however often it repeats."""

    mode: Mode
    displaced: set[str]  # keys of the requests the unmerged step would feed that it left waiting: they gain credit
    waiting: set[str]  # keys of the requests of F it left waiting, fed by that step or not: not settled
    payers: dict[str, float]  # who pays it, by share
    served: int  # tokens of work it served (``QueuedRequest.work``)
    slowdown: float  # 1 + the requests the unmerged step would feed it left waiting over those it ran
    cf: tuple[int, int, int, int] | None  # a merged step's counterfactual: ``Basis.fed`` unmerged (``step_work``)
    cf_work: int  # that step's tokens of work
    transfers: bool  # whether ``CreditLedger.transfer`` moves credit for it (someone displaced, someone pays)
    cf_others: int  # an unmerged step's counterfactual: requests of ``Basis.fed`` not of the adapter it would merge


@dataclass
class Basis:
    """What decide() saw, handed back to observe() in the decision (``StepDecision.basis``)."""

    fcfs: list[QueuedRequest]
    # What one step of the unmerged batch the step is compared with feeds (``within_budget``): F's
    # own, or on the starvation path F with the starving adapters' requests first. Its requests
    # the step leaves waiting are displaced; those of F it does not feed would wait either way.
    fed: list[QueuedRequest]
    best: str | None  # most-queued eligible adapter
    best_group: list[QueuedRequest]  # its queued requests (a batch's worth): what a merged step on it would take
    merged_now: str | None = None  # the adapter merged as it decided
    predicted: float | None = None  # seconds the cost model expects of the chosen step
    excess: dict[str, int] = field(default_factory=dict)  # by request: tokens fed beyond its work
    # What one merged step on it feeds of them (``within_budget``, as a candidate is priced): the
    # merged counterfactual of an unmerged epoch. ``best_group`` priced whole, a merged step fed
    # every prompt in it past the token budget.
    best_run: list[QueuedRequest] = field(default_factory=list)
    kv: KvRoom | None = None  # the KV cache as it decided: a counterfactual step cut anew is cut to it (``cf_step``)
    # The chosen batch's waiting requests, as queued: what the step may start (``Epoch.cf_owed``).
    prompts: list[QueuedRequest] = field(default_factory=list)


def key_of(adapter: str | None) -> str:
    return BASE if adapter is None else adapter


def step_work(
    batch: list[QueuedRequest], merged: str | None, ranks: dict[str, int], merged_now: str | None
) -> tuple[int, int, int, int]:
    """(tokens, LoRA segments, rank-tokens, context tokens) of a step running ``batch`` with
    ``merged`` merged (``lora_work``), ``merged_now`` being merged now: a prompt feeds what the
    prefix cache does not hold under the key of the step's merged state (``QueuedRequest.fed``),
    and attends that and what the key holds for it (``QueuedRequest.attends``). The arguments of
    ``CostModel.step_seconds``."""
    fed = [(r.adapter, r.fed(merged, merged_now)) for r in batch]
    known = {r.adapter: r.rank for r in batch if r.adapter is not None}  # what lora_work reads: not all of ranks
    if merged is not None and merged not in known:
        known[merged] = ranks.get(merged, 0)  # 0: merged before a restart and not queued since
    context = sum(r.held_under(merged, merged_now) + n for r, (_, n) in zip(batch, fed))
    return sum(n for _, n in fed), *lora_work(fed, merged, known), context


def cf_step(
    fed: list[QueuedRequest],
    batch: list[QueuedRequest],
    epoch: Epoch,
    limits: BatchLimits,
    merged: str | None,
    merged_now: str | None,
    kv: KvRoom | None = None,
) -> tuple[list[QueuedRequest], int] | None:
    """One step of ``epoch``'s counterfactual (with ``merged`` merged, ``merged_now`` being merged
    now) and its tokens of work (``QueuedRequest.work``): what one such step feeds of ``batch``
    (its requests as queued, not cut to a chunk), ``fed`` being what it feeds of the queue as it
    stands (``within_budget``, in the order it was cut: ``Basis.fed`` or ``Basis.best_run``). None:
    that step is ``fed`` as it is, decodes alone (the caller's prices of it, worked out once, hold).

    The counterfactual goes on from its steps before in the epoch, which the queue does not show:
    a prompt it fed whole decodes (a token, attending the prompt); one it fed in part feeds its
    next chunk, at most what it has left of it (``epoch.cf_chunked[id]``: its own, whatever steps
    that ran fed of it), attending what it fed before too; one the steps that ran fed before it
    fed all of it is fed as it was queued then (``epoch.cf_owed``), all of it or its rest. Once
    it has fed any, the step is cut anew (``within_budget``, with ``limits`` and ``kv``: the
    cache as the step began) from ``batch`` as the counterfactual has it, so that the budget its
    prefilled prompts no longer take goes to the prompts after them, as the scheduler gives it.
    Records what it feeds in ``epoch.cf_prefilled`` and ``epoch.cf_chunked``. (Reviews:
    the last chunk was priced a full one, a 400-token prompt in 12-token chunks counted 408 tokens,
    and each chunk at the queue's context, as if the first; the step stayed cut from the queue as
    it stood, a prompt behind a prefilled one never fed while the queue stood still; and a prompt
    the merged steps fed too had their chunks taken off it as well as its own.)

    A prompt past ``max_num_batched_tokens`` is fed all of it (``QueuedRequest.left``), not only
    what ``queue_view.queued`` shows of it in a step (a review: it prefilled 16 of a 400-token
    prompt, then decoded it at 16 tokens of context)."""
    owed = epoch.cf_owed
    anew = any(
        r.request_id in owed
        or (not r.running and (r.request_id in epoch.cf_prefilled or r.request_id in epoch.cf_chunked))
        for r in batch
    )
    if not anew and all(r.running for r in fed):
        return None
    queued = {r.request_id: owed.get(r.request_id, r) for r in batch}
    if anew:
        ids = {r.request_id for r in fed}
        source = [queued[r.request_id] for r in fed] + [r for r in batch if r.request_id not in ids]
        fed = within_budget([_left(r, epoch, merged, merged_now) for r in source], limits, merged, merged_now, kv)
    out: list[QueuedRequest] = []
    work = 0
    for r in fed:
        rid = r.request_id
        if r.running:  # (a decode, or a prompt it prefilled: ``_left``)
            out.append(r)
            work += r.work
            continue
        full = queued[rid]
        # The KV entries it holds once fed whole, and what it has left: its own (the queue shows
        # what is left after steps that ran, which may have fed it too)
        total = full.held_under(merged, merged_now) + full.left(merged, merged_now)
        left = epoch.cf_chunked.pop(rid, full.left(merged, merged_now))
        n, at = min(r.fed(merged, merged_now), left), total - left
        out.append(replace(full, num_new=n, switched=None, held=None, context=at + n))  # attends its chunks before
        # Its work is the prompt's last tokens no merged state's cache holds: those before them,
        # computed again under this one, serve no one.
        again = total - min(full.left(m, merged_now) for m in {merged_now, None, full.adapter})
        work += max(0, at + n - again) - max(0, at - again)
        if n < left:
            epoch.cf_chunked[rid] = left - n
        else:
            epoch.cf_prefilled.add(rid)
        owed.pop(rid, None)
    return out, work


def owe_prefills(epoch: Epoch, basis: Basis, record: StepRecord) -> None:
    """Record in ``epoch.cf_owed`` the prompts ``record``'s step fed that its counterfactual has
    not fed all of (call after that step's ``cf_step``): the queues after show them running, or
    with less left, and the counterfactual would decode them, or feed only the rest, without
    ever paying what the step fed (reviews: a prompt a merged step prefilled, for which F's own
    step had no budget left, was decoded in the counterfactual from the next step on; one the
    counterfactual had fed a chunk of, and the step all of, decoded without its other chunks)."""
    waiting = {r.request_id: r for r in (*basis.fcfs, *basis.prompts) if not r.running}
    for rid in record.request_ids:
        # (One it fed in part is owed too: the step may have fed the rest, and the queues after
        # show it running, which it would decode without its own last chunks.)
        if (r := waiting.get(rid)) is not None and rid not in epoch.cf_prefilled:
            epoch.cf_owed.setdefault(rid, r)


def _left(r: QueuedRequest, epoch: Epoch, merged: str | None, merged_now: str | None) -> QueuedRequest:
    """``r`` as ``epoch``'s counterfactual has it (``cf_step``'s arguments): a prompt it prefilled
    a decode (attending all of it), and one it fed in part what it has left of it, holding KV
    (``started``: the scheduler's line does not stop it), and one the steps that ran fed first
    the prompt it was (``Epoch.cf_owed``). Their blocks are taken to fit (``kv`` None): they hold
    them already."""
    rid = r.request_id
    owed = epoch.cf_owed.get(rid)  # a prompt as queued before the steps that ran fed it
    if owed is None and r.running:
        return r
    if owed is None and rid in epoch.cf_prefilled:
        total = r.held_under(merged, merged_now) + r.left(merged, merged_now)
        return replace(r.decoding(), running=True, kv=None, context=total)
    if (left := epoch.cf_chunked.get(rid)) is not None:  # (an owed one: less what it fed of it itself)
        return replace(owed or r, num_new=left, switched=None, held=None, started=True, kv=None)
    return r if owed is None else replace(owed, kv=None)


def facts_of(basis: Basis, record: StepRecord, ranks: dict[str, int]) -> Facts:
    """What ``record``'s step, decided on ``basis``, tells ``observe`` beside its seconds."""
    ran = set(record.request_ids)
    fcfs_ids = {r.request_id for r in basis.fcfs}
    if record.merged is not None:
        payers: dict[str, float] = {record.merged: 1.0}
    else:  # whoever jumped in ahead of FCFS pays (nobody, for a batch this policy chose)
        jumped = (key_of(a) for rid, a in zip(record.request_ids, record.adapters) if rid not in fcfs_ids)
        payers = dict(Counter(jumped))
    # Displaced: what the unmerged step would feed and this one did not (the authors' artifact
    # counts against its FCFS step, ``_adjust_credit(scheduled_by_fcfs, scheduled)``, one that
    # models no token budget: ``queued[:max_num_seqs]``):
    # a prompt past the token budget was owed, by a merged adapter in debt too, for a step in
    # which FCFS would not have fed it either.
    left = [r for r in basis.fed if r.request_id not in ran]
    merged = record.merged is not None
    displaced = {key_of(r.adapter) for r in left}
    return Facts(
        mode=record.mode,
        displaced=displaced,
        waiting={key_of(r.adapter) for r in basis.fcfs if r.request_id not in ran},
        payers=payers,
        transfers=bool(displaced - payers.keys()) and sum(payers.values()) > 0,
        # what a switch made prompts compute again took the step's time and served no one
        served=record.num_tokens - min(record.num_tokens, sum(basis.excess.get(r, 0) for r in record.request_ids)),
        slowdown=1 + len(left) / max(1, len(ran)),
        cf=step_work(basis.fed, None, ranks, basis.merged_now) if merged else None,
        cf_work=sum(r.work for r in basis.fed) if merged else 0,
        cf_others=sum(r.adapter != basis.best for r in basis.fed) if basis.best is not None else 0,
    )
