"""The greedy pass of the co-migration planner: single requests from the most loaded worker, to one
needing no adapter read first, while that shortens the longest completion. Its plan is sent where
the ILP finds none, and is the ILP's starting solution (``planner``'s docstring). Pure."""

from __future__ import annotations

import bisect
import time
from collections import defaultdict

from dlora.common.messages import MoveRequest
from dlora.services.migrator.bands import price_of
from dlora.services.migrator.costs import Standing, blocks_of, move_cost, read_price, ship_kv
from dlora.services.migrator.snapshot import ClusterSnapshot, RequestState, Running, runs_among, takes


def greedy_moves(
    snapshot: ClusterSnapshot,
    deadline: float | None = None,
    standing: Standing | None = None,
) -> list[MoveRequest]:
    """One request at a time from the most loaded worker to one with its adapter or a free slot, and KV room,
    while the longest completion shrinks by more than it costs; at ``deadline``, the moves so far."""
    standing = standing or Standing(snapshot)  # (the caller's sums: not walked again in the time bound)
    workers, load, demand = standing.workers, dict(standing.load), dict(standing.demand)
    held = {w: Running(keys, keys.by_version) for w, keys in standing.running.items()}  # (moves add to it)

    def price(r: RequestState) -> float:
        return price_of(snapshot, workers[r.worker], r)

    on: dict[str, list[RequestState]] = defaultdict(list)
    for r in sorted(snapshot.requests, key=price):
        on[r.worker].append(r)  # each worker's cheapest first, kept so (sorted for each move: 6 s)
    to: dict[str, str] = {}
    for _ in range(len(snapshot.requests)):
        if deadline is not None and time.perf_counter() > deadline:
            break
        src = max(load, key=lambda w: load[w])
        order = sorted(load, key=lambda w: load[w])
        pick: tuple[float, float, str] | None = None  # (read, end, destination)
        for i, r in enumerate(on[src]):  # noqa: B007 (the one picked: read after the loop)
            if price(r) >= 1:  # (and every one after it) adds more than it relieves
                break
            a, moving = r.key, move_cost(snapshot, r)
            # One needing no read first (as the ILP prices one), then the one ending first: the least
            # loaded read an adapter where one holding it ended as soon (a review; the commit's numbers).
            pick = None
            for dst in order:
                bound = pick[1] if pick and not pick[0] else load[src]
                if load[dst] > bound:  # (in load order: none after it ends as soon)
                    break
                if dst == src:
                    continue
                # The cheapest checks first, each only where the last passed: priced for every one
                # looked at, they took 0.7 s of the 1 s bound at 128 x 1,024 x 10,000 (the ILP none).
                arrives = load[dst] + r.remaining_tokens * workers[dst].cost(r.adapter) + moving
                if arrives > bound:  # (a read only adds to it)
                    continue
                if demand[dst] + blocks_of(r.context_tokens, workers[dst].block_size) > workers[dst].kv_blocks:
                    continue
                if not (workers[dst].holds(r) and takes(held[dst], a, workers[dst].slots)):
                    continue
                # a read it makes is waited for (unpriced, a fallback plan moved 2 s of work where a
                # read took 3 s); priced until one passes (about once a move), then none is taken
                needs = a and not (runs_among(held[dst], a) or workers[dst].has(a))
                if needs and pick:
                    continue
                read = read_price(snapshot, workers[dst], a) if needs else 0.0
                if arrives + read < load[src] and (pick is None or (read, arrives + read) < pick[:2]):
                    pick = (read, arrives + read, dst)
            if pick:
                break
        if pick is None:
            break
        read, _, dst = pick
        load[src] -= r.remaining_tokens * workers[src].cost(r.adapter)
        load[dst] += r.remaining_tokens * workers[dst].cost(r.adapter) + move_cost(snapshot, r) + read
        demand[src] -= blocks_of(r.context_tokens, workers[src].block_size)
        demand[dst] += blocks_of(r.context_tokens, workers[dst].block_size)
        del on[src][i]
        bisect.insort(on[dst], r, key=price)
        if r.adapter:  # (the source keeps counting it, as the ILP does: its plan is the ILP's start)
            held[dst].add(r.key)
        to[r.request_id] = dst
    # A request moved on again counts once, to where it ended (nowhere, if back home).
    return [
        MoveRequest(request_id=r.request_id, adapter=r.adapter, to_worker=to[r.request_id], ship_kv=ship_kv(snapshot))
        for r in snapshot.requests
        if to.get(r.request_id, r.worker) != r.worker
    ]
