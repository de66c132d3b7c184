"""Which requests a plan names, of those the ILP counts moving by their group's mean. Pure."""

from __future__ import annotations

from collections import defaultdict

from dlora.common.messages import MoveRequest
from dlora.services.migrator.costs import Standing, blocks_of
from dlora.services.migrator.snapshot import ClusterSnapshot, RequestState


def within(
    requests: list[RequestState], count: int, blocks: int, block_size: int, room: dict[str, int], worker: str
) -> tuple[list[RequestState], list[RequestState]]:
    """Up to ``count`` of ``requests`` (in the order they are best moved) to ``worker``, whose
    contexts fill at most ``blocks`` of ``block_size`` tokens or its free ``room`` (less what arrives
    there: taken from it), and the rest. The ILP counts a group's requests at their mean blocks, and
    the first ``count`` could hold more: a long context with a long answer to go is the cheapest to
    move per second of work, and a plan sent it to a worker half its size (a helper's probe). One
    that does not fit is passed over for a later, shorter one."""
    named: list[RequestState] = []
    rest: list[RequestState] = []
    blocks = max(blocks, room[worker])
    for i, r in enumerate(requests):
        if len(named) == count:  # (the rest untouched: a group of thousands, after CBC returned)
            return named, rest + requests[i:]
        need = blocks_of(r.context_tokens, block_size)
        if need <= blocks:
            named.append(r)
            blocks -= need
            room[worker] -= need
        else:
            rest.append(r)
    return named, rest


def fitting(snapshot: ClusterSnapshot, moves: list[MoveRequest], standing: Standing) -> list[MoveRequest]:
    """``moves`` less those that would leave a destination's requests over its KV blocks and over
    what they were (a worker over its blocks may stay there, not grow), the largest dropped first.
    The ILP counts those leaving a group at its mean too, and the ones named are its cheapest to
    move (short contexts, mostly): a worker whose few long contexts filled it freed less than
    counted, and what arrived overfilled it (a seeded fuzz of small clusters). ``standing``: the
    snapshot's figures (``Standing``), so only the moves are looked at."""
    size = {w.worker: w.block_size for w in snapshot.workers}
    bound = {w.worker: w.kv_blocks for w in snapshot.workers}
    by_id = standing.by_id

    def blocks(r: RequestState, worker: str) -> int:
        return blocks_of(r.context_tokens, size[worker])

    after = dict(standing.demand)  # (what a worker counts but does not list stays: moves on their way)
    for w, demand in after.items():
        bound[w] = max(bound[w], demand)
    arriving: dict[str, list[int]] = defaultdict(list)
    for i, m in enumerate(moves):
        r = by_id[m.request_id]
        after[r.worker] -= blocks(r, r.worker)
        after[m.to_worker] += blocks(r, m.to_worker)
        arriving[m.to_worker].append(i)
    # Each destination's arrivals sorted once, largest first, and dropped from the front: a move is
    # dropped only at its destination, so what a later look there drops is what follows (sorted
    # again at each look, a full destination sending hundreds home sorted their homes' arrivals
    # that many times: quadratic in the moves).
    for w in list(arriving):
        arriving[w] = sorted(arriving[w], key=lambda i: -blocks(by_id[moves[i].request_id], w))
    dropped: set[int] = set()
    taken = dict.fromkeys(arriving, 0)
    over = list(arriving)
    while over:
        w = over.pop()
        while after[w] > bound[w] and taken.get(w, 0) < len(arriving[w]):
            i = arriving[w][taken[w]]  # it stays home, which it may fill again: looked at anew
            taken[w] += 1
            r = by_id[moves[i].request_id]
            dropped.add(i)
            after[w] -= blocks(r, w)
            after[r.worker] += blocks(r, r.worker)
            over.append(r.worker)
    return [m for i, m in enumerate(moves) if i not in dropped]
