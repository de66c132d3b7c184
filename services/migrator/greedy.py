"""The greedy pass of the co-migration planner: single requests from the most loaded worker, to one
needing no adapter read first (and a request needing none before one that reads, where it ends as
soon), while that shortens the longest completion, a read waited for (``_Pass``); where none does
and the most loaded is over its KV pressure, a swap of one of its requests for one of another
worker's (``_Pass.swap``). Its plan is sent where the ILP finds none, and is the ILP's starting
solution (``planner``'s docstring). Pure."""

from __future__ import annotations

import bisect
import time
from collections import Counter, defaultdict

from dlora.common.messages import MoveRequest
from dlora.common.versions import name_of
from dlora.services.migrator.bands import price_of
from dlora.services.migrator.costs import BASE, Standing, blocks_of, read_price, ship_kv
from dlora.services.migrator.snapshot import RequestState, Running, runs_among, takes


def greedy_moves(standing: Standing, deadline: float | None = None) -> list[MoveRequest]:
    """One request at a time from the most loaded worker of ``standing.snapshot`` to one with its adapter
    or a free slot, and KV room, while the longest completion shrinks by more than it costs (two at a
    time, a swap, off a worker over its KV pressure where one alone does not: ``_Pass.swap``); at
    ``deadline`` (``time.perf_counter``), the moves so far. A worker's completion counts the recompute
    of its KV demand over ``standing.kv_pressure`` of its blocks (``Standing.overflow``), as ``worth``
    and the ILP count it."""
    return _Pass(standing).run(deadline)


# Where a request is best moved: (seconds of the adapter read it makes there, the destination's
# completion after it, the destination, whether it waits for a read there).
Pick = tuple[float, float, str, bool]


class _Pass:
    """The greedy pass's state: each worker's completion time counted as ``Standing.waited`` counts a
    plan's (its reads waited for by the requests moved there for them, not by its own work), so the
    pass, ``worth`` and the gain check judge a read alike. Priced as work taken from the destination,
    a read to a busy worker was a move the pass never made, though the plan gained (left by the last
    session: both plans empty where one would have gone)."""

    def __init__(self, standing: Standing) -> None:
        self.snapshot, self.standing, self.workers = standing.snapshot, standing, standing.workers
        self.demand = dict(standing.demand)
        # each worker's preemptions' recompute at its demand (``Standing.overflow``): part of its own time
        self.over = {w: self.standing.overflow(w, self.demand[w]) for w in self.workers}
        self.held = {w: Running(keys, keys.by_version) for w, keys in standing.running.items()}  # (moves add to it)
        # A worker's completion is max(own + over, reading) + waiting (``Standing.waited``): its own
        # work (the requests moved there that wait for no read among it) and recompute, the reads
        # made there (one at a time, beside its steps) and the work of the requests moved there
        # that wait for them.
        self.own = dict(standing.load)
        self.reading = dict.fromkeys(self.workers, 0.0)
        self.waiting = dict.fromkeys(self.workers, 0.0)
        self.load = standing.pressed(standing.load, standing.demand)
        self.prices: dict[tuple[str, str], float] = {}  # (worker, adapter key) -> its read there (``read``)
        # request id -> (the worker it was moved to and waits for a read at, the key read there for it)
        self.waits_at: dict[str, tuple[str, str]] = {}
        # worker -> adapter key read there -> (its seconds, counted in ``reading`` while the requests
        # moved there waiting for it stay: the read is made where they stay; those requests)
        self.readers: dict[str, dict[str, tuple[float, set[str]]]] = defaultdict(dict)
        # worker -> the keys of the requests moved there (and there now), a count each: its slots'
        # keys are its own requests' and these (``held``)
        self.arrived: dict[str, Counter[str]] = defaultdict(Counter)
        self.priced: dict[str, float] = {}  # request id -> ``price``
        self.costs: dict[str | None, float] = {}  # adapter -> ``cheapest``
        self.read_bound: set[str] = set()  # the workers whose reads outlast their own work (``destination``)
        self.taking: dict[str, dict[str, bool]] = defaultdict(dict)  # worker -> key -> ``takes`` (its slots as now)
        self.on: dict[str, list[RequestState]] = defaultdict(list)
        # the same by adapter name ("" the base model): worker -> name -> its requests, cheapest first
        self.named: dict[str, dict[str, list[RequestState]]] = defaultdict(lambda: defaultdict(list))
        for r in sorted(self.snapshot.requests, key=self.price):
            self.on[r.worker].append(r)  # each worker's cheapest first, kept so (sorted for each move: 6 s)
            self.named[r.worker][name_of(r.key)].append(r)
        # adapter name -> the workers that run or hold some version of it (all of them: the base model)
        self.holders: dict[str, set[str]] = defaultdict(set, {BASE: set(self.workers)})
        for w, keys in standing.running.items():
            for key in keys:
                self.holders[name_of(key)].add(w)
        for w, ws in self.workers.items():
            for name in ws.adapters:
                self.holders[name].add(w)

    def price(self, r: RequestState) -> float:
        """``price_of`` at ``r``'s home, once a request: the pass keeps lists sorted by it."""
        if (price := self.priced.get(r.request_id)) is None:
            price = self.priced[r.request_id] = price_of(self.snapshot, self.workers[r.worker], r)
        return price

    def relieves(self, r: RequestState, src: str) -> bool:
        """Whether moving ``r`` off ``src`` takes more of its time (its work there, and the recompute
        its KV's share of the demand over pressure would cost) than the move costs: ``price_of`` under
        1, or less the recompute spared (``planner._settled`` leaves a pressed worker's requests free:
        the ILP moved them, the pass never did)."""
        blocks = blocks_of(r.context_tokens, self.workers[src].block_size)
        spared = self.over[src] - self.standing.overflow(src, self.demand[src] - blocks)
        return self.standing.moving(r) < self.standing.arrival(r, self.workers[src]) + spared

    def work(self, r: RequestState, w: str) -> float:
        """Seconds of ``w``'s time ``r`` takes there (``Standing.arrival``, charged): its remaining work,
        and its move's cost where it is moved to (not at its home: back there, it moved nowhere).
        Charged at each worker it passed through, a request moved twice left its move's cost at the
        first, which then looked busier than it was: left by the last session.

        Kept, though ``worth`` counts each move's cost once, in the total and not at the
        destination (``Standing.after``), because it steers the pass by ``worth``'s own test: a
        move's cost is the same wherever it goes, so it changes no choice between destinations,
        only the bound a move must pass, its destination ending (cost and all) before its source
        does now; that is, where the destination becomes the longest, the longest completion drops
        by more than the move costs. Uncharged, the pass would take moves that drop it by less (their
        worth below nothing). Left in the destination's load, it holds later arrivals there to the
        same margin: fewer moves, never a cost counted twice in the plan's judge."""
        return self.standing.arrival(r, self.workers[w], charged=True)

    def takes(self, w: str, key: str) -> bool:
        """``takes`` for ``w``'s slots as the pass has filled them, once a key until they change
        (most destinations looked at are full: 46,000 looks a pass at 128 x 1,024 x 10,000)."""
        known = self.taking[w]
        if (ok := known.get(key)) is None:
            ok = known[key] = takes(self.held[w], key, self.workers[w].slots)
        return ok

    def cheapest(self, adapter: str | None) -> float:
        """The fewest seconds per token any worker takes for ``adapter`` (``WorkerState.cost``)."""
        if (cost := self.costs.get(adapter)) is None:
            cost = self.costs[adapter] = min(w.cost(adapter) for w in self.workers.values())
        return cost

    def run(self, deadline: float | None) -> list[MoveRequest]:
        to: dict[str, str] = {}
        load = self.load
        for _ in range(len(self.snapshot.requests)):
            if deadline is not None and time.perf_counter() > deadline:
                break
            src = max(load, key=load.__getitem__)
            order = sorted(load, key=load.__getitem__)
            pick = None
            for i, r in enumerate(self.on[src]):  # noqa: B007 (the one picked: read after the loop)
                if self.price(r) >= 1 and not self.over[src]:  # (and every one after it) adds more than it relieves
                    break
                if self.price(r) >= 1 and not self.relieves(r, src):  # (pressed: its KV's recompute may)
                    continue
                # at each request looked at: one move may look at thousands none of which goes (the
                # pass ran 20-50 ms past its deadline under 6x oversubscription)
                if deadline is not None and time.perf_counter() > deadline:
                    break
                if pick := self.destination(r, src, order):
                    break
            if pick is None:
                # (a pressed worker as long as the others: a move off it ends past it, a swap may not)
                if not self.over[src] or not (swap := self.swap(src, order, deadline)):
                    break
                for r, home, there in swap:
                    self.move(r, self.on[home].index(r), home, (0.0, 0.0, there, False))
                    to[r.request_id] = there
                continue
            if pick[0] and (other := self.unread(src, r, pick[1])):  # (its destination reads an adapter)
                r, pick = other
                i = self.on[src].index(r)
            self.move(r, i, src, pick)
            to[r.request_id] = pick[2]
        # A request moved on again counts once, to where it ended (nowhere, if back home).
        ship = ship_kv(self.snapshot)
        return [
            MoveRequest(request_id=r.request_id, adapter=r.adapter, to_worker=to[r.request_id], ship_kv=ship)
            for r in self.snapshot.requests
            if to.get(r.request_id, r.worker) != r.worker
        ]

    def destination(self, r: RequestState, src: str, order: list[str], until: float | None = None) -> Pick | None:
        """Where ``r`` (on ``src``) is best moved, of ``order`` (the workers, least loaded first), as
        (read seconds, its destination's completion after, destination, whether it waits for a read
        there); None: nowhere ends before ``src`` does now. One needing no read first (as the ILP
        takes the plan reading less of those as good, ``ilp.READ_TIE``), then the one ending first:
        the least loaded read an adapter where one holding it ended as soon (a review; the commit's
        numbers). ``until``: only where it needs no read and its destination ends by then."""
        workers, load, a = self.workers, self.load, r.key
        # (the least work it brings anywhere: its move's cost but where it goes back home, uncharged)
        least = r.remaining_tokens * self.cheapest(r.adapter) + (self.standing.moving(r) if src == r.worker else 0.0)
        pick: Pick | None = None
        limit = load[src] if until is None else until
        k, skipped = 0, False
        while k < len(order):
            dst, k = order[k], k + 1
            bound = pick[1] if pick and not pick[0] else limit
            if load[dst] > bound:  # (in load order: none after it ends as soon; an arrival only adds)
                break
            if not skipped and load[dst] + least > bound:
                # A worker not held back by its reads (no more reading than own work) has load own +
                # waiting, so from here on each such one fails the work check below, the bound only
                # shrinking: only the others are looked at. Walked to the end, the workers about as
                # busy as ``src`` were two thirds of the workers looked at (at 128 x 1,024 x 10,000).
                reads = self.read_bound
                order, k, skipped = [w for w in order[k - 1 :] if w in reads] if reads else [], 0, True
                continue
            if dst == src:
                continue
            there = workers[dst]
            # The cheapest checks first, each only where the last passed: priced for every one
            # looked at, they took 0.7 s of the 1 s bound at 128 x 1,024 x 10,000 (the ILP none).
            work = self.work(r, dst)
            if self.own[dst] + self.over[dst] + self.waiting[dst] + work > bound:  # (the least it ends at)
                continue
            blocks = self.demand[dst] + blocks_of(r.context_tokens, there.block_size)
            if blocks > there.kv_blocks:
                continue
            if not (there.holds(r) and self.takes(dst, a)):
                continue
            # a read it makes is waited for (unpriced, a fallback plan moved 2 s of work where a read
            # took 3 s); priced until one passes (about once a move), then none is taken
            needs = bool(a) and not (runs_among(self.held[dst], a) or there.has(a))
            if needs and (pick or until is not None):
                continue
            read = self.read(dst, a) if needs else 0.0
            waits = needs or bool(a) and not (runs_among(self.standing.running[dst], a) or there.has(a))
            end = self.done(dst, work, read, waits, self.standing.overflow(dst, blocks))
            if end > bound:
                continue
            if end < load[src] and end <= limit and (pick is None or (read, end) < pick[:2]):
                if read and not pick:
                    # Only one needing no read goes before it now: one running or holding its adapter
                    # (``holders``, a few workers). All of them looked at, a read picked walked the
                    # 128 workers to the busiest, half of the pass at 128 x 1,024 x 10,000.
                    holders = self.holders[name_of(a)]
                    order, k = [w for w in order[k:] if w in holders], 0
                pick = (read, end, dst, waits)
        return pick

    def swap(self, src: str, order: list[str], deadline: float | None) -> list[tuple[RequestState, str, str]] | None:
        """Where no single move off ``src`` (over its KV pressure, ``over``) ends before it does now:
        the best such move that spares some of its recompute (``relieves``), though its destination
        then ends past it, and the request of that destination's which, moved back to ``src``, leaves
        both ending soonest, and before ``src`` does now; as (request, from, to) twice. Both need no
        adapter read made or waited for (``plain``). None: no such pair. Without it, workers ending
        alike but for one's recompute (a long context out, a short one back relieves it) were
        relieved only where CBC had the time (left by the last session)."""
        size = self.workers[src].block_size
        best: tuple[float, RequestState, str] | None = None  # (its destination's completion after, r, there)
        for r in self.on[src]:
            if deadline is not None and time.perf_counter() > deadline:
                return None
            blocks = blocks_of(r.context_tokens, size)
            # (any blocks spare some recompute: ``src`` is over its pressure, or it would not swap)
            if r.request_id in self.waits_at or not blocks or not self.relieves(r, src):
                continue
            for dst in order:  # (least loaded first: none after it ends sooner, an arrival only adds)
                if best and self.load[dst] >= best[0]:
                    break
                if dst == src or not self.plain(r, dst):
                    continue
                there = self.workers[dst]
                over = self.standing.overflow(dst, self.demand[dst] + blocks_of(r.context_tokens, there.block_size))
                end = self.done(dst, self.work(r, dst), 0.0, False, over)
                if best is None or end < best[0]:
                    best = (end, r, dst)
        if best is None:
            return None
        _, r, dst = best
        # The longest completion must drop by more than both moves cost (``worth``'s test, their costs
        # not charged where they arrive as well): held to the pass's charged loads alone, swaps changed
        # 12 of 800 seeded clusters' plans and left 4 worth less than where the pass stopped without
        # (one below nothing); so, 6, 5 of them worth more (the sixth 0.007 s less).
        rest = next((self.load[w] for w in reversed(order) if w not in (src, dst)), 0.0)
        limit, pair = self.load[src] - self.standing.moving(r), None
        for r2 in self.on[dst]:
            if r2.request_id in self.waits_at or not self.plain(r2, src):
                continue
            ends = [rest]
            for w, gone, came in ((src, r, r2), (dst, r2, r)):
                there = self.workers[w]
                blocks = self.demand[w] - blocks_of(gone.context_tokens, there.block_size)
                blocks += blocks_of(came.context_tokens, there.block_size)
                if blocks > there.kv_blocks:
                    break
                own = self.own[w] - self.work(gone, w) + self.standing.arrival(came, there)
                ends.append(max(own + self.standing.overflow(w, blocks), self.reading[w]) + self.waiting[w])
            if len(ends) == 3 and max(ends) + self.standing.moving(r2) < limit:
                limit, pair = max(ends) + self.standing.moving(r2), r2
        return None if pair is None else [(r, src, dst), (pair, dst, src)]

    def plain(self, r: RequestState, w: str) -> bool:
        """Whether ``r`` may move to ``w`` with no adapter read made there or waited for: ``w`` runs
        its adapter version among its own requests or holds it (or it runs the base model)."""
        there, a = self.workers[w], r.key
        plain = not a or runs_among(self.standing.running[w], a) or there.has(a)
        return plain and there.holds(r) and self.takes(w, a)

    def unread(self, src: str, r: RequestState, until: float) -> tuple[RequestState, Pick] | None:
        """Of ``src``'s requests but ``r`` (whose best move reads an adapter and ends ``until``), the
        cheapest that moves to a worker running or holding its adapter without a read and ends by
        then too, and where (``destination``); None: none does. Taken whatever it ends, one that
        needs no read saved 7% less at 128 x 1,024 x 10,000 (most moves there read): it goes to a
        busier worker, or is a dearer request to move. Each adapter name's cheapest request is looked
        at, at the workers holding that name (``holders``): one look per name and holder, where looking
        past the first request for one that needs no read cost 0.5-1.3 s at 10,000 requests (left by
        the last session). Without it, the pass read an adapter for one request where another of
        the same worker could go there without one (seed 167 of the last session's fuzz)."""
        best: tuple[RequestState, Pick] | None = None
        for name, rs in self.named[src].items():
            other = next((x for x in rs if x is not r), None)
            if other is None or self.price(other) >= 1 or (best and self.price(other) >= self.price(best[0])):
                continue
            # ties by name, as ``order`` has them (``plan`` sorts the workers): in a set's order, a
            # plan depended on the process's string hashes (``PYTHONHASHSEED``)
            there = sorted((w for w in self.holders[name] if w != src), key=lambda w: (self.load[w], w))
            if pick := self.destination(other, src, there, until):
                best = (other, pick)
        return best

    def read(self, w: str, key: str) -> float:
        """Seconds ``w`` takes to read ``key`` (``read_price``), priced once each: a move picked with a
        read and passed over for one without (``unread``) is priced again at the next move."""
        if (w, key) not in self.prices:
            self.prices[w, key] = read_price(self.snapshot, self.workers[w], key)
        return self.prices[w, key]

    def leave_read(self, w: str, key: str, request_id: str) -> None:
        """``request_id`` no longer waits at ``w`` for its read of ``key``: the last to leave takes the
        read with it. Counted at each worker a request passed through, a read it made there and
        moved on from still held that worker's completion back, and the pass sent the next request
        of another adapter elsewhere, to read it there (``test_planner_reads``)."""
        read, waiting = self.readers[w][key]
        waiting.discard(request_id)
        if not waiting:
            del self.readers[w][key]
            self.reading[w] = self.reading[w] - read if self.readers[w] else 0.0  # (none left: no rounding)

    def done(self, w: str, work: float, read: float, waits: bool, over: float) -> float:
        """``w``'s completion once a request of ``work`` seconds arrives (``read``: the seconds of the
        read it makes there; ``waits``: whether it waits for a read there; ``over``: its preemptions'
        recompute then, ``Standing.overflow``)."""
        if waits:
            return max(self.own[w] + over, self.reading[w] + read) + self.waiting[w] + work
        return max(self.own[w] + work + over, self.reading[w]) + self.waiting[w]

    def move(self, r: RequestState, i: int, src: str, pick: Pick) -> None:
        """Move ``r``, ``self.on[src][i]``, where ``pick`` (``destination``) says."""
        read, _, dst, waits = pick
        home, there = self.workers[src], self.workers[dst]
        left = self.work(r, src)
        if at := self.waits_at.pop(r.request_id, None):  # (moved here for a read, and on again)
            self.waiting[src] -= left
            self.leave_read(src, at[1], r.request_id)
        else:
            self.own[src] -= left
        if r.adapter and src != r.worker:
            self.arrived[src][r.key] -= 1
            if not self.arrived[src][r.key]:  # its slot is free again (the read above not made)
                del self.arrived[src][r.key]
                self.held[src] = Running([*self.standing.running[src], *self.arrived[src]], self.held[src].by_version)
                self.taking[src].clear()
        work = self.work(r, dst)
        if waits:
            self.waiting[dst] += work
            reads = self.readers[dst]
            # the read it waits for: its own, or one of its adapter made for a request before it
            key = r.key if read or r.key in reads else next((k for k in reads if name_of(k) == name_of(r.key)), r.key)
            if key not in reads:
                self.reading[dst] += read
                reads[key] = (read, set())
            reads[key][1].add(r.request_id)
            self.waits_at[r.request_id] = (dst, key)
        else:
            self.own[dst] += work
        if r.adapter and dst != r.worker:
            self.arrived[dst][r.key] += 1
        self.demand[src] -= blocks_of(r.context_tokens, home.block_size)
        self.demand[dst] += blocks_of(r.context_tokens, there.block_size)
        for w in (src, dst):
            self.over[w] = self.standing.overflow(w, self.demand[w])
            self.load[w] = max(self.own[w] + self.over[w], self.reading[w]) + self.waiting[w]
            if self.reading[w] > self.own[w] + self.over[w]:
                self.read_bound.add(w)
            else:
                self.read_bound.discard(w)
        del self.on[src][i]
        bisect.insort(self.on[dst], r, key=self.price)
        name = name_of(r.key)
        self.named[src][name].remove(r)
        bisect.insort(self.named[dst][name], r, key=self.price)
        self.holders[name].add(dst)
        if r.adapter:  # (the source keeps counting it, as the ILP does: its plan is the ILP's start)
            self.held[dst].add(r.key)
            self.taking[dst].clear()
