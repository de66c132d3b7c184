"""``dlora bench``'s subcommands: each benchmark's options, refused as usage errors where a run
could not use them (``bench_options``), and its output paths checked before it runs."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from dlora.services.bench_options import check_bench_numbers, policies, sizes
from dlora.services.lazy_command import lazy


def _bench(target: str) -> Callable[[argparse.Namespace], int]:
    """A ``dlora bench`` subcommand (``lazy``) whose output paths are checked before it runs: most
    found a --json that is a folder, or a --workdir that is a file, after minutes of work, and lost
    their results to a traceback (a helper's trial)."""

    def run(args: argparse.Namespace) -> int:
        from dlora.loadgen.bench_common import writable

        try:
            for option in ("json", "benchmarks"):
                if path := getattr(args, option, None):
                    writable(path, f"--{option}")
            if (workdir := getattr(args, "workdir", None)) and Path(workdir).exists() and not Path(workdir).is_dir():
                raise NotADirectoryError(f"--workdir {workdir} is a file, not a folder")
        except OSError as e:
            print(f"dlora bench {args.bench_command}: {e}", file=sys.stderr)
            return 2
        return lazy(target)(args)

    return run


def add_bench(sub: Any) -> None:
    """Add ``bench`` and its subcommands to the ``dlora`` parser's subcommands ``sub``."""
    from dlora.loadgen.bundled import data_dir

    bench = sub.add_parser("bench", help="benchmarks").add_subparsers(dest="bench_command", required=True)
    be = bench.add_parser("engine", help="decode throughput: base, merged, unmerged with many adapters")
    be.add_argument("--preset", choices=["tiny", "small", "7b"], default="small", help="7b: 7B widths, 4 layers")
    be.add_argument("--json", help="write results here")
    be.add_argument("--batch-sizes", default="1,8,32,64")
    be.add_argument("--adapters", default="1,8,64", help="distinct adapters in the unmerged runs")
    be.add_argument("--steps", type=int, default=8, help="timed decode steps per point")
    be.add_argument("--rounds", type=int, default=3, help="interleaved repetitions; the median is reported")
    be.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    be.add_argument("--device", default="cpu", help="torch device the engine runs on: cpu, cuda, cuda:1")
    be.add_argument(
        "--profile", action="store_true", help="per step at batch 32: GPU kernel time and launches (torch.profiler)"
    )
    be.add_argument(
        "--hf-baseline", action="store_true", help="transformers + peft per decode step, same model, batch 1 and 32"
    )
    be.add_argument("--enforce-eager", action="store_true", help="no CUDA graphs: every decode step launched op by op")
    be.add_argument(
        "--async-scheduling", action="store_true", help="each step launched while the device runs the last one"
    )
    be.add_argument("--workdir", default=".cache/bench", help="where the benchmark model is made")
    be.add_argument("--benchmarks", default="BENCHMARKS.md", help="file whose section is regenerated")
    be.set_defaults(func=_bench("dlora.loadgen.bench_engine:run_bench_engine"))

    btl = bench.add_parser("tune-lora", help="time the LoRA kernels' tiles on this GPU into dlora_kernels/tuned/")
    btl.add_argument("--preset", choices=["7b"], default="7b", help="the model whose fused projections are tuned")
    btl.add_argument("--tokens", default="1,4,16,32,64", help="decode tokens per adapter")
    btl.add_argument("--groups", default="1,8", help="distinct adapters in the batch")
    btl.add_argument("--rank", type=int, default=16)
    btl.add_argument("--dtype", choices=["bfloat16", "float16"], default="bfloat16")
    btl.add_argument("--out", help="table folder (default: dlora_kernels/tuned of this source tree)")
    btl.set_defaults(func=_bench("dlora.loadgen.tune_lora:run_tune_lora"))

    bkr = bench.add_parser("kernels", help="Triton LoRA and paged-attention kernels beside their torch references")
    bkr.add_argument("--reps", type=int, default=20, help="timed repetitions per point; the median is reported")
    bkr.add_argument("--peak-gbs", type=float, help="the GPU's peak memory bandwidth (default: known by name)")
    bkr.add_argument("--json", help="write results here")
    bkr.add_argument("--benchmarks", default="BENCHMARKS.md", help="file whose section is regenerated")
    bkr.set_defaults(func=_bench("dlora.loadgen.bench_kernels:run_bench_kernels"))

    bf = bench.add_parser("features", help="prefix caching on vs off (multi-turn), chunked prefill vs whole")
    bf.add_argument("--preset", choices=["tiny", "small", "7b"], default="small", help="benchmark model preset")
    bf.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    bf.add_argument("--workdir", default=".cache/bench", help="where the benchmark model is made")
    bf.add_argument("--seed", type=int, default=0)
    bf.add_argument("--adapters", type=int, default=2, help="conversations cycle over this many adapters (0: base)")
    bf.add_argument(
        "--policy",
        choices=["unmerged-only", "dlora"],
        default="unmerged-only",
        help="the multi-turn replay's batching policy (dlora: merges change the cache's key)",
    )
    bf.add_argument("--conversations", type=int, default=12)
    bf.add_argument("--turns", type=int, default=5)
    bf.add_argument("--conversation-rate", type=float, default=0.5, help="conversations started per second")
    bf.add_argument("--system-tokens", type=int, default=256)
    bf.add_argument("--user-tokens", type=int, default=48)
    bf.add_argument("--output-tokens", type=int, default=24)
    bf.add_argument("--think-s", type=float, default=1.0)
    bf.add_argument("--streams", type=int, default=8)
    bf.add_argument("--stream-tokens", type=int, default=96)
    bf.add_argument("--long-prompt", type=int, default=1500)
    bf.add_argument("--long-prompts", type=int, default=4)
    bf.add_argument("--long-every-s", type=float, default=2.0)
    bf.add_argument("--chunk-budget", type=int, default=128, help="max_num_batched_tokens with chunked prefill")
    bf.add_argument("--json", help="write the result here")
    bf.add_argument("--benchmarks", default="BENCHMARKS.md", help="file whose section is regenerated")
    bf.set_defaults(func=_bench("dlora.loadgen.bench_features:run_bench_features"))

    bp = bench.add_parser("policy", help="dlora vs the fixed modes over adapter skew (paper Fig. 10)")
    bp.add_argument("--preset", choices=["tiny", "small"], default="small")
    bp.add_argument("--adapters", type=int, default=16, help="number of adapters (ranks 8/16/32)")
    bp.add_argument("--strides", default="1,4,8,16,32", help="stride mapping values: bigger = more skew")
    bp.add_argument("--policies", type=policies, default="merged-only,unmerged-only,mixed-only,dlora")
    bp.add_argument("--repeats", type=int, default=3, help="runs of each (stride, policy): median and spread")
    bp.add_argument("--requests", type=int, default=120)
    bp.add_argument("--rate", type=float, help="arrival rate, req/s (default: --load x measured saturation)")
    bp.add_argument("--load", type=float, help="fraction of the measured saturation (default 0.9; not with --rate)")
    bp.add_argument("--length-divide", type=float, default=8.0, help="trace lengths are divided by this")
    bp.add_argument("--max-prompt", type=int, default=32, help="prefill dominates on a CPU: keep prompts short")
    bp.add_argument("--max-output", type=int, default=48)
    bp.add_argument("--max-seconds", type=float, default=120.0, help="cap on one run")
    bp.add_argument("--seed", type=int, default=0)
    bp.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    bp.add_argument("--traces", default=str(data_dir()), help="folder of traces laid out as the bundled ones")
    bp.add_argument("--workdir", default=".cache/bench")
    bp.add_argument("--json", help="write results here")
    bp.add_argument("--benchmarks", default="BENCHMARKS.md", help="file whose section is regenerated")
    bp.set_defaults(func=_bench("dlora.loadgen.bench_policy:run_bench_policy"))

    b2 = bench.add_parser("e2e", help="dlora vs HF PEFT vs fixed modes over a rate sweep (paper Fig. 8/9)")
    b2.add_argument("--preset", choices=["tiny", "small"], default="small")
    b2.add_argument("--adapters", type=int, default=32)
    b2.add_argument("--stride", type=int, default=8)
    b2.add_argument("--rates", default="0.25,0.5,1,2,4,6", help="request rates to sweep (req/s)")
    b2.add_argument("--systems", default="hf-peft,merged-only,unmerged-only,dlora")
    b2.add_argument("--window", type=float, default=20.0, help="seconds of arrivals per rate ...")
    b2.add_argument("--min-requests", type=int, default=8)
    b2.add_argument("--max-requests", type=int, default=40)
    b2.add_argument("--max-seconds", type=float, default=45.0, help="cap on one run")
    b2.add_argument("--length-divide", type=float, default=8.0)
    b2.add_argument("--max-prompt", type=int, default=64)
    b2.add_argument("--max-output", type=int, default=32)
    b2.add_argument("--latency-bound", type=float, default=0.5, help="s/token for the sustained rate")
    b2.add_argument("--seed", type=int, default=0)
    b2.add_argument("--traces", default=str(data_dir()), help="folder of traces laid out as the bundled ones")
    b2.add_argument("--workdir", default=".cache/bench")
    b2.add_argument("--json", help="write results here")
    b2.add_argument("--benchmarks", default="BENCHMARKS.md", help="file whose e2e section is regenerated")
    b2.add_argument("--docs", default="docs", help="folder for the plot")
    b2.set_defaults(func=_bench("dlora.loadgen.bench_e2e:run_bench_e2e"))

    bm = bench.add_parser("migration", help="co-migration ILP solve time as the cluster grows")
    bm.add_argument(
        "--sizes",
        type=sizes,
        default="4x16x100,8x64x500,32x128x2000,128x1024x10000",
        help="WORKERSxADAPTERSxREQUESTS, comma-separated",
    )
    bm.add_argument("--time-limit", type=float, default=1.0, help="solver bound (s)")
    bm.add_argument("--json", help="write results here")
    bm.add_argument("--benchmarks", default="BENCHMARKS.md", help="file whose section is regenerated")
    bm.set_defaults(func=_bench("dlora.loadgen.bench_migration:run_bench_migration"))

    bk = bench.add_parser("cluster", help="round-robin vs proactive vs proactive + co-migration (paper Fig. 11)")
    bk.add_argument("--preset", choices=["tiny", "small"], default="small")
    bk.add_argument("--workers", type=int, default=2, help="one per core")
    bk.add_argument("--adapters", type=int, default=16)
    bk.add_argument("--requests", type=int, default=120)
    bk.add_argument("--rate", type=float, default=3.0)
    bk.add_argument("--cv", type=float, default=3.0, help="burstiness of arrivals")
    bk.add_argument("--shift-every", type=float, default=10.0, help="popularity rotates every this many seconds")
    bk.add_argument("--length-divide", type=float, default=4.0)
    bk.add_argument("--max-prompt", type=int, default=32)
    bk.add_argument("--max-output", type=int, default=96)
    bk.add_argument(
        "--kv-cache-mb", type=float, default=None, help="each worker's KV cache (MiB); unset: the worker default"
    )
    bk.add_argument("--max-seconds", type=float, default=120.0)
    bk.add_argument("--seed", type=int, default=0)
    bk.add_argument("--traces", default=str(data_dir()), help="folder of traces laid out as the bundled ones")
    bk.add_argument("--workdir", default=".cache/bench")
    bk.add_argument("--out", default="bench-results/cluster")
    bk.add_argument("--json", help="write results here")
    bk.add_argument("--benchmarks", default="BENCHMARKS.md", help="file whose section is regenerated")
    bk.set_defaults(func=_bench("dlora.loadgen.bench_cluster:run_bench_cluster"))

    bs = bench.add_parser(
        "simulate", help="the simulator's experiments: policy ablation, cluster dispatch, the regime map, validation"
    )
    bs.add_argument(
        "--experiment", choices=["policy", "cluster", "regime", "migration", "scale", "validate"], default="policy"
    )
    bs.add_argument(
        "--measured",
        default="bench-results/policy.json,bench-results/e2e.json",
        help="validate: `dlora bench policy` / `bench e2e` JSON whose runs are simulated, comma-separated",
    )
    bs.add_argument(
        "--profiles",
        default="dlora-artifact,h100-llama7b,h200-llama7b",
        help="cost profiles of the ablation (or calibrated:PATH)",
    )
    bs.add_argument("--strides", default="1,2,4,8,16,32")
    bs.add_argument("--policies", type=policies, default="dlora,mixed-only,merged-only,unmerged-only")
    bs.add_argument("--adapters", type=int, default=64, help="adapters in the ablation")
    bs.add_argument("--duration", type=float, default=60.0, help="seconds of arrivals per ablation run")
    bs.add_argument("--load", type=float, default=1.0, help="arrival rate as a fraction of unmerged capacity")
    bs.add_argument("--max-prompt", type=int, default=1024)
    bs.add_argument("--max-output", type=int, default=512)
    bs.add_argument("--replicas", type=int, default=32, help="replicas in the cluster experiment")
    bs.add_argument("--cluster-adapters", type=int, default=128)
    bs.add_argument(
        "--cluster-slots", default="128,16", help="device slots per replica, comma-separated: a run of each"
    )
    bs.add_argument("--cluster-duration", type=float, default=60.0)
    bs.add_argument("--cluster-profile", default="dlora-artifact", help="its cost profile (or calibrated:PATH)")
    bs.add_argument("--cluster-load", type=float, default=0.4, help="cluster arrivals as a fraction of capacity")
    bs.add_argument("--cv", type=float, default=3.0, help="cluster arrivals' burstiness (Gamma CV)")
    bs.add_argument("--shift-every", type=float, default=30.0, help="cluster popularity rotates this often (s)")
    bs.add_argument("--overheads", default="1.2,1.8,2.5", help="regime: unmerged iteration / merged one")
    bs.add_argument("--alphas", default="0.5,1,1.5,2", help="regime: Zipf exponents of adapter popularity")
    bs.add_argument("--loads", default="0.6,1.0,1.4", help="regime: arrival rates as fractions of unmerged capacity")
    bs.add_argument("--regime-duration", type=float, default=30.0, help="regime: seconds of arrivals per run")
    bs.add_argument("--migration-replicas", type=int, default=8, help="migration: replicas in its cluster")
    bs.add_argument("--migration-adapters", type=int, default=64)
    bs.add_argument("--migration-slots", default="8,64", help="migration: device slots per replica, a run of each")
    bs.add_argument("--migration-alphas", default="0.5,1,1.5", help="migration: Zipf exponents of popularity")
    bs.add_argument("--migration-loads", default="0.3,0.6", help="migration: arrival rates as fractions of capacity")
    bs.add_argument("--migration-duration", type=float, default=30.0, help="migration: seconds of arrivals per run")
    bs.add_argument(
        "--scale-bursty-requests", type=int, default=40000, help="scale: requests of its bursty run at 256 replicas"
    )
    bs.add_argument("--seed", type=int, default=0)
    bs.add_argument("--json", help="write results here")
    bs.add_argument("--benchmarks", default="BENCHMARKS.md", help="file whose section is regenerated")
    bs.set_defaults(func=_bench("dlora.loadgen.bench_sim:run_bench_simulate"))

    bc = bench.add_parser("control-plane", help="latency the gateway, NATS and dispatcher add; sustained rate")
    bc.add_argument("--requests", type=int, default=200)
    bc.add_argument("--seconds", type=float, default=10.0, help="length of the sustained-rate run")
    bc.add_argument("--concurrency", type=int, default=32)
    bc.add_argument("--json", help="write results here")
    bc.add_argument("--benchmarks", default="BENCHMARKS.md", help="file whose section is regenerated")
    bc.set_defaults(func=_bench("dlora.loadgen.bench_control_plane:run_bench_control_plane"))
    for parser in bench.choices.values():
        check_bench_numbers(parser)
