"""The dispatcher's settings (``[dispatcher]`` in ``dlora.toml``); see ``dlora.common.settings``."""

from __future__ import annotations

from dlora.common.settings import Common, Problems, nested_problems
from dlora.common.state import INFLIGHT_TTL_S
from dlora.services.dispatcher.choose import DispatchCosts, DispatchMode


class DispatcherSettings(Common, kw_only=True, forbid_unknown_fields=True):
    # Seconds between recomputing the adapter placement from decayed traffic shares.
    placement_interval_s: float = 5.0
    # proactive (dLoRA: soonest estimated finish, placement-aware) or round-robin (the baseline).
    dispatch: DispatchMode = DispatchMode.PROACTIVE
    # Seconds a request whose worker was lost waits for a live worker when there is none (a
    # one-GPU host whose worker restarts), before it is failed; 0: failed at once. One whose client
    # gives up first (the gateway's chunk_timeout_s, 60 s by default) is aborted and dropped.
    orphan_wait_s: float = 60.0
    # [dispatcher.costs]: what proactive dispatch prices a worker with.
    costs: DispatchCosts = DispatchCosts()

    def check(self) -> Problems:
        bad = Common.check(self) + nested_problems("costs", self.costs.check())
        if self.placement_interval_s <= 0:
            bad.append(("placement_interval_s", self.placement_interval_s, "must be > 0"))
        if not 0 <= self.orphan_wait_s <= INFLIGHT_TTL_S:  # a record lives no longer without its worker
            bad.append(("orphan_wait_s", self.orphan_wait_s, f"must be in [0, {INFLIGHT_TTL_S:g}]"))
        return bad
