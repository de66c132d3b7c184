"""What the dLoRA policy's ``decide`` works out of the queue alone, kept while the queue stays the
same (``QueueShape``). Pure.

A step's decision reads two things: the queue (with the adapter merged now, the KV cache's free
blocks and the batch limits) and what the policy learned (costs, credits, band, watchdog). The
first fixes the batches every candidate would run (F, its refills, each adapter's group, what one
step of each feeds, their tokens and contexts); the second only which candidate wins and what
credit moves. While requests only decode, the engine hands the policy the very same entries step
after step (``queue_view.queued`` keeps a request's entry until its context grows by a sixteenth
or it crosses a block bound), so the batches need not be built again: on a simulated hour that
decides millions of repeated steps, building them was most of ``decide``'s time. Everything here
is a function of the entries (frozen, their fields immutable: one seen again by identity is the
same), so keeping it changes no decision.
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from dlora.services.worker.policy.base import BatchLimits, KvRoom, QueuedRequest, fcfs_refilled, within_budget
from dlora.services.worker.policy.dlora_steps import key_of

T = TypeVar("T")


@dataclass
class QueueShape:
    """What ``decide`` reads of ``queue`` (``merged_now`` merged, ``kv`` free, under ``limits``)
    before anything it learned: built by ``shape_of``, kept by the policy while ``same``."""

    # The entries, compared by identity: a copy, as a caller may change its list in place.
    queue: tuple[QueuedRequest, ...]
    merged_now: str | None
    kv: KvRoom | None
    limits: BatchLimits
    fcfs: list[QueuedRequest]  # F: the batch FCFS would run (``fcfs_refilled``)
    f_run: list[QueuedRequest]  # what one step of F feeds (``within_budget``)
    ranks: dict[str, int]  # each queued adapter's rank, in the order the queue first names them
    # Each adapter's requests a merged step on it may run: at most a batch, none behind a
    # prompt that does not fit, none fresh behind its first recompute that cannot start.
    by_adapter: dict[str, list[QueuedRequest]]
    queued_keys: set[str]  # the credit keys of the queued requests' adapters (``key_of``)
    running_keys: set[str]  # and of F's running ones
    # Pieces of candidates (by adapter and mode), built as a decision first needs each.
    pieces: dict[tuple[Any, ...], Any] = field(default_factory=dict)

    def same(self, queue: list[QueuedRequest], merged_now: str | None, kv: KvRoom | None, limits: BatchLimits) -> bool:
        """Whether ``decide``'s arguments are those this was built from: the same entries, in order."""
        return (
            merged_now == self.merged_now
            and kv == self.kv
            and limits is self.limits
            and len(queue) == len(self.queue)
            and all(map(operator.is_, queue, self.queue))
        )

    def piece(self, key: tuple[Any, ...], build: Callable[[], T]) -> T:
        """The piece named ``key``, built by ``build`` the first time it is asked for: ``build``
        must read nothing but the queue's arguments (nothing the policy learns)."""
        try:
            return self.pieces[key]  # type: ignore[no-any-return]
        except KeyError:
            made = self.pieces[key] = build()
            return made


def shape_of(queue: list[QueuedRequest], merged_now: str | None, kv: KvRoom | None, limits: BatchLimits) -> QueueShape:
    """``decide``'s reading of the queue (``QueueShape``), built anew."""
    fcfs = fcfs_refilled(queue, limits, None, merged_now, kv)
    ranks: dict[str, int] = {}
    by_adapter: dict[str, list[QueuedRequest]] = {}
    lines: dict[str, int] = {}  # by adapter: its first recompute that cannot start behind others
    for r in queue:  # (a prompt that does not fit only first, none behind such a recompute: ``fcfs_batch``)
        if r.adapter is None:
            continue
        ranks[r.adapter] = r.rank
        group = by_adapter.setdefault(r.adapter, [])
        if len(group) == limits.max_num_seqs or not (r.keeps_place or not group):
            continue
        if r.fresh and r.arrival > lines.get(r.adapter, r.arrival):
            continue
        if group and not r.fits:
            lines.setdefault(r.adapter, r.arrival)
        group.append(r)
    return QueueShape(
        queue=tuple(queue),
        merged_now=merged_now,
        kv=kv,
        limits=limits,
        fcfs=fcfs,
        f_run=within_budget(fcfs, limits, None, merged_now, kv),
        ranks=ranks,
        by_adapter=by_adapter,
        queued_keys={key_of(r.adapter) for r in queue},
        running_keys={key_of(r.adapter) for r in fcfs if r.running},
    )
