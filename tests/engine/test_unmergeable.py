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

from dlora.common.messages import SamplingParams
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


def test_the_delta_ratio_is_the_largest_row_s_change_over_the_row(tiny_llama: TinyOutput) -> None:
    engine = make_engine(tiny_llama)
    adapter = engine.adapters["lora-1"]
    ratios = [
        float(((w.scale * w.b.double() @ w.a.double()).norm(dim=1) / rows.cpu().double().norm(dim=1)).max())
        for w, rows in zip(adapter.weights.values(), engine.merger.touched(adapter))
    ]
    assert engine.merger.delta_ratio(adapter) == pytest.approx(max(ratios), rel=1e-6)
    assert all(engine.merger.delta_ratio(a) < MAX_MERGE_DELTA for a in engine.adapters.values())  # trained-like


def test_a_change_in_one_row_is_not_averaged_away(tiny_llama: TinyOutput, tmp_path: Path) -> None:
    """Five times one row of W, nothing elsewhere: over the whole matrix the change is below the
    weight, but that output of every batch mate would carry the rounding of a 5x larger sum."""
    engine = make_engine(tiny_llama)
    src = tiny_llama.adapters["lora-0"]
    shutil.copytree(src, tmp_path / "row")
    weights = load_file(src / "adapter_model.safetensors")
    lora = engine.adapters["lora-0"]
    (layer, target), w = next(iter(lora.weights.items()))
    row = engine.merger.touched(lora)[0][0].cpu().double()  # the weights may be on a GPU (make gpu-check)
    b_key = next(k for k in weights if k.endswith("lora_B.weight") and f"layers.{layer}." in k and target in k)
    b = torch.zeros_like(weights[b_key])
    b[0] = 1.0
    b[0] *= float(5 * row.norm() / (w.scale * (b[0].double() @ w.a.double()).norm()))  # ‖s(B·A)₀‖ = 5‖W₀‖
    others = {k: torch.zeros_like(v) if k.endswith("lora_B.weight") else v for k, v in weights.items()}
    save_file({**others, b_key: b}, tmp_path / "row" / "adapter_model.safetensors")
    adapter = engine.register_adapter("row", tmp_path / "row")
    whole = float((w.scale * b.double() @ w.a.double()).norm() / engine.merger.touched(lora)[0].cpu().double().norm())
    assert whole < MAX_MERGE_DELTA < engine.merger.delta_ratio(adapter) and "row" in engine.merger.unmergeable


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


@pytest.mark.parametrize("max_loras", [1, 2])
@pytest.mark.parametrize("policy", ["dlora", "mixed-only", "merged-only", "unmerged-only"])
def test_every_request_is_served_beside_an_adapter_too_large_to_merge(
    tiny_llama: TinyOutput, tmp_path: Path, policy: str, max_loras: int
) -> None:
    """A helper's finding: mixed-only with one device slot never counted the unmergeable adapter's
    requests as anyone's, kept the other adapter merged (the slot held by its correction) and
    stepped on empty batches for ever once that adapter's requests were done."""
    engine = make_engine(tiny_llama, policy=policy, max_loras=max_loras)
    engine.register_adapter("large", large_adapter(tiny_llama, tmp_path / "large"))
    requests = {"l0": ("large", PROMPTS[0]), "o0": ("lora-1", PROMPTS[2]), "o1": ("lora-1", PROMPTS[1])}
    for rid, (adapter, ids) in (requests | {"base": (None, PROMPTS[1])}).items():
        params = SamplingParams(max_tokens=3, ignore_eos=True)
        engine.add_request(rid, prompt_token_ids=ids, params=params, adapter=adapter)
    finished = set()
    for _ in range(60):  # 4 requests of 3 tokens: a dozen steps at worst
        finished |= {o.request_id for o in engine.step() if o.finish_reason}
        if not engine.has_unfinished():
            break
    assert finished == {*requests, "base"}
