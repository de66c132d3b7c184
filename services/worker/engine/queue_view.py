"""What the policy sees of the engine's queue (``queued``) and of its KV cache (``kv_room``).

Pure bookkeeping over sequences and the block manager, as ``scheduler.schedule`` will count them:
each request's tokens up to the step's token budget, what the prefix cache holds of a waiting
prompt under each merge state, and whether its blocks fit behind others (``QueuedRequest``).
"""

from __future__ import annotations

import sys
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from dlora.services.worker.engine.block_manager import BlockManager
from dlora.services.worker.engine.scheduler import Limits, may_fit
from dlora.services.worker.engine.sequence import Sequence, Status
from dlora.services.worker.policy import QueuedRequest, SwitchedFeeds
from dlora.services.worker.policy.base import KvNeed, KvRoom


def queued(
    seqs: Iterable[Sequence],
    adapters: Mapping[str, Any],
    limits: Limits,
    last: dict[str, QueuedRequest],
    blocks: BlockManager | None = None,
    cache_key: Callable[[str | None, str | None], bytes] | None = None,
    merged: str | None = None,
) -> dict[str, QueuedRequest]:
    """What the policy sees of ``seqs`` (adapters by name, for their ranks), by request id in
    scheduling order (priority, then arrival), a prompt counted up to the step's token budget
    (with chunked prefill: without, whole; all of it in ``QueuedRequest.length``) and, with a
    prefix cache (``blocks``; ``cache_key(adapter, merged)`` the key its KV is computed under),
    without the blocks it would find cached with ``merged`` merged as now, and under the other
    states (``SwitchedFeeds``): looked up only for each adapter's first ``max_num_seqs`` waiting
    prompts, all that one step of any candidate can run. With ``blocks``, what its next feed takes
    of them (``QueuedRequest.kv``, under the merged state now) and whether it ``fits`` them. A
    request's entry in ``last`` (the previous call's) is kept while it is unchanged, its context
    grown by at most a sixteenth: a decode's stays the same for many steps, and made anew it cost
    the step a few microseconds per sequence, as much as scheduling it."""
    out: dict[str, QueuedRequest] = {}
    budget, looked = limits.max_num_batched_tokens, Counter[str | None]()
    # Without chunked prefill a prompt runs whole or waits (first in its step, past the budget):
    # counted up to the budget, the policy priced such a step at a fraction of what it fed
    cap = budget if limits.chunked_prefill else sys.maxsize
    ordered = sorted(seqs, key=_by_arrival)
    # The token budget a prompt under way has beside the decodes, which go first in it: its chunk
    # (a prompt before it in the step takes tokens and the blocks they fill alike)
    beside = max(1, budget - min(sum(s.status is Status.RUNNING for s in ordered), limits.max_num_seqs - 1))
    for s in ordered:
        q = last.get(s.request_id)
        rank = adapters[s.adapter].rank if s.adapter is not None else 0
        new, switched, held = min(s.num_new, cap), None, None
        found: int | None = None  # a prompt holding no blocks: its tokens cached now, if looked up
        reused = 0  # and the blocks of them no one holds
        if (
            blocks is not None
            and cache_key is not None
            and _looks_up(s, blocks)
            and looked[s.adapter] < limits.max_num_seqs
        ):
            looked[s.adapter] += 1
            fed = {m: s.num_new - _cached(s, blocks, cache_key(s.adapter, m)) for m in {None, s.adapter, merged}}
            found = s.num_new - fed[merged]
            if found:
                names = s.block_names[s.salted(cache_key(s.adapter, merged))]
                reused = blocks.unheld(names, found // blocks.block_size)
            if min(fed.values()) < s.num_new:
                new = min(fed[merged], cap)
                switched = SwitchedFeeds(min(fed[None], cap), min(fed[s.adapter], cap), min(s.num_new, cap))
                length = s.num_cached + s.num_new
                held = SwitchedFeeds(length - fed[None], length - fed[s.adapter], s.num_cached)
        fields = (s.adapter, s.arrival, s.status is Status.RUNNING, new, rank, switched)
        # (the policy's counterfactuals feed all of it: ``QueuedRequest.left``)
        length = s.num_cached + s.num_new if s.status is Status.WAITING and s.num_new > cap else 0
        context = s.num_cached + (found or 0) + new  # what it attends fed ``new``: its cached tokens too
        started = blocks is not None and s.status is Status.WAITING and blocks.holds(s.request_id)
        fits, kv = True, None
        if blocks is not None:
            kv = _kv_need(s, blocks, new, found or 0, reused)
            fits = _fits_whole(s, blocks, kv, min(new, beside), found, looked, limits.max_num_seqs, cache_key, merged)
        if (
            q is None
            or (q.adapter, q.arrival, q.running, q.num_new, q.rank, q.switched) != fields
            or q.held != held
            or (q.fits, q.started, q.kv, q.length) != (fits, started, kv, length)
            or not q.context <= context <= q.context + q.context // 16
        ):
            recompute = s.status is Status.WAITING and bool(s.output_ids)
            q = QueuedRequest(s.request_id, *fields, context, held, fits, recompute, started, kv, length)
        out[s.request_id] = q
    return out


def kv_room(blocks: BlockManager) -> KvRoom:
    """The KV cache as the policy counts it (``within_budget``): its blocks free now."""
    return KvRoom(blocks.num_free, blocks.block_size)


def _kv_need(seq: Sequence, blocks: BlockManager, new: int, found: int, reused: int) -> KvNeed:
    """What feeding ``new`` tokens of ``seq`` takes of the blocks; ``found`` and ``reused``: of a
    prompt holding none, its tokens cached under the merged state now and its blocks of them no one
    holds (0: not looked up)."""
    if blocks.holds(seq.request_id):
        return KvNeed(min(new, blocks.capacity(seq.request_id) - seq.num_cached))
    return KvNeed(0, blocks.blocks_for(seq.total_len) - found // blocks.block_size, reused)


def _fits_whole(
    seq: Sequence,
    blocks: BlockManager,
    kv: KvNeed,
    chunk: int,
    found: int | None,
    looked: Counter[str | None],
    limit: int,
    cache_key: Callable[[str | None, str | None], bytes] | None,
    merged: str | None,
) -> bool:
    """Whether ``seq``'s step may start it behind others (``QueuedRequest.fits``): the blocks free
    hold what it takes (``kv``): a prompt holding none, all of it (full-ISL admission) besides its
    cached prefix; one under way, its next ``chunk`` of tokens; a decode, always (it preempts for
    its block). Where its cached prefix was not looked up (``found`` None), a prompt over the
    blocks free is looked up while its adapter has had fewer than ``limit`` prompts looked up
    (``looked``), as far as any candidate batch of the policy reaches; past them it fits if the
    most the cache could hold of it leaves it room (taken to fit, such a prompt took a place in
    the policy's batch that the scheduler then left empty)."""
    if seq.status is Status.RUNNING:
        return True
    if blocks.holds(seq.request_id):
        return kv.blocks(chunk, blocks.block_size) <= blocks.num_free
    if found is not None or not blocks.enable_prefix_caching:
        return kv.whole + kv.reused <= blocks.num_free
    if kv.whole <= blocks.num_free or seq.collects_prompt_logprobs:
        return kv.whole <= blocks.num_free
    if looked[seq.adapter] < limit:
        looked[seq.adapter] += 1
        # (a prompt's ids copied for it each step cost as much as the rest of its entry: only here)
        key = seq.salted(cache_key(seq.adapter, merged) if cache_key is not None else b"")
        return may_fit(seq, blocks, seq.all_ids() if seq.output_ids else seq.prompt_ids, key)
    return kv.whole - min(blocks.num_cached, (seq.total_len - 1) // blocks.block_size) <= blocks.num_free


def _looks_up(seq: Sequence, blocks: BlockManager) -> bool:
    """Whether ``scheduler.schedule`` would look ``seq`` up in the prefix cache: a prefill holding no blocks
    that may reuse (``NO_REUSE``)."""
    return (
        blocks.enable_prefix_caching
        and seq.status is Status.WAITING
        and not seq.collects_prompt_logprobs
        and not blocks.holds(seq.request_id)
    )


def _cached(seq: Sequence, blocks: BlockManager, key: bytes) -> int:
    """Tokens of ``seq`` the prefix cache holds under ``key`` (salted as ``scheduler.schedule`` salts it), its
    blocks' names hashed once (``Sequence.block_names``: a block's name depends only on the tokens
    up to its end, and ids are only ever appended)."""
    key = seq.salted(key)
    ids = seq.all_ids() if seq.output_ids else seq.prompt_ids
    return blocks.cached_tokens(ids, key, seq.block_names.setdefault(key, []))


def _by_arrival(seq: Sequence) -> int:
    return seq.arrival
