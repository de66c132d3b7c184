"""How much rebalancing could gain on a set of workers: the cluster benchmark's workload simulated
under round-robin and under even, free rebalancing at every step, from measured step times. Pure.

Each worker steps its whole batch at a time, a step taking ``step_seconds(tokens fed)``: one per
running request, its whole prompt for a request's first step (the bench measures decode batches
of 1 to 64 and prices prompt tokens along the same curve). Every request in the step makes one
token. Round-robin: request i stays on worker i mod W. Balanced: requests belong to no worker; a
worker starting a step takes the oldest requests no other worker is stepping, up to its even share
of all those in flight, so the cluster is evened out at every step boundary at no cost: what a
planner that knew every length and moved requests for free would do, even-share and oldest-first
(a reference, not a proof: it ignores KV limits, adapters and other orders). A request's prompt is
fed where it first steps, never again (a real move would recompute or ship it).
"""

from __future__ import annotations

import math
from bisect import bisect_right
from collections.abc import Callable
from dataclasses import dataclass, field

from dlora.loadgen.workload import RequestSpec


def interpolate(points: dict[int, float]) -> Callable[[int], float]:
    """Step seconds at any batch size from measurements at some: linear between them, the last
    slope beyond."""
    xs = sorted(points)
    if len(xs) < 2:
        raise ValueError("need step times at two batch sizes at least")

    def f(b: int) -> float:
        i = min(max(bisect_right(xs, b) - 1, 0), len(xs) - 2)
        x0, x1 = xs[i], xs[i + 1]
        return points[x0] + (points[x1] - points[x0]) * (b - x0) / (x1 - x0)

    return f


@dataclass
class _Worker:
    busy_until: float = math.inf  # inf: idle
    batch: list[int] = field(default_factory=list)
    own: list[int] = field(default_factory=list)  # round-robin: its requests, oldest first


def simulate(
    specs: list[RequestSpec],
    step_seconds: Callable[[int], float],
    workers: int,
    balanced: bool,
    max_batch: int = 64,
    prompt_seconds: Callable[[list[int]], float] | None = None,
) -> list[float]:
    """Normalized latency (seconds from arrival to last token, per output token) of every request.
    ``prompt_seconds``: where given, a step costs ``step_seconds(its requests)`` plus that of the
    prompts it feeds, by their lengths (a profile that prices prompt tokens and sequences apart,
    as the simulator's do); else ``step_seconds(tokens fed)``."""
    if any(s.output_len < 1 for s in specs):
        raise ValueError("every request must generate at least one token")
    order = sorted(range(len(specs)), key=lambda i: specs[i].arrival_s)
    left = [s.output_len for s in specs]
    latency: list[float] = [0.0] * len(specs)
    ws = [_Worker() for _ in range(workers)]
    in_flight: list[int] = []  # arrived and unfinished, oldest first
    stepping: set[int] = set()
    started: set[int] = set()  # prompt fed
    nxt, t, done = 0, 0.0, 0

    def start(w: _Worker) -> None:
        if balanced:
            share = min(max_batch, math.ceil(len(in_flight) / workers))
            w.batch = [i for i in in_flight if i not in stepping][:share]
        else:
            w.batch = w.own[:max_batch]
        if w.batch:
            stepping.update(w.batch)
            prompts = [specs[i].prompt_len for i in w.batch if i not in started]
            started.update(w.batch)
            if prompt_seconds is None:  # a prompt's tokens along the step curve, one token for each other
                seconds = step_seconds(sum(prompts) + len(w.batch) - len(prompts))
            else:
                seconds = step_seconds(len(w.batch)) + prompt_seconds(prompts)
            w.busy_until = t + seconds

    while done < len(specs):
        ends = min(w.busy_until for w in ws)
        arrival = specs[order[nxt]].arrival_s if nxt < len(order) else math.inf
        if arrival <= ends:
            t, i = arrival, order[nxt]
            in_flight.append(i)
            if not balanced:
                ws[nxt % workers].own.append(i)
            nxt += 1
            if nxt < len(order) and specs[order[nxt]].arrival_s <= t:
                continue  # take every arrival of this instant before a step starts
        else:
            t = ends
            for w in (w for w in ws if w.busy_until == ends):  # all that end now, before any starts
                for i in w.batch:
                    stepping.discard(i)
                    left[i] -= 1
                    if left[i] == 0:
                        latency[i] = (t - specs[i].arrival_s) / specs[i].output_len
                        in_flight.remove(i)
                        if not balanced:
                            w.own.remove(i)
                        done += 1
                w.batch, w.busy_until = [], math.inf
        for w in ws:
            if w.busy_until == math.inf:
                start(w)
    return latency
