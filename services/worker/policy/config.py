"""The batching policy's settings (``[worker.engine.policy]`` in ``dlora.toml``). Pure, torch-free."""

from __future__ import annotations

import enum

import msgspec


class PolicyName(enum.StrEnum):
    DLORA = "dlora"  # dynamic merge/unmerge with credits (policy/dlora.py)
    MERGED_ONLY = "merged-only"  # always one adapter merged, FCFS by adapter (the dLoRA paper's baseline)
    UNMERGED_ONLY = "unmerged-only"  # always many adapters unmerged, FCFS (vLLM's / S-LoRA's way)
    MIXED_ONLY = "mixed-only"  # always the busiest adapter merged, every other request beside it unmerged


class PolicyConfig(msgspec.Struct, kw_only=True, frozen=True, forbid_unknown_fields=True):
    """Which policy runs and the dLoRA policy's knobs (the other policies have none).

    Thresholds follow the dLoRA paper (OSDI'24, section 4.1): R is the share of the FCFS batch one
    adapter needs to be merged, L = band_ratio * R the share below which it is unmerged again.
    """

    name: PolicyName = PolicyName.DLORA
    # Credit (seconds owed to an adapter's waiting requests) past which it is served first. Seconds
    # on every device, not steps: it bounds a wait a client feels (policy/dlora.py says why).
    starvation_s: float = 1.0
    # ... or this many (the lesser) where a running request of it was left waiting: how long a
    # stream may pause between tokens, about (with starvation_s alone, merged epochs of a busier
    # adapter held a rarely used adapter's stream to a token a second).
    running_starvation_s: float = 0.25
    # Adapters owing more than this many seconds of credit may not be merged.
    debt_floor_s: float = 1.0
    # R at start, and the range the band adapts it within.
    r_initial: float = 0.5
    r_min: float = 0.05
    r_max: float = 1.0
    # L = band_ratio * R (hysteresis between entering and leaving merged mode).
    band_ratio: float = 0.7
    # Additive step up of R after a merged epoch that lost to the unmerged counterfactual.
    band_up: float = 0.05
    # Multiplicative step down of R after an unmerged epoch that merging would have beaten ...
    band_down: float = 0.8
    # ... by at least this relative throughput gain.
    band_margin: float = 0.05
    # Leave the current mode only for one cheaper per token by this many standard deviations of
    # the difference of the two estimates (the cost model's uncertainty).
    kappa: float = 0.5
    # A merged or mixed epoch whose steps took this many times their predicted time ...
    watchdog_ratio: float = 2.0
    # ... makes the policy run unmerged for this many steps.
    watchdog_steps: int = 16

    def check(self) -> list[tuple[str, object, str]]:
        """Problems as (field, value, why); empty when the values are usable."""
        bad: list[tuple[str, object, str]] = []
        if not 0 < self.r_min <= 1:
            bad.append(("r_min", self.r_min, "must be in (0, 1]"))
        if not 0 < self.r_max <= 1:
            bad.append(("r_max", self.r_max, "must be in (0, 1]"))
        if not self.r_min <= self.r_initial <= self.r_max:
            bad.append(("r_initial", self.r_initial, f"must lie in [r_min, r_max] = [{self.r_min}, {self.r_max}]"))
        if not 0 < self.band_ratio <= 1:
            bad.append(("band_ratio", self.band_ratio, "must be in (0, 1]"))
        if not 0 < self.band_down < 1:
            bad.append(("band_down", self.band_down, "must be in (0, 1)"))
        if self.starvation_s <= 0:
            bad.append(("starvation_s", self.starvation_s, "must be > 0"))
        if self.running_starvation_s <= 0:
            bad.append(("running_starvation_s", self.running_starvation_s, "must be > 0"))
        if self.debt_floor_s < 0:
            bad.append(("debt_floor_s", self.debt_floor_s, "must be >= 0"))
        if self.kappa < 0:
            bad.append(("kappa", self.kappa, "must be >= 0"))
        if self.watchdog_ratio <= 1:
            bad.append(("watchdog_ratio", self.watchdog_ratio, "must be > 1"))
        if self.watchdog_steps < 0:
            bad.append(("watchdog_steps", self.watchdog_steps, "must be >= 0"))
        return bad
