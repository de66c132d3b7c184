"""peft_targets: the modules, ranks and alphas PEFT itself selects, and a time bound that refuses
hostile configs but not the ones PEFT writes, nor any because other threads ran meanwhile."""

from __future__ import annotations

import time

import pytest

from dlora.model.peft_targets import Targets

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _modules(layers: int) -> list[str]:
    return [
        f"model.layers.{i}.{'self_attn' if t in TARGETS[:4] else 'mlp'}.{t}" for i in range(layers) for t in TARGETS
    ]


def test_an_eva_config_of_an_80_layer_base_is_read_in_full() -> None:
    """PEFT's EVA initialisation writes a rank_pattern and an alpha_pattern key per module (the
    module's full name: peft/tuners/lora/eva.py), each matched, in order, against every module:
    560 x 560 matches twice on an 80-layer base. regex's cache holds 500 patterns, so each match
    compiled its pattern again, and such an adapter was refused at the 2 s bound on an idle
    machine here."""
    modules = _modules(80)
    ranks = {m: 4 + i % 13 for i, m in enumerate(modules)}
    alphas = {m: float(i + 1) for i, m in enumerate(modules)}
    conf = {"r": 8, "lora_alpha": 16, "target_modules": list(TARGETS), "rank_pattern": ranks, "alpha_pattern": alphas}
    chosen = Targets("eva", conf)
    for m in modules:
        assert chosen.targeted(m)
        assert chosen.pattern_value(ranks, m, 8) == ranks[m]
        assert chosen.pattern_value(alphas, m, 16) == alphas[m]


def test_time_the_matching_thread_spends_waiting_is_not_charged_to_its_config(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The bound was wall-clock: the time other threads held the GIL or the cores (the steps,
    other registrations: eight 32-layer EVA configs registered at once were all refused) counted
    as the config's. A thread kept from running, as this one sleeping, spends none of it."""
    monkeypatch.setattr("dlora.model.peft_targets.PATTERN_BUDGET_S", 0.2)
    modules = _modules(2)
    ranks = {".*_proj": 4}
    chosen = Targets("a", {"r": 8, "lora_alpha": 16, "target_modules": ".*_proj", "rank_pattern": ranks})
    for m in modules:
        time.sleep(0.02)
        assert chosen.targeted(m) and chosen.pattern_value(ranks, m, 8) == 4
