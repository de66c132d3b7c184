"""The device slots the adapter keys a plan brings to a worker take, in the planner's ILP."""

from __future__ import annotations

from collections import defaultdict

import pulp

from dlora.common.versions import name_of


def bound_slots(
    prob: pulp.LpProblem, new: list[tuple[str, pulp.LpVariable]], worker: int, start: set[str], free: int
) -> None:
    """Bound by ``free`` the slots the keys ``new`` (key, whether it comes: binary) bring to worker
    number ``worker`` take: a name alone (an older worker's requests, some version) shares the slot
    of a version of it arriving beside, as ``runs_among`` joins it to one running there. Given a
    slot each, both could not go to a worker with one free, where the greedy pass sent them (left
    by the last session). ``start``: the keys the solver's start brings there (its values)."""
    versions: dict[str, list[tuple[str, pulp.LpVariable]]] = defaultdict(list)
    for a, v in new:
        if "@" in a:
            versions[name_of(a)].append((a, v))
    out: list[pulp.LpVariable] = []
    for k, (a, v) in enumerate(new):
        if a not in versions:  # (a version, or a name alone with none of its versions coming)
            out.append(v)
            continue
        alone = prob.add_variable(f"alone_{worker}_{k}", lowBound=0, upBound=1)
        prob += pulp.LpAffineExpression([(v, 1), *((u, -1) for _, u in versions[a]), (alone, -1)]) <= 0
        alone.setInitialValue(int(a in start and not any(u in start for u, _ in versions[a])))
        out.append(alone)
    prob += pulp.LpAffineExpression((v, 1) for v in out) <= max(0, free)
