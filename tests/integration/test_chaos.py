"""`make chaos`, short: the stack as separate processes (nats-server, redis-server, dispatcher,
migrator, 2 workers, gateway) under streaming load through the gateway while a worker is restarted
under its own id within the heartbeat TTL, and then SIGSTOPped past the heartbeat and resumed.
Every request completes, the probes equal the offline oracle, nothing is generated twice, and the
cluster comes back to rest (loadgen/chaos). A worker SIGKILLed and recovered after the TTL is
test_recovery's (left out here for the suite's time); `make chaos` runs every fault."""

from __future__ import annotations

import json
from pathlib import Path

from dlora.loadgen.chaos.phases import Timing
from dlora.loadgen.chaos.report import failure_lines, table
from dlora.loadgen.chaos.run import ChaosConfig, run_chaos
from dlora.loadgen.chaos.traffic import LoadShape
from dlora.model.make_tiny import TinyOutput

FAULTS = ["worker-0-fast-restart", "worker-0-sigstop"]


async def test_workers_restarted_and_stalled_under_load_lose_nothing(tiny_llama: TinyOutput, tmp_path: Path) -> None:
    adapters = {name: Path(path) for name, path in sorted(tiny_llama.adapters.items())[:2]}
    cfg = ChaosConfig(
        workdir=tmp_path,
        model=Path(tiny_llama.model),
        adapters=adapters,
        faults=FAULTS,
        # (not the default 5 s: the stall lasts the TTL and until its requests finished elsewhere,
        # up to 3 s more. A fast restart's standby waits min(TTL/2, 2 s) before it connects, and
        # must beat before the dispatcher's TTL runs out:
        # at 4 s that leaves it ~2 s, where one loaded run took 1.6 s with the wait; 3 s left 1.5 s)
        heartbeat_ttl_s=4.0,
        shape=LoadShape(rate=1.0, output_tokens=(8, 32)),
        timing=Timing(lead_s=2.0, tail_s=2.0, probes=2, drain_s=90.0, settle_s=30.0, recovery_timeout_s=40.0),
        probe_tokens=48,
    )
    result = await run_chaos(cfg, "test", say=lambda _: None)
    phases = {p["fault"]: p for p in result["phases"]}
    assert list(phases) == FAULTS
    explain = "\n".join(table(result["phases"]) + failure_lines(result["phases"]))
    for p in phases.values():
        assert p["sent"] > 0 and p["completed"] == p["sent"], explain
        assert p["probes"]["exact"] == p["probes"]["sent"] == 2, explain
        assert p["generated_twice"]["requests"] == 0, json.dumps(p["generated_twice"], indent=1)
        assert p["steady_after"]["ok"] and p["recovery_s"] is not None, explain
        # the fault hit work in progress on its victim
        assert any(e.get("in_flight", 0) > 0 for e in p["events"]), p["events"]
    fast = phases["worker-0-fast-restart"]
    assert fast["facts"]["faster_than_heartbeat"], fast["events"]
    # the dispatcher never saw it go: the new incarnation handed its predecessor's requests back
    assert "warning: worker handed back requests" in fast["service_log_notes"]["dispatcher"]
    assert "warning: worker lost" not in fast["service_log_notes"]["dispatcher"]
    assert phases["worker-0-sigstop"]["resumed"] > 0  # given up on while stalled, and continued elsewhere
    assert result["passed"] and result["steady_at_end"]["ok"], explain
