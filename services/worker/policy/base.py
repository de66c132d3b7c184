"""What a batching policy sees and returns, and the arithmetic every policy shares.

Pure: no torch, no I/O. The engine builds a ``QueuedRequest`` per unfinished request before each
step, asks ``decide`` for a ``StepDecision``, runs it, and hands the decision back with what ran
and what it cost (a ``StepRecord``) to ``observe``: a policy keeps no hidden state between the two.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Iterable, Mapping
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, replace
from typing import Any, ClassVar, NamedTuple


class Mode(enum.StrEnum):
    """How a step runs its adapters."""

    UNMERGED = "unmerged"  # base weights; every adapter's tokens add their own delta
    MERGED = "merged"  # one adapter merged into the weights; only its requests run, at base cost
    # One adapter merged; its requests run at base cost and every other request beside them, with
    # its own delta added and the merged adapter's subtracted (``engine.placement.StepSlots``).
    MIXED = "mixed"


class SwitchedFeeds(NamedTuple):
    """A waiting prompt's tokens fed were the merged state to change: the prefix cache's key holds
    that state (``engine/block_manager.py``), so each finds its own cached blocks, or none."""

    unmerged: int  # with no adapter merged
    own: int  # with its own adapter merged
    other: int  # with another adapter merged (taken to have none of it cached)


class KvNeed(NamedTuple):
    """What a request's next feed takes of a paged KV cache, as the scheduler counts it
    (``within_budget``, ``scheduler.schedule``), in blocks of ``KvRoom.block_size`` tokens. A
    prompt's cached prefix is the one it finds with the adapter merged now: under another merged
    state it finds other blocks cached, and is counted the same (its feed is ``fed``'s)."""

    spare: int  # tokens the blocks it holds still have room for, at most ``num_new`` (fresh prompt: 0)
    # A prompt holding no blocks: the blocks all of it takes besides the cached ones it begins with
    # (it starts behind others only where they are free: full-ISL admission); 0 for the others.
    whole: int = 0
    # A prompt holding no blocks: its cached blocks that no one holds (taking them, it takes them
    # from the blocks free).
    reused: int = 0

    def blocks(self, n: int, block_size: int) -> int:
        """Blocks a feed of ``n`` tokens takes from the free ones: those past its spare room, and
        the unheld cached ones a prompt takes first."""
        return self.reused + -(-max(0, n - self.spare) // block_size)


class KvRoom(NamedTuple):
    """The paged KV cache as a step begins: what ``within_budget`` counts each ``KvNeed`` against."""

    free_blocks: int  # blocks a sequence can be given (never cached, or cached and held by none)
    block_size: int  # tokens a block holds


@dataclass(frozen=True)
class QueuedRequest:
    """What a policy sees of one unfinished request."""

    request_id: str
    adapter: str | None  # None: the base model
    arrival: int  # FCFS order: the engine's scheduling key (priority, then arrival)
    running: bool  # its KV is cached (decode) rather than waiting for a prefill
    num_new: int  # tokens it would feed this step, the merged adapter as it is (cached prompt blocks skipped)
    rank: int = 0  # LoRA rank of its adapter (0 for the base model)
    switched: SwitchedFeeds | None = None  # None: ``num_new`` under any merged state (none of it cached, a decode)
    # KV entries it would attend were it fed ``num_new`` tokens: its tokens cached, computed or
    # not, and those fed (a step's KV read grows with it: ``CostModel``). A running request's is
    # refreshed as it grows by a sixteenth (``queue_view.queued``), so it may be a little short.
    context: int = 0
    # With ``switched``: the KV entries it attends besides those it feeds, under each merged
    # state (what it holds and what it finds cached under that state's key).
    held: SwitchedFeeds | None = None
    # False: a prefill the blocks free now cannot hold whole, which the scheduler starts only first
    # in its step (full-ISL admission): a prompt behind others in a batch only takes a place.
    fits: bool = True
    # Waiting, it was generating (preempted, or resumed from elsewhere): one the step cannot start
    # stops the fresh prompts keyed after it (the scheduler's ``line``; ``within_budget``).
    recompute: bool = False
    # Waiting, it holds blocks: a prefill whose chunks are under way (vLLM's running list), which
    # the scheduler's line does not stop (only fresh prompts wait behind a recompute).
    started: bool = False
    # What its next feed takes of the KV cache's blocks (None: not counted, taken to fit).
    kv: KvNeed | None = None
    # Waiting: the KV entries it holds once all its prompt is fed, where ``num_new`` (and
    # ``switched``) stop at the token budget (``queue_view.queued``); 0: they are all of it.
    length: int = 0

    @property
    def fresh(self) -> bool:
        """Whether it holds no KV: a prompt (or recompute) yet to start, which the scheduler's line stops."""
        return not (self.running or self.started)

    @property
    def keeps_place(self) -> bool:
        """Whether it may run in a batch behind others: it fits, or it is a recompute (which, not
        fitting, still stops the prompts keyed after it: left out, they would start instead)."""
        return self.fits or self.recompute

    def fed(self, merged: str | None, merged_now: str | None) -> int:
        """Tokens it would feed in a step with ``merged`` merged, ``merged_now`` being merged now."""
        s = self.switched
        if merged == merged_now or s is None:
            return self.num_new
        return s.unmerged if merged is None else s.own if merged == self.adapter else s.other

    def left(self, merged: str | None, merged_now: str | None) -> int:
        """Tokens of its prompt left to feed with ``merged`` merged (``fed``'s arguments), over as
        many steps as that takes: ``fed``'s, past the token budget where ``length`` says."""
        n = self.fed(merged, merged_now)
        return max(n, self.length - self.held_under(merged, merged_now)) if self.length else n

    def attends(self, merged: str | None, merged_now: str | None) -> int:
        """KV entries it would attend in a step with ``merged`` merged (``fed``'s arguments): a
        prompt attends what the cache holds for it under that state and what it feeds."""
        return self.held_under(merged, merged_now) + self.fed(merged, merged_now)

    def held_under(self, merged: str | None, merged_now: str | None) -> int:
        """KV entries it would attend besides those it feeds, with ``merged`` merged."""
        h = self.held
        if merged == merged_now or h is None:
            return self.context - self.num_new
        return h.unmerged if merged is None else h.own if merged == self.adapter else h.other

    @property
    def work(self) -> int:
        """Tokens it must feed however the step runs: under the merged state whose cached blocks
        hold the most of it. A candidate's price is per token of work; what it computes again is
        cost, not work served."""
        s = self.switched
        return self.num_new if s is None else min(self.num_new, s.unmerged, s.own)

    def decoding(self) -> QueuedRequest:
        """The request once its prompt is in: one token a step, whatever is merged."""
        return replace(self, num_new=1, switched=None, held=None)

    def cut(self, room: int) -> QueuedRequest:
        """The request with at most ``room`` tokens fed (a chunk of its prompt), whatever is merged."""
        s = self.switched
        return replace(
            self,
            num_new=min(self.num_new, room),
            switched=None if s is None else SwitchedFeeds(*(min(n, room) for n in s)),
            context=self.context - max(0, self.num_new - room),
        )


@dataclass(frozen=True)
class StepDecision:
    # Adapter to have merged into the weights for this step. None: base weights, and any mix of
    # base requests and unmerged adapters may run.
    merged: str | None
    # Requests that may join the step, in priority order; the scheduler admits as many as memory,
    # the token budget and the adapter slots allow.
    request_ids: list[str]
    # What the deciding policy saw (opaque to the engine), handed back to it with the step's
    # record in ``observe``; None for a decision made outside the policy (``step(decision=...)``).
    basis: object | None = None
    # With ``merged``: other adapters' and base requests may run too (a mixed step). The merged
    # adapter's correction then takes one of the ``max_adapters`` device slots.
    mixed: bool = False

    @property
    def mode(self) -> Mode:
        if self.merged is None:
            return Mode.UNMERGED
        return Mode.MIXED if self.mixed else Mode.MERGED


@dataclass(frozen=True)
class StepRecord:
    """What one step actually ran and cost, measured by the engine."""

    merged: str | None  # adapter merged during the step
    request_ids: list[str]  # requests that ran
    adapters: list[str | None]  # their adapters, in the same order
    num_tokens: int  # tokens fed (prefill + decode)
    seconds: float  # model step time (inputs, forward and sampling; switches not)
    merge_seconds: float = 0.0  # merge paid before the step (0 if none)
    unmerge_seconds: float = 0.0  # unmerge paid before the step (0 if none)
    lora_segments: int = 0  # distinct adapters whose deltas ran (``lora_work``)
    lora_rank_tokens: int = 0  # the ranks each token's deltas ran at, summed over the tokens
    # KV entries its sequences attended, summed over them (cached and fed); a step that repeats
    # (decodes only: ``Policy.observe_repeated``) attends one more a request each time.
    context_tokens: int = 0

    @property
    def mode(self) -> Mode:
        """What ran: a mixed decision whose batch held only the merged adapter's requests ran merged."""
        if self.merged is None:
            return Mode.UNMERGED
        return Mode.MERGED if all(a == self.merged for a in self.adapters) else Mode.MIXED

    @property
    def switch_seconds(self) -> float:
        return self.merge_seconds + self.unmerge_seconds


@dataclass(frozen=True)
class BatchLimits:
    max_num_seqs: int  # requests per step
    max_adapters: int  # distinct unmerged adapters per step (device slots), a mixed step's merged one included
    max_num_batched_tokens: int | None = None  # tokens fed per step (None: no limit)
    chunked_prefill: bool = True  # a prompt past the budget left runs in part (else it waits a step)


def free_slots(max_adapters: int, merged: str | None) -> int:
    """Device slots for the adapters that run unmerged beside ``merged``: a mixed step's merged
    adapter needs none for its own requests, but its correction holds one."""
    return max_adapters - (merged is not None)


def lora_work(fed: list[tuple[str | None, int]], merged: str | None, ranks: Mapping[str, int]) -> tuple[int, int]:
    """(segments, rank-tokens) of the LoRA a step runs, from each sequence's (adapter, tokens fed)
    with ``merged`` merged: each adapter's own delta (none for the base model's or the merged
    adapter's tokens) and, in a mixed step, the merged adapter's subtracted from every other token.
    Segments: distinct adapters whose deltas run; rank-tokens: each token's ranks, summed."""
    own: set[str] = set()
    rank_tokens = corrected = 0  # corrected: tokens not the merged adapter's (its delta subtracted)
    for a, n in fed:  # one pass: the policy prices several candidate steps each step
        if a != merged:
            corrected += n
            if a is not None:
                own.add(a)
                rank_tokens += ranks[a] * n
    if merged is None:
        return len(own), rank_tokens
    return len(own) + (corrected > 0), rank_tokens + ranks[merged] * corrected


def decode_room(
    later: Iterable[tuple[str | None, int]],
    holding: AbstractSet[str],
    own: str | None,
    merged: str | None,
    slots: int,
    seats: int,
) -> int:
    """Tokens held back from a prefill for the decodes after it in its step (chunked prefill: they
    go first in the token budget wherever they stand in the decision; ``scheduler.schedule`` and
    ``within_budget`` both hold this back): of ``later`` ((adapter, tokens) each, in decision order)
    those a seat and a device slot are left for, at most ``seats`` of them. A decode whose adapter
    needs no slot (the base model's, ``merged``'s) or holds one (``holding``: the unmerged adapters
    of the requests admitted so far, and ``own``, the prefill's) takes none; another takes the next
    of ``slots`` (``free_slots``) while one is left, and without one does not run this step, so no
    room is held for it. Held for every decode after it, a prompt before decodes of adapters no
    slot was left for was cut to a token or two and the room went to no one (a review). Once a
    prefill is cut to this room no prompt after it runs: one taking the seat or slot of a decode
    counted here stalled it for a chunk of its room, and left the rest of it unfed."""
    held, room, left = set(holding), 0, seats
    if own is not None and own != merged:
        held.add(own)
    for adapter, n in later:
        if left <= 0:
            break
        if adapter is not None and adapter != merged and adapter not in held:
            if len(held) >= slots:
                continue
            held.add(adapter)
        room, left = room + n, left - 1
    return room


def fcfs_batch(queue: list[QueuedRequest], limits: BatchLimits, merged: str | None = None) -> list[QueuedRequest]:
    """The batch plain FCFS would run: queue order (the engine's: priority, then arrival), at most
    ``max_adapters`` distinct adapters (base requests need no slot) and ``max_num_seqs`` requests.
    ``merged``: the batch of a mixed step with that adapter merged, whose requests need no slot
    while its correction holds one; or, given only that adapter's requests, of a merged step. The
    token budget is the scheduler's to apply (it knows each prompt's cached prefix): see
    ``within_budget``. A prompt that does not ``fit`` is left out unless first (the scheduler
    would pass it over, its step a request short); a recompute that does not keeps its place, and
    the prompts keyed after it that hold no KV are left out (the scheduler's line starts none)."""
    slots = free_slots(limits.max_adapters, merged)
    adapters: set[str] = set()
    out: list[QueuedRequest] = []
    line = math.inf
    for r in queue:
        if len(out) == limits.max_num_seqs:
            break
        if (out and not r.keeps_place) or (r.fresh and r.arrival > line):
            continue
        if r.adapter is not None and r.adapter != merged and r.adapter not in adapters:
            if len(adapters) >= slots:
                continue
            adapters.add(r.adapter)
        if out and not r.fits:
            line = min(line, r.arrival)
        out.append(r)
    return out


def within_budget(
    batch: list[QueuedRequest],
    limits: BatchLimits,
    merged: str | None = None,
    merged_now: str | None = None,
    kv: KvRoom | None = None,
) -> list[QueuedRequest]:
    """What of ``batch`` one step with ``merged`` merged can feed (``merged_now`` being merged now:
    ``QueuedRequest.fed``), as the scheduler feeds it: its requests in order up to
    ``max_num_batched_tokens``, a prompt cut to the tokens left once the decodes after it that a
    seat and a slot are left for have their room (chunked prefill: ``decode_room``,
    ``scheduler.schedule``; no prompt after one so cut), or, without chunked prefill, every prompt
    that does not fit what is left skipped (it waits for a later step) unless it is the step's
    first; nor a prompt keyed after a recompute that did not fit (the scheduler's line); at most
    ``max_num_seqs``, and ``max_adapters`` slots held by the adapters it feeds (``free_slots``). With
    ``kv`` (the cache as the step begins) the blocks too, each admitted request's feed taking its
    ``QueuedRequest.kv`` from the free ones: a prompt not first whose feed, or whole prompt for
    one holding none, does not fit what the requests before it left is skipped as the scheduler
    skips it (a prompt under way: by the chunk it is fed, whatever its ``fits``); a decode, and the
    step's first request, preempt others for their blocks, and run (whom they preempt is not
    modelled, nor a first one the scheduler cannot make room for). For pricing a step."""
    budget = limits.max_num_batched_tokens
    if budget is None and kv is None:
        return batch
    out: list[QueuedRequest] = []
    tokens, line = 0, math.inf
    free = kv.free_blocks if kv is not None else 0
    # The tokens of the running requests not yet reached: the most ``decode_room`` may hold back
    decodes = sum(r.num_new for r in batch if r.running) if limits.chunked_prefill else 0
    runs: list[tuple[str | None, int]] | None = None  # theirs (adapter, tokens), once a prompt needs them
    reached = 0  # running requests reached
    cut = False  # a prompt was cut for the decodes' room: no prompt after it runs (``schedule``)
    slots, adapters = free_slots(limits.max_adapters, merged), set[str]()
    for r in batch:
        if (budget is not None and tokens >= budget) or len(out) == limits.max_num_seqs:
            break
        need = r.kv if kv is not None else None
        if r.running:  # (without chunked prefill none are counted: below zero, room was held)
            decodes, reached = decodes - (r.num_new if limits.chunked_prefill else 0), reached + 1
        if r.adapter not in (None, merged) and r.adapter not in adapters and len(adapters) >= slots:
            continue  # (the slots the adapters it admitted hold: one it passed over holds none)
        if (cut and not r.running) or (r.arrival > line and r.fresh):
            continue
        # (a prompt under way with its blocks counted: by the chunk it is fed, below; its ``fits``
        # took the chunk all the decodes would leave it, which a prompt fed before it may cut)
        whole = r.fresh or need is None
        if not r.running and out and whole and (not r.fits or (need is not None and need.whole + need.reused > free)):
            line = min(line, r.arrival) if r.recompute else line  # (passed over; a recompute stops the line)
            continue
        n = whole_feed = r.fed(merged, merged_now)
        reserved = 0
        # (a prompt that fits beside all the decodes after it is fed whole whatever is held back)
        if decodes and budget is not None and not r.running and n > budget - tokens - decodes:
            runs = [(q.adapter, q.num_new) for q in batch if q.running] if runs is None else runs
            seats = limits.max_num_seqs - len(out) - 1
            reserved = decode_room(runs[reached:], adapters, r.adapter, merged, slots, seats)
        room = (budget if budget is not None else math.inf) - tokens - reserved
        if n > room:
            if limits.chunked_prefill and not r.running and room > 0:
                r, n = r.cut(int(room)), int(room)
            elif out or reserved:
                line = min(line, r.arrival) if r.recompute else line
                continue
        if need is not None and kv is not None:
            taken = need.blocks(n, kv.block_size)
            if taken > free and out and not r.running:  # (a decode, or the step's first, preempts)
                line = min(line, r.arrival) if r.recompute else line
                continue
            free = max(0, free - taken)
        if r.adapter not in (None, merged):
            adapters.add(r.adapter)
        out.append(r)
        tokens, cut = tokens + n, cut or n < whole_feed
    return out


def fcfs_refilled(
    queue: list[QueuedRequest],
    limits: BatchLimits,
    merged: str | None = None,
    merged_now: str | None = None,
    kv: KvRoom | None = None,
) -> list[QueuedRequest]:
    """``fcfs_batch`` (``merged``: of a mixed step with that adapter merged), then the requests
    it left out for a device slot held only by requests the step cannot feed (``within_budget``:
    the scheduler passes them over) that the step can feed, in queue order (a slot the next in
    line cannot use either going on to the one after): the scheduler gives an adapter its slot
    only once it admits a request of it, so one it passes over keeps no one out.
    Without this, a prompt of lora-1 the token budget left no room for held the only slot in the
    batch, and lora-2's short prompt behind it waited a step with the slot empty (tokenspeed
    #268's review: count only scheduled adapters against max_loras). Only those the step can feed
    are added: this is what plain FCFS runs, the dLoRA policy's F, whose requests left waiting gain
    credit, and one it could not feed either would be owed for a step in which FCFS would not have
    run it. Those added are in the decision only: the scheduler's slot count decides, so where it
    admits the one passed over after all, they wait as before."""
    batch = fcfs_batch(queue, limits, merged)
    chosen = {r.request_id for r in batch}
    out, passed = batch, set[str]()
    # Until no slot is freed: the request given one may not fit either, and then the next
    # adapter in line gets it, as the scheduler gives it (each round passes one more over, at least)
    while True:
        fed = {r.request_id for r in within_budget(out, limits, merged, merged_now, kv)}
        if not (newly := {r.request_id for r in out if r.request_id not in fed} - passed):
            break
        passed |= newly
        rest = fcfs_batch([r for r in queue if r.request_id not in passed], limits, merged)
        keep = passed | {r.request_id for r in rest}
        out = [r for r in queue if r.request_id in keep]
    if not passed:  # (every step the budget feeds all of F: F itself, no pass over the whole queue)
        return batch
    # In queue order, as the scheduler takes them: appended, a later prompt in F took the budget
    # ahead of an earlier one in the freed slot. All of F stays, as the scheduler decides (one
    # whose adapter's slot an earlier one took is not fed: ``within_budget`` counts slots too)
    return [r for r in queue if r.request_id in chosen or r.request_id in fed]


class Policy:
    """Base class: ``decide`` is the policy; ``observe`` and the checkpoint are no-ops by default."""

    # Whether ``decide`` reads what ``observe`` learned (step costs, credits, thresholds): then a
    # step that repeats the last one (the simulator's fast-forward) must ask it again, as its
    # decision may change with no change to the queue.
    learns: ClassVar[bool] = False

    def __init__(self, limits: BatchLimits) -> None:
        self.limits = limits
        # Adapters never to merge (too large beside the base weights: ``engine/merge.py``); the
        # engine shares its set here.
        self.unmergeable: set[str] = set()

    def decide(self, queue: list[QueuedRequest], merged_now: str | None, kv: KvRoom | None = None) -> StepDecision:
        """The next step, from every unfinished request (``queue``, in arrival order), the adapter
        merged now (None: base weights) and the KV cache's free blocks (None: not counted)."""
        raise NotImplementedError

    def observe(self, decision: StepDecision, record: StepRecord) -> None:
        """Learn from a step: the ``decision`` it ran (this policy's own, or one made outside it)
        and what it ran and cost (``record``)."""

    def observe_repeated(self, decision: StepDecision, record: StepRecord, seconds: list[float]) -> None:
        """``observe`` of the same step run once per entry of ``seconds``, each taking that long
        (the simulator's fast-forward repeats a step): the same as one call per entry; a policy
        may work out once what does not change between them."""
        for t in seconds:
            self.observe(decision, replace(record, seconds=t))

    def forget_adapter(self, name: str, keep: str | None = None) -> None:
        """No version of adapter ``name`` but ``keep`` (its engine key now; None: it is deleted) is
        held any more: what is kept of the others goes (into ``keep``'s where it is given)."""

    def adapters_kept(self) -> set[str]:
        """The adapter names (the base model's "" left out) whose credit it keeps."""
        return {k.partition("@")[0] for k in self.checkpoint().get("credits", {})} - {""}

    def checkpoint(self) -> dict[str, Any]:
        """State worth keeping across a restart (credits, thresholds), JSON-serialisable."""
        return {}

    def restore(self, state: dict[str, Any]) -> None:
        """Resume from ``checkpoint()``'s output."""
