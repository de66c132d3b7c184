"""The migrator's metrics from its solves (pure: no bus, no HTTP)."""

from prometheus_client import generate_latest

from dlora.common.messages import MovePlan, MoveRequest, PlanMethod, PlanTrigger
from dlora.services.migrator.metrics import MigratorMetrics


def _samples(m: MigratorMetrics) -> str:
    return generate_latest(m.registry).decode()


def test_solves_moves_and_a_lost_lease() -> None:
    m = MigratorMetrics()
    m.leads(True)
    moves = [MoveRequest(request_id="a", adapter=None, to_worker="w1", ship_kv=True)]
    moves.append(MoveRequest(request_id="b", adapter="x", to_worker="w1"))
    plan = MovePlan(
        plan_id="p",
        moves=moves,
        method=PlanMethod.ILP,
        trigger=PlanTrigger.QUEUE_DELAY,
        solve_seconds=0.2,
        makespan_before_s=9.0,
        makespan_after_s=5.0,
    )
    m.planned(plan, published=True)
    m.planned(plan, published=False)  # the lease went during the solve: counted, nothing moved
    text = _samples(m)
    assert 'dlora_migration_plans_total{method="ilp",trigger="queue-delay"} 2.0' in text
    assert 'dlora_migration_moves_total{method="kv",trigger="queue-delay"} 1.0' in text
    assert 'dlora_migration_moves_total{method="recompute",trigger="queue-delay"} 1.0' in text
    assert "dlora_migration_plan_solve_seconds_count 2.0" in text
    assert 'dlora_migration_makespan_seconds{when="after"} 5.0' in text and "dlora_migrator_leader 1.0" in text
    m.leads(False)  # another migrator plans now: its makespan is the one to read
    text = _samples(m)
    assert "dlora_migration_makespan_seconds{" not in text and "dlora_migrator_leader 0.0" in text


def test_every_trigger_s_plans_and_moves_are_served_from_zero() -> None:
    text = _samples(MigratorMetrics())
    for trigger in PlanTrigger:
        for method in PlanMethod:
            assert f'dlora_migration_plans_total{{method="{method.value}",trigger="{trigger.value}"}} 0.0' in text
        for moved in ("kv", "recompute"):
            assert f'dlora_migration_moves_total{{method="{moved}",trigger="{trigger.value}"}} 0.0' in text
