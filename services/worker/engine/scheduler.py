"""Turn a policy's decision into this step's batch under memory, token and adapter-slot limits.

Pure bookkeeping over sequences and the block manager: no tensors. A running sequence that
needs a block when none is free takes one from the lowest priority, never a higher one than its
own: the most recently arrived sequence of it holding blocks outside the batch, or one of the
batch of a strictly lower priority, or it gives up its own (``_victim``). That one is preempted by
recompute: its blocks are freed and it re-enters as a prefill of its prompt plus the tokens it
already produced (whose full blocks the prefix cache may still hold).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

from dlora.services.worker.engine.block_manager import BlockManager
from dlora.services.worker.engine.sequence import Sequence, Status
from dlora.services.worker.policy import StepDecision, free_slots
from dlora.services.worker.policy.base import decode_room

# A prefix-cache key no block is computed under: a prefill that looks under it finds nothing (one
# collecting prompt logprobs: a cached block's positions have no hidden states to give them).
NO_REUSE = b"\0prompt logprobs: computed, never reused"


@dataclass(frozen=True)
class Limits:
    max_num_seqs: int  # sequences per step
    max_num_batched_tokens: int  # tokens fed per step
    max_adapters: int  # distinct unmerged adapters per step (device slots), a mixed step's merged one included
    # A prefill longer than the step's token budget left runs a chunk of it beside the decodes
    # (vLLM's chunked prefill); off: it waits for a step with room, or runs alone when first.
    # On by default, as EngineConfig.enable_chunked_prefill and the policy's BatchLimits are.
    chunked_prefill: bool = True


@dataclass
class Schedule:
    seqs: list[Sequence] = field(default_factory=list)  # run this step, in decision order
    preempted: list[Sequence] = field(default_factory=list)  # lost their KV this step


def preempt(seq: Sequence, blocks: BlockManager) -> None:
    blocks.free(seq.request_id)
    seq.status = Status.WAITING
    seq.num_cached = 0
    seq.num_preemptions += 1


def schedule(
    decision: StepDecision,
    seqs: dict[str, Sequence],
    blocks: BlockManager,
    limits: Limits,
    cache_key: Callable[[str | None], bytes] = lambda _: b"",
    floor: float = math.inf,
) -> Schedule:
    """The decision's requests that run this step, each with ``num_scheduled`` set: every token it
    has new, or a chunk of a prefill. A prefill that holds no blocks yet first takes the cached
    blocks its prompt begins with under ``cache_key(adapter)`` (which weights compute this step's
    KV for that adapter; ``block_manager.py``). With chunked prefill the decodes come first in the
    token budget wherever they stand in the decision, as in vLLM: a prompt of a higher priority
    (first in the decision) took the whole budget and stalled every running stream for its
    prefill (a user's trial). Only those a seat and a device slot are left for (``decode_room``):
    a decode whose adapter no slot is left for does not run, and room held for it went unfed.
    As in vLLM (decodes first, then prompts until one is cut) no prompt runs after one is cut.
    ``floor``: the highest priority (lowest value) a pass before this one in the same step
    preempted (the engine's head of line, after a decision that ran nothing)."""
    out = Schedule()
    chosen: set[str] = set()
    adapters: set[str] = set()
    tokens = 0
    merged = decision.merged
    slots = free_slots(limits.max_adapters, merged)
    # The decision's decodes not yet considered (request id -> adapter, tokens), in its order: their
    # room is held back from the prefills before them, for those a seat and a slot are left for.
    decodes = _decode_tokens(decision, seqs) if limits.chunked_prefill else {}
    pending = sum(n for _, n in decodes.values())  # their tokens: the most that is held back
    # The blocks this step's prefills complete, by name: a prompt whose next blocks they are waits
    # a step and then finds them cached, rather than computing the same KV beside them (n > 1
    # choices, a prompt sent twice at once; one following a chunked prefill of the same prompt
    # waits chunk by chunk, as computing it beside would take as many steps). vLLM names blocks as
    # it allocates them so a sibling reads them in the same step; here they are named after the
    # forward that wrote them, so a failed step never leaves a name on KV that was not written.
    upcoming: set[bytes] = set()
    # Prefills chosen whose blocks are not yet in ``upcoming`` (their chunk's start and end, the key
    # it is computed under): hashed only if a fresh prompt comes after them, else ``computed`` names
    # them once, after the forward.
    providers: list[tuple[Sequence, int, int, bytes]] = []
    # The key of the first recompute (a request that was generating: preempted, or resumed from
    # elsewhere) this step could not start: no prompt keyed behind it starts either, as vLLM's
    # waiting loop stops there. Going on past it, a stream of small prompts kept the blocks it
    # waited for taken, and it never ran again (tests/engine/test_preemption_order.py).
    line = math.inf
    admitted: set[str] = set()  # admitted holding no blocks before this step
    # A prompt was cut to leave the decodes after it their room: the tokens left are theirs, and a
    # prompt after it got room only by taking the seat or slot of one of them (vLLM: the decodes
    # first, then prompts until one is cut; here the decision gives the seats and slots).
    cut = False
    for rid in decision.request_ids:
        seq = seqs.get(rid)
        if seq is None or seq.status is Status.FINISHED or rid in chosen:
            continue
        if len(out.seqs) == limits.max_num_seqs or tokens >= limits.max_num_batched_tokens:
            break
        if merged is not None and seq.adapter != merged and not decision.mixed:
            continue  # a merged step runs only the merged adapter's requests
        pending -= decodes.pop(rid, (None, 0))[1]
        if seq.adapter not in (None, merged) and seq.adapter not in adapters and len(adapters) >= slots:
            continue
        if seq.status is Status.WAITING and seq.priority > floor:
            # A higher priority gave blocks up: a lower one's prompt takes none of them (vLLM admits
            # no waiting request in a step that preempted; one admitted then decoded on as it waited)
            continue
        if cut and seq.status is Status.WAITING:
            continue
        fresh = not blocks.holds(rid)
        if fresh and seq.arrival > line:
            continue
        # Which weights compute its KV this step (a decode needs none: it seldom fills a block)
        caches = blocks.enable_prefix_caching and seq.status is Status.WAITING
        own_key = seq.salted(cache_key(seq.adapter)) if caches or fresh else b""
        reserved = 0
        if seq.status is Status.WAITING and seq.num_new > limits.max_num_batched_tokens - tokens - pending:
            seats = limits.max_num_seqs - len(out.seqs) - 1
            reserved = decode_room(decodes.values(), adapters, seq.adapter, merged, slots, seats)
        room = limits.max_num_batched_tokens - tokens - reserved
        if fresh:
            ids, lookup = seq.all_ids(), NO_REUSE if seq.collects_prompt_logprobs else own_key
            # (a recompute that blocks computed beside it may make fit goes the long way: it waits
            # then without stopping the line)
            if out.seqs and not (seq.output_ids and (providers or upcoming)) and not may_fit(seq, blocks, ids, lookup):
                line = _stop(seq, line)
                continue
            seq.num_cached = blocks.reuse_prefix(rid, ids, lookup)
            for provider, start, end, key in providers:  # named only when a later prompt may share them
                upcoming.update(blocks.upcoming(provider.request_id, provider.all_ids(), start, end, key))
            providers.clear()
            # Waits where the blocks a prefill before it computes now make half what it would
            # compute (a shared 16-token header ahead of a long prompt of its own is computed again)
            shared = blocks.upcoming_share(rid, ids, lookup, upcoming) if upcoming else 0
            if shared and 2 * shared >= min(seq.num_new, room):
                _release(seq, blocks, fresh)
                continue
            if out.seqs and not blocks.can_grow(rid, seq.total_len):
                # Starts only where all of it fits the blocks free (vLLM's scheduler_reserve_full_isl,
                # on by default): a long prompt let in a chunk at a time filled the cache half-way,
                # and the decodes' next blocks evicted it, to be let in and computed again (vLLM #21793)
                _release(seq, blocks, fresh)
                line = _stop(seq, line)
                continue
        n = seq.num_new
        if n > room:
            if limits.chunked_prefill and seq.status is Status.WAITING and room > 0:
                n = room
            elif out.seqs or reserved:
                _release(seq, blocks, fresh)
                line = _stop(seq, line)
                continue
        # Most decodes fit in the blocks they hold: nothing to check, take or preempt.
        if seq.num_cached + n > blocks.capacity(rid):
            before = len(out.preempted)
            fits = _fits(seq, seq.num_cached + n, seqs, blocks, out, chosen, decision)
            for victim in out.preempted[before:]:  # a decode preempted is no longer one to hold room for
                pending -= decodes.pop(victim.request_id, (None, 0))[1]
                floor = min(floor, victim.priority)
                if victim.request_id in chosen:  # one of the step, of a lower priority: out of it again
                    chosen.remove(victim.request_id)
                    out.seqs.remove(victim)
                    tokens -= victim.num_scheduled
                    victim.num_scheduled = 0
                    providers = [p for p in providers if p[0] is not victim]
                    if victim.request_id in admitted:
                        _take_back(victim, out)
                    adapters = {s.adapter for s in out.seqs if s.adapter not in (None, merged)}
            if not fits:
                _release(seq, blocks, fresh)
                line = _stop(seq, line)
                continue
            blocks.grow(rid, seq.num_cached + n)
        seq.num_scheduled = n
        cut = cut or n < seq.num_new
        seq.block_names.clear()  # looked up for the policy while it waited; admitted, it needs them no more
        out.seqs.append(seq)
        chosen.add(rid)
        if fresh:
            admitted.add(rid)
        tokens += n
        if caches:
            providers.append((seq, seq.num_cached, seq.num_cached + n, own_key))
        # Counted as vLLM counts them: a lookup with the cache on, of a request not preempted
        # (its own blocks found again are no hit), and none by one that may not reuse.
        if fresh and blocks.enable_prefix_caching and not seq.looked_up:
            seq.looked_up = True
            if not seq.collects_prompt_logprobs:
                seq.num_cached_prompt = min(seq.num_cached, len(seq.prompt_ids))
                seq.lookup = (seq.total_len, seq.num_cached)
        if seq.adapter not in (None, merged):
            adapters.add(seq.adapter)
    return out


def may_fit(seq: Sequence, blocks: BlockManager, ids: list[int], lookup: bytes) -> bool:
    """Whether all of ``seq`` may fit the blocks free once it takes the cached blocks it begins with
    (the full-ISL check after ``reuse_prefix`` says for sure): looked up by names hashed once
    (``Sequence.block_names``), taking nothing. Looked up anew, a prompt passed over step after
    step hashed its whole cached prefix each step, and the step goes on past it to the next."""
    found = 0 if lookup == NO_REUSE else blocks.cached_tokens(ids, lookup, seq.block_names.setdefault(lookup, []))
    return blocks.blocks_for(seq.total_len) - found // blocks.block_size <= blocks.num_free


def _stop(seq: Sequence, line: float) -> float:
    """The step's ``line`` once ``seq`` could not run: its key if it is a recompute (a decode that
    gave up its own blocks too). A fresh prompt that does not fit is passed over (dLoRA's choice)."""
    return min(line, seq.arrival) if seq.status is Status.WAITING and seq.output_ids else line


def _decode_tokens(decision: StepDecision, seqs: dict[str, Sequence]) -> dict[str, tuple[str | None, int]]:
    """The adapter of each of the decision's running sequences and the tokens it would feed this
    step (one, as a rule), in the decision's order."""
    merged, mixed = decision.merged, decision.mixed
    return {
        rid: (s.adapter, s.num_new)
        for rid in decision.request_ids
        if (s := seqs.get(rid)) is not None
        and s.status is Status.RUNNING
        and (merged is None or mixed or s.adapter == merged)
    }


def _fits(
    seq: Sequence,
    num_tokens: int,
    seqs: dict[str, Sequence],
    blocks: BlockManager,
    out: Schedule,
    chosen: set[str],
    decision: StepDecision,
) -> bool:
    """Whether ``seq`` can hold ``num_tokens``, preempting others where it may (``_victim``): a
    decode takes blocks from sequences outside the step or of the step's of a lower priority (or
    gives up its own); a prefill waits for free blocks rather than evicting running work, unless
    the step would otherwise be empty: then sequences the decision left out (paused while another
    adapter is merged) or of a lower priority give their blocks back, but not prefills that came
    before it, and then those of the decision that arrived after it."""
    rid = seq.request_id
    if seq.status is Status.RUNNING:
        out.preempted += _make_room(seq, num_tokens, seqs, blocks, exclude=chosen | {rid}, step=out.seqs)
        if not blocks.can_grow(rid, num_tokens):
            preempt(seq, blocks)
            out.preempted.append(seq)
            return False
        return True
    if blocks.can_grow(rid, num_tokens):
        return True
    if out.seqs:
        return False
    # Not a prefill that came first: two prompts the cache holds one at a time, each first in
    # turn, evicted each other's chunks for ever (the engine then runs the head of line instead).
    # Keys may tie (requests resumed while the same prompt waited, ``fcfs_arrival``): then the order
    # they were added in, as the queue sorts them. Taken as one before the other, two half-prefilled
    # ones each spared the other, and neither's next chunk ever found a block (pressure fuzz 1048).
    place = {r: (s.arrival, i) for i, (r, s) in enumerate(seqs.items())}
    ahead = {r for r, s in seqs.items() if s.status is Status.WAITING and place[r] < place[rid]}
    # (the decision's of a lower priority are not spared: a higher priority outside it went first)
    spared = {r for r in decision.request_ids if (s := seqs.get(r)) is None or s.priority <= seq.priority}
    # Half-prefilled prompts of the decision that came after this one may go too (else two of
    # them can fill the cache and no step ever runs again).
    earlier = {r for r in seqs if place[r] <= place[rid]}
    kept = (spared | ahead) & earlier
    could = [r for r, s in seqs.items() if r not in kept and s.priority >= seq.priority]
    if blocks.extra_blocks_needed(rid, num_tokens) > blocks.num_free + blocks.freeable(could):
        # Evicting all it may would not make room: evicted, they recomputed for nothing (one was
        # started again in the same step by the head-of-line pass that then ran instead).
        return False
    out.preempted += _make_room(seq, num_tokens, seqs, blocks, exclude=spared | ahead)
    if not blocks.can_grow(rid, num_tokens):
        out.preempted += _make_room(seq, num_tokens, seqs, blocks, exclude=earlier)
    return blocks.can_grow(rid, num_tokens)


def _take_back(seq: Sequence, out: Schedule) -> None:
    """Take back the admission of ``seq``, a prompt admitted holding no blocks and then preempted
    in the same step before it ran: it lost no KV of its own, so it is no preemption (vLLM preempts
    only requests admitted in an earlier step: its waiting loop runs after the running loop that
    preempts), and its lookup is not kept either (``forget_lookup``). Kept, the blocks it found
    were its usage's ``cached_tokens`` and the stats' hits though it computed its prompt later
    whatever the cache then held, and it counted in ``vllm:num_preemptions``."""
    out.preempted.remove(seq)
    seq.num_preemptions -= 1
    forget_lookup(seq)


def forget_lookup(seq: Sequence) -> None:
    """``seq``, preempted before the step that looked it up ran: its lookup not kept, so its next
    admission looks up as its first and its usage counts what that finds (here, and
    ``async_scheduling.recompute``, whose preemption, unlike this module's take-back, stays one).
    A no-op for one whose lookup the stats already took (an admission after a preemption made
    none): forgotten, it was counted a second time at its next admission."""
    if seq.lookup is not None:
        seq.num_cached_prompt, seq.lookup, seq.looked_up = 0, None, False


def _release(seq: Sequence, blocks: BlockManager, fresh: bool) -> None:
    """Undo a fresh prefill's lookup when it does not run this step: the cached blocks it took go
    back (still cached) and it is looked up again when it is next considered."""
    if fresh:
        blocks.free(seq.request_id)
        seq.num_cached = 0


def _make_room(
    seq: Sequence,
    num_tokens: int,
    seqs: dict[str, Sequence],
    blocks: BlockManager,
    exclude: set[str],
    step: list[Sequence] | None = None,
) -> list[Sequence]:
    """Preempt sequences (``_victim``) until ``seq`` can hold ``num_tokens``."""
    victims = []
    while not blocks.can_grow(seq.request_id, num_tokens):
        victim = _victim(seq, seqs, blocks, exclude, step or [])
        if victim is None:
            break
        preempt(victim, blocks)
        victims.append(victim)
    return victims


def _victim(
    seq: Sequence, seqs: dict[str, Sequence], blocks: BlockManager, exclude: set[str], step: list[Sequence]
) -> Sequence | None:
    """Who gives ``seq`` blocks: one holding them outside ``exclude`` or, of a strictly lower
    priority than ``seq``'s, one of ``step`` (the step's own, scheduled already); never one of a
    higher priority (vLLM's priority scheduling preempts its lowest-priority request: a merged step
    of low-priority decodes took the blocks of an urgent request it left paused, a helper's fuzz).
    The lowest priority first; within one, dLoRA's rule: outside the step before the step's own,
    the latest to arrive first (the highest key, ``fcfs_arrival``)."""
    outside = [
        (s.priority, 1, s.arrival, s)
        for s in seqs.values()
        if s.priority >= seq.priority and s.request_id not in exclude and blocks.holds(s.request_id)
    ]
    inside = [(s.priority, 0, s.arrival, s) for s in step if s.priority > seq.priority]
    best = max([*outside, *inside], key=lambda c: c[:3], default=None)
    return None if best is None else best[3]
