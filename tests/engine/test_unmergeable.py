"""An adapter far larger than the weights it changes is never merged: merged, a mixed step's other
requests (computed as x·(W + ΔW)ᵀ − x·ΔWᵀ) lost their tokens to the sum's rounding, so one tenant's
adapter changed every other tenant's output in its steps (found by a probe: weights of 100 at
scale 8, well inside the registration limits)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from dlora.model.make_tiny import TinyOutput
from dlora.services.worker.engine.merge import MAX_MERGE_DELTA
from tests.engine.helpers import make_engine, run_all

PROMPTS = [[5, 17, 33, 40, 9], [7, 8, 9, 10], [3, 300, 41]]


def large_adapter(tiny: TinyOutput, out: Path) -> Path:
    """lora-0 with every weight uniform in ±100 and lora_alpha 64 (scale 8)."""
    src = tiny.adapters["lora-0"]
    shutil.copytree(src, out)
    conf = json.loads((src / "adapter_config.json").read_text())
    (out / "adapter_config.json").write_text(json.dumps({**conf, "lora_alpha": 8.0 * conf["r"]}))
    g = torch.Generator().manual_seed(0)
    weights = load_file(src / "adapter_model.safetensors")
    save_file(
        {k: (torch.rand(v.shape, generator=g) * 2 - 1) * 100 for k, v in weights.items()},
        out / "adapter_model.safetensors",
    )
    return out


def test_the_delta_ratio_is_the_norms_of_the_change_and_the_weight(tiny_llama: TinyOutput) -> None:
    engine = make_engine(tiny_llama)
    adapter = engine.adapters["lora-1"]
    (layer, target), w = next(iter(adapter.weights.items()))
    rows = engine.merger.touched(adapter)[0]
    delta = (w.scale * w.b.double() @ w.a.double()).norm() / rows.double().norm()
    assert engine.merger.delta_ratio(adapter) >= float(delta) > 0
    assert all(engine.merger.delta_ratio(a) < MAX_MERGE_DELTA for a in engine.adapters.values())  # trained-like


@pytest.mark.parametrize("policy", ["dlora", "mixed-only", "merged-only"])
def test_an_adapter_too_large_to_merge_runs_unmerged_and_its_batch_mates_stay_exact(
    tiny_llama: TinyOutput, tmp_path: Path, policy: str
) -> None:
    alone = run_all(make_engine(tiny_llama), {"base": (None, PROMPTS[1]), "other": ("lora-1", PROMPTS[2])}, 12)
    engine = make_engine(tiny_llama, policy=policy)
    engine.register_adapter("large", large_adapter(tiny_llama, tmp_path / "large"))
    assert engine.merger.unmergeable == {"large"} and engine.policy.unmergeable is engine.merger.unmergeable
    merged: list[str | None] = []
    observe = engine.policy.observe
    engine.policy.observe = lambda d, r: (merged.append(r.merged), observe(d, r))[1]  # type: ignore[method-assign]
    requests = {f"l{i}": ("large", PROMPTS[0]) for i in range(8)} | {
        "base": (None, PROMPTS[1]),
        "other": ("lora-1", PROMPTS[2]),
    }
    got = run_all(engine, requests, 12)
    assert "large" not in merged
    assert (got["base"], got["other"]) == (alone["base"], alone["other"])
    with pytest.raises(ValueError, match="too large"):
        engine.switch("large")
