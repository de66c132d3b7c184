"""The dispatcher's settings (``[dispatcher]`` in ``dlora.toml``); see ``dlora.common.settings``."""

from __future__ import annotations

from dlora.common.settings import Common, Problems, nested_problems
from dlora.services.dispatcher.choose import DispatchCosts, DispatchMode


class DispatcherSettings(Common, kw_only=True, forbid_unknown_fields=True):
    # Seconds between recomputing the adapter placement from decayed traffic shares.
    placement_interval_s: float = 5.0
    # proactive (dLoRA: soonest estimated finish, placement-aware) or round-robin (the baseline).
    dispatch: DispatchMode = DispatchMode.PROACTIVE
    # [dispatcher.costs]: what proactive dispatch prices a worker with.
    costs: DispatchCosts = DispatchCosts()

    def check(self) -> Problems:
        bad = Common.check(self) + nested_problems("costs", self.costs.check())
        if self.placement_interval_s <= 0:
            bad.append(("placement_interval_s", self.placement_interval_s, "must be > 0"))
        return bad
