"""The device slots the adapter keys a plan brings to a worker take, in the planner's ILP."""

from __future__ import annotations

from collections import defaultdict

import pulp

from dlora.common.versions import name_of
from dlora.services.migrator.snapshot import Running, runs_among


def joins(running: Running, key: str) -> bool:
    """Whether requests of version ``key`` run on a worker running ``running`` by joining the slot
    of its name alone there (an older worker's requests, some version): one version may, and a
    second then takes a slot of its own (``Running.slots``), so the ILP gives these a variable each
    (``bound_slots``) where it took each as running there and sent two to one slot (a seeded fuzz)."""
    return "@" in key and key not in running and runs_among(running, key)


def bound_slots(
    prob: pulp.LpProblem,
    new: list[tuple[str, pulp.LpVariable]],
    worker: int,
    start: set[str],
    free: int,
    joining: set[str] | frozenset[str] = frozenset(),
) -> None:
    """Bound by ``free`` the slots the keys ``new`` (key, whether it comes: binary) bring to worker
    number ``worker`` take: a name alone (an older worker's requests, some version) shares the slot
    of a version of it arriving beside, as ``runs_among`` joins it to one running there. Given a
    slot each, both could not go to a worker with one free, where the greedy pass sent them (left
    by the last session). ``start``: the keys the solver's start brings there (its values).
    ``joining``: those of ``new`` that join a name alone running there (``joins``): all but one of
    them take a slot."""
    versions: dict[str, list[tuple[str, pulp.LpVariable]]] = defaultdict(list)
    beside: dict[str, list[tuple[str, pulp.LpVariable]]] = defaultdict(list)
    for a, v in new:
        if a in joining:
            beside[name_of(a)].append((a, v))
        elif "@" in a:
            versions[name_of(a)].append((a, v))
    out: list[pulp.LpVariable] = []
    for j, vs in enumerate(beside.values()):
        if len(vs) > 1:
            more = prob.add_variable(f"beside_{worker}_{j}", lowBound=0)
            prob += pulp.LpAffineExpression([*((v, 1) for _, v in vs), (more, -1)]) <= 1
            more.setInitialValue(max(0, sum(a in start for a, _ in vs) - 1))
            out.append(more)
    for k, (a, v) in enumerate(new):
        if a in joining:
            continue
        if a not in versions:  # (a version, or a name alone with none of its versions coming)
            out.append(v)
            continue
        alone = prob.add_variable(f"alone_{worker}_{k}", lowBound=0, upBound=1)
        prob += pulp.LpAffineExpression([(v, 1), *((u, -1) for _, u in versions[a]), (alone, -1)]) <= 0
        alone.setInitialValue(int(a in start and not any(u in start for u, _ in versions[a])))
        out.append(alone)
    prob += pulp.LpAffineExpression((v, 1) for v in out) <= max(0, free)
