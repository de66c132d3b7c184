"""The ILP's start (a MIP start): every variable's value in a plan the greedy pass made, so CBC
begins from an incumbent and improves on it within its bound (``planner``'s docstring)."""

from __future__ import annotations

from collections import Counter

import pulp

from dlora.services.migrator.bands import Group
from dlora.services.migrator.costs import Standing


def start_from(
    moved: Counter[tuple[int, str]],
    groups: list[Group],
    dests: list[list[str]],
    n: dict[tuple[int, str], pulp.LpVariable],
    y: dict[tuple[str, str], int | pulp.LpVariable],
    T: pulp.LpVariable,
    overs: dict[str, pulp.LpVariable],
    work_of: dict[str, list[tuple[pulp.LpVariable, float]]],
    kv_of: dict[str, list[tuple[pulp.LpVariable, int]]],
    standing: Standing,
    reads_of: dict[str, list[tuple[pulp.LpVariable, float]]],
) -> None:
    """Every variable's value in the plan ``moved`` ((group, destination) -> requests), as the
    solver's start: the KV overflow and T (each worker's work and its overflow's recompute,
    ``Standing.overflow``) by the model's own coefficients. The greedy plan keeps
    the model's slot rule, but it checks KV room request by request where the model counts a
    group's mean blocks, so near a full destination the start can break a KV bound: CBC then
    drops it and searches alone (and the greedy plan stands if it finds nothing)."""
    for i, g in enumerate(groups):
        away = sum(moved[i, w] for w in dests[i][1:])
        for w in dests[i]:
            n[i, w].setInitialValue(g.size - away if w == g.worker else moved[i, w])
    arriving = {(groups[i].adapter, w) for (i, w), k in moved.items() if k}
    for (a, w), v in y.items():
        if not isinstance(v, int):
            v.setInitialValue(int((a, w) in arriving))
    work: list[float] = []
    for ws in standing.snapshot.workers:
        w = ws.worker
        used = sum(c * (v.varValue or 0) for v, c in kv_of[w]) + ws.unlisted_blocks
        overs[w].setInitialValue(max(0.0, used - standing.kv_pressure * ws.kv_blocks))
        own = sum(c * (v.varValue or 0) for v, c in work_of[w]) + ws.unlisted_seconds()
        work.append(own + standing.overflow(w, used))
    work += [sum(c * (v.varValue or 0) for v, c in row) for row in reads_of.values()]
    T.setInitialValue(max(work, default=0.0))
