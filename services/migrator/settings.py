"""The migrator's settings (``[migrator]`` in ``dlora.toml``); see ``dlora.common.settings``."""

from __future__ import annotations

from dlora.common.settings import Common, Problems, nested_problems
from dlora.services.migrator.trigger import TriggerBounds


class MigratorSettings(Common, kw_only=True, forbid_unknown_fields=True):
    # Names this migrator in the logs and the leader lease (with a token of its process: two
    # migrators of one id, as on one shared dlora.toml, still elect one leader).
    migrator_id: str = "migrator-0"
    # Seconds between looks at the cluster.
    interval_s: float = 1.0
    # Leader lease in Redis, seconds: the leader renews it every interval; a standby takes over
    # when it expires.
    lease_s: float = 3.0
    # Solver time bound, seconds.
    solve_time_s: float = 1.0
    # Move costs the planner weighs (seconds per token moved; per load for adapters). Recompute and
    # KV transfer: unset, what the workers measured (prefill speed; a shipped cache's export plus the
    # receiver's stall), with a prior until one has; a number fixes the cost (and so the choice).
    recompute_seconds_per_token: float | None = None
    kv_transfer_seconds_per_token: float | None = None
    adapter_load_seconds: float = 0.05
    # [migrator.trigger]: when the cluster is out of balance enough to plan.
    trigger: TriggerBounds = TriggerBounds()

    def check(self) -> Problems:
        bad = Common.check(self) + nested_problems("trigger", self.trigger.check())
        for field in ("interval_s", "lease_s", "solve_time_s"):
            if getattr(self, field) <= 0:
                bad.append((field, getattr(self, field), "must be > 0"))
        return bad
