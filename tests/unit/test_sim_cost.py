"""The simulator's cost profiles (pure)."""

import re

import pytest

from dlora.sim.cost import ARTIFACT, H100, H200, PROFILES, StepShape, calibrated, checked, from_steps, measured

DECODE_32 = StepShape(tokens=32, prefill_tokens=0, context_tokens=32 * 512)


def test_the_artifact_profile_reproduces_its_constants() -> None:
    merged = StepShape(tokens=8, prefill_tokens=0, context_tokens=800)
    unmerged = StepShape(tokens=8, prefill_tokens=0, context_tokens=800, lora_segments=3, lora_rank_tokens=128)
    assert ARTIFACT.step_seconds(merged) == pytest.approx(15e-3)
    assert ARTIFACT.step_seconds(unmerged) == pytest.approx(27e-3)
    assert ARTIFACT.switch_seconds(unmerge=True, merge=True) == pytest.approx(20e-3)
    assert set(PROFILES) == {"dlora-artifact", "h100-llama7b", "h200-llama7b"}


def test_the_gpu_rooflines_are_bandwidth_bound_at_decode() -> None:
    # Llama-2-7B's 13.5 GB of bf16 weights read once a step: 4.2 ms at 80 % of 4.8 TB/s, plus the
    # 1 ms host side; 32 tokens of FLOPs and 16k KV entries add little.
    step = H200.step_seconds(DECODE_32)
    assert 5.0e-3 < step < 8.0e-3
    assert H100.step_seconds(DECODE_32) > step  # less bandwidth
    # a rank-16 adapter on all seven targets is ~1 % of the weights' bytes: unmerged costs ~1 %
    lora = StepShape(tokens=32, prefill_tokens=0, context_tokens=32 * 512, lora_segments=1, lora_rank_tokens=32 * 16)
    assert 1.0 < H200.step_seconds(lora) / step < 1.03
    # a merge reads and writes every weight; a load comes over PCIe, from disk slower still
    assert 5e-3 < H200.switch_seconds(unmerge=False, merge=True) < 10e-3
    assert 0 < H200.load_seconds(16, "cpu") < H200.load_seconds(16, "disk") and H200.load_seconds(16, "gpu") == 0
    assert H200.kv_capacity_tokens > H100.kv_capacity_tokens > 100_000
    with pytest.raises(ValueError, match="tier"):
        H200.load_seconds(16, "tape")


def test_prefill_costs_flops_and_a_move_ships_or_recomputes() -> None:
    prefill = StepShape(tokens=2048, prefill_tokens=2048, context_tokens=2048)
    # compute-bound: 2 FLOPs per parameter per token, 47 ms for 2,048 tokens at 60 % of 989 TFLOP/s
    assert 40e-3 < H200.step_seconds(prefill) < 60e-3
    assert H200.move_seconds(2000, ship_kv=True) != H200.move_seconds(2000, ship_kv=False)


def _bench(unmerged: dict[tuple[int, int], float]) -> dict:
    base = {1: 36.0, 8: 79.0, 32: 146.0}
    points = [{"mode": "base", "adapters": 0, "batch": b, "step_ms": ms} for b, ms in base.items()]
    points += [
        {"mode": "unmerged", "adapters": n, "batch": b, "step_ms": base[b] + extra}
        for (n, b), extra in unmerged.items()
    ]
    return {"points": points, "merge_ms": 40.0, "unmerge_ms": 35.0, "machine": "test", "date": "2026-12-01"}


def test_calibrated_from_bench_engine_replays_its_points_and_fits_the_lora_cost() -> None:
    # extra = 2 ms per adapter + 0.01 ms per rank-token (rank 16): the fit recovers both
    truth = {(n, b): 2.0 * n + 0.01 * b * 16 for n in (1, 4, 8) for b in (8, 32)}
    p = calibrated(_bench(truth))
    for b, ms in ((1, 36.0), (8, 79.0), (32, 146.0)):
        assert p.step_seconds(StepShape(tokens=b, prefill_tokens=0, context_tokens=0)) == pytest.approx(ms / 1e3)
    assert p.decode_seconds(64) > p.decode_seconds(32)  # the last slope beyond
    assert p.lora_segment_s == pytest.approx(2e-3) and p.lora_rank_token_s == pytest.approx(1e-5)
    assert (p.merge_s, p.unmerge_s) == (0.04, 0.035) and "test" in p.name
    # one kind of point only: the other coefficient is 0, never negative
    one = calibrated(_bench({(1, 32): 10.0, (1, 8): 2.5}))
    assert one.lora_segment_s >= 0 and one.lora_rank_token_s >= 0
    with pytest.raises(ValueError, match="two batch sizes"):
        calibrated({"points": [{"mode": "base", "adapters": 0, "batch": 1, "step_ms": 3.0}]})


def test_calibrated_fits_the_lora_cost_to_mixed_steps_too_by_the_work_each_point_ran() -> None:
    """A mixed step's LoRA work (the others' deltas and the merged adapter's correction) is fitted
    with the unmerged steps', by the segments and rank-tokens each point records."""
    bench = _bench({(1, 8): 2.0 + 0.01 * 8 * 16, (4, 32): 8.0 + 0.01 * 32 * 16})
    # batch 32, three quarters merged: 8 others on 7 adapters, their 8 corrected: 8 segments
    bench["points"].append(
        {
            "mode": "mixed",
            "adapters": 8,
            "batch": 32,
            "step_ms": 146.0 + 16.0 + 0.01 * 256,
            "lora_segments": 8,
            "lora_rank_tokens": 256,
        }
    )
    p = calibrated(bench)
    assert p.lora_segment_s == pytest.approx(2e-3) and p.lora_rank_token_s == pytest.approx(1e-5)


def test_calibrated_from_bench_cluster_takes_its_workers_step_curve() -> None:
    bench = {"bound": {"step_seconds": {"1": 0.036, "8": 0.079, "64": 0.243}}, "machine": "m", "date": "d"}
    p = calibrated(bench)
    assert p.decode_seconds(8) == pytest.approx(0.079) and p.lora_segment_s == 0.0  # LoRA is in the curve
    assert p.merge_s == H100.merge_s  # none measured there
    assert calibrated({**bench, "merge_ms": 137.0}).merge_s == pytest.approx(0.137)


def test_calibrated_from_bench_cluster_prefers_the_loop_time_its_workers_measured_in_the_runs() -> None:
    """The runs' own loop time per decode step (the shell and the host's other processes in it),
    pooled over the configurations by bucket, at each bucket's mean batch; a bucket with fewer
    than 5 timed steps is left out, and with fewer than two buckets the engine-alone curve stands.
    (On `bench cluster`'s workload this took the simulator from 0.77-0.82 of the measured mean
    normalized latency to 0.89-0.97; BENCHMARKS.md, validation.)"""
    alone = {"1": 0.036, "8": 0.079, "64": 0.243}
    rows = [
        {"cycles": {"4": [10, 0.5, 30], "16": [3, 0.3, 40]}},  # bucket 4: 10 steps of 3 sequences
        {"cycles": {"4": [10, 0.7, 30], "16": [3, 0.3, 44], "64": [2, 1.0, 100]}},
    ]
    p = calibrated({"bound": {"step_seconds": alone}, "rows": rows})
    assert p.curve == ((3.0, pytest.approx(0.06)), (14.0, pytest.approx(0.1)))
    assert p.decode_seconds(3) == pytest.approx(0.06)
    # a prompt token at the engine-alone slope: the runs' slope holds per-sequence shell work too
    assert p.token_s == pytest.approx((0.243 - 0.036) / 63)
    few = calibrated({"bound": {"step_seconds": alone}, "rows": rows[:1]})  # bucket 16 has 3 steps only
    assert few.decode_seconds(8) == pytest.approx(0.079)


def test_a_profile_fitted_to_a_runs_own_steps_prices_each_term_as_they_ran() -> None:
    """``dlora bench policy`` / ``bench e2e`` log their steps (decodes, prompt tokens, sequences
    prefilled, LoRA segments, rank-tokens, seconds); the profile fitted to them prices a step of any
    mix as those steps cost, every coefficient >= 0."""
    truth = {"step_s": 0.03, "token_s": 0.002, "prefill_token_s": 0.001, "prefill_seq_s": 0.004}
    truth |= {"lora_segment_s": 0.0015, "lora_rank_token_s": 2e-5}
    steps = []
    for decode in (0, 1, 5, 12, 30):
        for prompt, seqs in ((0, 0), (20, 1), (64, 2), (90, 3)):
            for segments, rank_tokens in ((0, 0), (3, 16 * decode + 8 * prompt), (7, 32 * (decode + prompt))):
                if decode + seqs:
                    x = (decode, prompt, seqs, segments, rank_tokens)
                    seconds = truth["step_s"] + sum(v * t for v, t in zip(x, list(truth.values())[1:]))
                    steps.append([*x, seconds])
    bench = {"rows": [{"runs": [{"steps": steps[::2]}, {"steps": steps[1::2]}]}], "merge_ms": 200.0}
    p = calibrated(bench, name="fitted")
    for field, value in truth.items():
        assert getattr(p, field) == pytest.approx(value), field
    assert p.prefill_token_s != p.token_s and p.merge_s == 0.2 and p.name == "fitted"
    shape = StepShape(
        tokens=40, prefill_tokens=30, context_tokens=0, lora_segments=2, lora_rank_tokens=100, prefill_seqs=2
    )
    assert p.step_seconds(shape) == pytest.approx(0.03 + 0.02 + 0.03 + 0.008 + 0.003 + 0.002)
    # e2e's rows hold their steps themselves; a cost the steps would fit below 0 is held at 0
    cheaper = [[*s[:-1], s[-1] - 0.003 * s[3]] for s in steps]  # segments now pay back time
    q = calibrated({"rows": [{"steps": cheaper}]})
    assert q.lora_segment_s == 0.0 and min(q.token_s, q.prefill_token_s, q.step_s) >= 0
    with pytest.raises(ValueError, match="rows"):
        calibrated({"rows": [{"steps": steps[:3]}]})


@pytest.mark.parametrize(
    ("points", "merge_ms", "why"),
    [
        ({(0, 1): float("nan"), (0, 8): 40.0}, 40.0, "step at batch 1 takes nan s"),  # json.loads takes NaN
        ({(0, 1): -30.0, (0, 8): -50.0}, 40.0, "step at batch 1 takes -0.03 s"),
        ({(0, 1): 30.0, (0, 8): 40.0}, -1000.0, "merge_s is -1, below zero"),
        ({(0, 1): 30.0, (0, 8): 40.0}, 1e300, "merge_s is 1e+297 s, over 3600"),  # the clock would stall
    ],
)
def test_a_calibration_with_costs_no_engine_has_is_refused(points: dict, merge_ms: float, why: str) -> None:
    """A user's trial: negative step times simulated -5 ms/token; NaN, Infinity or 1e300 ms hung."""
    bench = {
        "points": [{"mode": "base", "adapters": 0, "batch": b, "step_ms": ms} for (_, b), ms in points.items()],
        "merge_ms": merge_ms,
    }
    with pytest.raises(ValueError, match=re.escape(why)):
        calibrated(bench)


def test_steps_that_cost_nothing_are_refused() -> None:
    steps = [[b, 0, 0, 0, 0, 0.0] for b in range(1, 13)]  # a bench policy log, every step of no time
    with pytest.raises(ValueError, match="costs nothing"):
        checked(from_steps(steps, "zero"))


def test_a_flat_measured_curve_with_noise_prices_prompt_tokens_at_zero_not_below() -> None:
    """A review: a launch-bound GPU curve whose last point reads a little under its first gave a
    negative prompt-token price, which ``checked`` refused: a real calibration unusable."""
    p = checked(measured({1: 0.0102, 8: 0.0104, 64: 0.0101}, "flat"))
    assert p.token_s == 0.0 and p.decode_seconds(8) == pytest.approx(0.0104)
