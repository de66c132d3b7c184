"""Every benchmark's plot draws from the result its markdown reads, and save() embeds it once."""

import json
from pathlib import Path

import pytest
from matplotlib.figure import Figure

from dlora.loadgen import (
    bench_cluster,
    bench_control_plane,
    bench_e2e,
    bench_engine,
    bench_features,
    bench_kernels,
    bench_migration,
    bench_policy,
    bench_sim,
    soak,
)
from dlora.loadgen.bench_common import save
from dlora.loadgen.chaos import __main__ as chaos_main
from dlora.loadgen.chaos import report as chaos_report
from tests.unit.test_bench_report import RESULT as E2E

ENGINE = {
    "merge_ms": 12.0,
    "unmerge_ms": 11.0,
    "points": [
        {"mode": m, "adapters": n, "batch": b, "step_ms": 10.0 + b / f, "tokens_per_s": b / (0.01 + b / f / 1e3)}
        for b in (1, 8, 32)
        for m, n, f in (
            ("base", 0, 10.0),
            ("merged", 1, 9.8),
            ("unmerged", 1, 9.0),
            ("unmerged", 8, 7.0),
            ("mixed", 8, 8.0),
        )
    ],
}

KERNELS = {
    "peak_gb_s": 4800.0,
    "points": [
        {"kernel": k, "impl": i, "shape": s, "ms": ms, "gb_s": 100.0 / ms, "gflop_s": 1.0, "bandwidth_fraction": None}
        for k, s in (
            ("lora decode", "K=4096 r=16 T=32 adapters=8, fused qkv"),
            ("lora mixed", "K=4096 r=16 T=32 adapters=8, fused qkv"),
            ("attention decode", "B=8 ctx=512 heads=32/8 D=128"),
            ("attention prefill", "B=4 ctx=512 heads=32/32 D=128"),
        )
        for i, ms in (("triton", 0.1), ("torch", 0.3))
    ]
    + [
        {
            "kernel": "attention decode",
            "impl": "sdpa-dense",
            "shape": "B=8 ctx=512 heads=32/8 D=128",
            "ms": 0.2,
            "gb_s": 500.0,
            "gflop_s": 1.0,
            "bandwidth_fraction": None,
        }
    ],
}


def _turns(ttft: float) -> dict:
    return {"ttft_mean_s": ttft, "ttft_p90_s": 2 * ttft, "later_turns_ttft_mean_s": ttft / 2}


FEATURES = {
    "multi_turn": {"cache_on": _turns(0.1), "cache_off": _turns(0.4), "ttft_mean_off_over_on": 4.0},
    "interference": {
        "chunked": {"itl_p50_s": 0.02, "itl_mean_s": 0.03, "itl_p99_s": 0.1},
        "whole": {"itl_p50_s": 0.02, "itl_mean_s": 0.05, "itl_p99_s": 0.6},
        "itl_p99_whole_over_chunked": 6.0,
    },
}

POLICY = {
    "rows": [
        {
            "stride": s,
            "policy": p,
            "top_adapter_share": 0.5 / s,
            "throughput_tok_s": {"median": 40.0 + s, "min": 38.0, "max": 45.0 + s},
            # one row as a result from before repeats wrote it: a plain figure
            "norm_latency_mean_s": 0.2 * s if p == "dlora" else {"median": 0.3, "min": 0.25, "max": 0.4},
        }
        for s in (1, 8)
        for p in ("merged-only", "unmerged-only", "dlora")
    ]
}

CONTROL_PLANE = {
    "paths": {
        k: {"p50_ms": v, "p99_ms": 2 * v, "mean_ms": v} for k, v in (("engine", 2.0), ("nats", 3.0), ("gateway", 4.0))
    },
    "added": {"nats": {"p50_ms": 1.0, "p99_ms": 2.0}, "gateway": {"p50_ms": 2.0, "p99_ms": 4.0}},
    "gateway_rate_req_s": 350.0,
}

MIGRATION = {
    "time_limit_s": 1.0,
    "rows": [
        {
            "workers": w,
            "adapters": a,
            "requests": n,
            "seconds": n / 5000,
            "method": "ilp" if n < 5000 else "greedy (bound)",
            "makespan_before_s": n / 10,
            "makespan_after_s": n / 15,
        }
        for w, a, n in ((4, 16, 100), (8, 64, 500), (128, 1024, 10000))
    ],
}

CLUSTER = {
    "workers": 2,
    "rows": [
        {"config": c, "throughput_tok_s": t, "norm_latency_mean_s": m, "norm_latency_p90_s": 2 * m}
        for c, t, m in (("round-robin", 30.0, 0.5), ("proactive", 33.0, 0.4), ("proactive + migration", 34.0, 0.35))
    ],
    "bound": {"round_robin_mean_s": 0.45, "balanced_mean_s": 0.3},
}

SOAK = {
    "duration_s": 120.0,
    "samples": [
        {
            "t_s": t,
            "rss_mb:worker-0": 670.0 + t / 60,
            "rss_mb:gateway": 336.0,
            "rss_mb:nats": None,  # a process between restarts
            "redis_keys": 15 + t % 3,
            "inflight_records": t % 2,
            "nats_subscriptions": 90,
            "nats_connections": 5,
        }
        for t in (0.0, 60.0, 120.0, 130.0)
    ],
}

SIMULATE_POLICY = {
    "rows": [
        {"profile": f, "stride": s, "policy": p, "norm_latency_mean_s": 0.03 * s if p == "merged-only" else 0.031}
        for f in ("dlora-artifact", "h200-llama7b")
        for s in (1, 32)
        for p in ("dlora", "merged-only", "unmerged-only")
    ]
}

SIMULATE_CLUSTER = {
    "settings": {"replicas": 32, "cluster_adapters": 128, "cluster_profile": "dlora-artifact"},
    "rows": [
        {
            "dispatch": d,
            "slots": slots,
            "throughput_tok_s": t,
            "norm_latency_mean_s": m,
            "norm_latency_p90_s": 1.1 * m,
            "moved": moved,
        }
        for slots, d, t, m, moved in (
            (128, "round-robin", 44591.7, 0.0273, 0),
            (128, "proactive", 44339.9, 0.0273, 0),
            (128, "proactive + migration", 44376.6, 0.0272, 1561),
            (16, "round-robin", 20000.0, 1.014, 0),
            (16, "proactive", 40000.0, 0.0588, 0),
            (16, "proactive + migration", 41000.0, 0.0555, 103),
        )
    ],
}


def _phase(fault: str, sent: int, *, failed: int = 0, gateway: int = 0, recovery: float | None = 2.0) -> dict:
    return {
        "fault": fault,
        "sent": sent,
        "completed": sent - failed,
        "failed": failed,
        "failures": {"HTTP 503": failed} if failed else {},
        "completed_after_retry": 1,
        "through_killed_gateway": {"requests": gateway, "reasons": {}, "tokens_generated_after_it_died": 0},
        "probes": {"sent": 3, "exact": 3, "mismatched": []},
        "resumed": 0,
        "generated_twice": {"requests": 0},
        "longest_stall_s": 0.5,
        "recovery_s": recovery,
        "steady_after": {"ok": True},
        "exited": {},
        "adapters_reregistered": [],
        "pass": not failed and recovery is not None,
    }


CHAOS = {
    "machine": "a test machine",
    "date": "2026-12-01",
    "code": {"commit": "abc1234", "uncommitted": []},
    "config": {
        "workers": 2,
        "heartbeat_ttl_s": 5.0,
        "load": {"rate": 1.5, "output_tokens": [16, 64]},
        "adapters": ["a", "b"],
        "timing": {"probes": 3},
        "probe_tokens": 96,
        "client_retries": 2,
    },
    "passed": False,
    "phases": [
        _phase("worker-0-sigkill-twice", 72, recovery=29.9),
        _phase("gateway-sigkill", 20, gateway=15),
        _phase("redis-restart-empty", 26, failed=2, recovery=None),  # failed, never served again
    ],
}

PLOTS = {
    "e2e": (bench_e2e.plot, E2E),
    "engine": (bench_engine.plot, ENGINE),
    "kernels": (bench_kernels.plot, KERNELS),
    "features": (bench_features.plot, FEATURES),
    "policy": (bench_policy.plot, POLICY),
    "control-plane": (bench_control_plane.plot, CONTROL_PLANE),
    "migration": (bench_migration.plot, MIGRATION),
    "cluster": (bench_cluster.plot, CLUSTER),
    "soak": (soak.plot, SOAK),
    "simulate-policy": (bench_sim.plot_policy, SIMULATE_POLICY),
    "simulate-cluster": (bench_sim.plot_cluster, SIMULATE_CLUSTER),
    "chaos": (chaos_report.plot, CHAOS),
}


@pytest.mark.parametrize("key", PLOTS)
def test_plot_draws_the_result(key: str) -> None:
    plot, result = PLOTS[key]
    fig = plot(result)
    import matplotlib.pyplot as plt  # after plot() chose the Agg backend

    try:
        assert isinstance(fig, Figure)
        assert any(ax.lines or ax.patches or ax.collections for ax in fig.axes)
        assert all(ax.get_xlabel() or ax.get_ylabel() for ax in fig.axes), "every axis names its unit"
    finally:
        plt.close(fig)


def test_save_writes_the_png_and_embeds_it_once(tmp_path: Path) -> None:
    bench = tmp_path / "BENCHMARKS.md"
    bench.write_text("# Benchmarks\n\nearlier text\n")
    image = "![migration](docs/bench-migration.png)"
    # the second body already ends with the image, as a markdown() that still added it would
    for body in ("| a | b |", f"| a | b |\n\n{image}\n"):
        save(MIGRATION, None, str(bench), "migration", "Migration", body, plot=bench_migration.plot)
    png = tmp_path / "docs" / "bench-migration.png"
    assert png.read_bytes()[:4] == b"\x89PNG"
    text = bench.read_text()
    section = text[: text.index("<!-- bench-migration:end -->")].rstrip()
    assert section.endswith(image)
    assert text.count("![migration]") == 1 and "earlier text" in text


def test_e2e_keeps_its_image_path(tmp_path: Path) -> None:
    bench = tmp_path / "BENCHMARKS.md"
    bench_e2e.write_outputs(E2E, None, bench)
    assert (tmp_path / "docs" / "bench-e2e.png").read_bytes()[:4] == b"\x89PNG"
    assert bench.read_text().count("![e2e](docs/bench-e2e.png)") == 1


def test_chaos_from_json_writes_its_section_with_the_plot(tmp_path: Path) -> None:
    bench, run = tmp_path / "BENCHMARKS.md", tmp_path / "chaos.json"
    run.write_text(json.dumps(CHAOS))
    for _ in range(2):  # a second run replaces the section and its image, it does not add one
        assert chaos_main.main(["--from-json", str(run), "--benchmarks", str(bench)]) == 1  # a fault failed
    assert (tmp_path / "docs" / "bench-chaos.png").read_bytes()[:4] == b"\x89PNG"
    text = bench.read_text()
    section = text[: text.index("<!-- bench-chaos:end -->")].rstrip()
    assert section.endswith("![chaos](docs/bench-chaos.png)") and text.count("![chaos]") == 1
    assert "| redis-restart-empty | 26 | 24 | 2 |" in text


def test_a_graphed_gpu_profile_is_projected_to_full_depth() -> None:
    """The 7b preset runs 4 of Llama-2-7B's 32 layers: its wall/kernel ratio is read at 32 too, each
    layer adding kernel time and no host time."""
    # 4 layers: 1.5 ms of kernels, 1.0 ms of host around them -> 8 x 1.5 = 12 ms of kernels, 13 ms wall
    assert bench_engine.projected_ratio(2.5, 1.5, 4) == pytest.approx(13.0 / 12.0)
    assert bench_engine.projected_ratio(2.5, 1.5, 32) == pytest.approx(2.5 / 1.5)
    profile = {"batch": 32, "wall_ms_per_step": 2.5, "kernel_ms_per_step": 1.5, "launches_per_step": 300}
    r = {
        **ENGINE,
        "machine": "GPU",
        "preset": "7b",
        "dtype": "bfloat16",
        "prompt_len": 16,
        "profile": {"base": profile},
    }
    r |= {"timed_decode_steps": 8, "rounds": 1, "ratios": {}}
    graphed = bench_engine.markdown({**r, "cuda_graphs": True, "num_layers": 4})
    assert "| base | 32 | 2.50 | 1.50 | 1.67 (1.08) |" in graphed and "At 32 layers" in graphed
    eager = bench_engine.markdown({**r, "cuda_graphs": False, "num_layers": 4})  # launches grow with depth
    assert "| base | 32 | 2.50 | 1.50 | 1.67 |" in eager and "At 32 layers" not in eager
    assert "asynchronous scheduling" not in eager  # said where it ran so (it was in no record: a helper)
    assert "asynchronous scheduling" in bench_engine.markdown({**r, "async_scheduling": True, "num_layers": 4})


def test_a_soak_stopped_before_its_first_sample_plots_without_a_legend() -> None:
    """The load generator's report drew a legend with nothing to label when stopped before its
    first request (a warning; CI failed on it once); the soak's plot had the same kin."""
    import matplotlib.pyplot as plt

    plt.close(soak.plot({"duration_s": 0.0, "samples": []}))
