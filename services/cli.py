"""The ``dlora`` console script: one entry point, one subcommand per job."""

from __future__ import annotations

import argparse
import errno
import importlib
import os
import socket
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from dlora.services.bench_options import check_bench_numbers, policies, sizes


def _lazy(target: str) -> Callable[[argparse.Namespace], int]:
    """A subcommand that imports its module only when run: ``dlora --help`` stays quick and
    services do not load torch for nothing."""

    def run(args: argparse.Namespace) -> int:
        module, name = target.split(":")
        return getattr(importlib.import_module(module), name)(args)

    return run


def _bench(target: str) -> Callable[[argparse.Namespace], int]:
    """A ``dlora bench`` subcommand (``_lazy``) whose output paths are checked before it runs: most
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
        return _lazy(target)(args)

    return run


def _model_make_tiny(args: argparse.Namespace) -> int:
    from dlora.model.make_tiny import make_tiny

    try:
        out = make_tiny(
            args.out, preset=args.preset, arch=args.arch, num_adapters=args.adapters, ranks=args.ranks, seed=args.seed
        )
    except (ValueError, OSError) as e:  # a rank past what serving loads, an --out that cannot be written
        print(f"dlora model make-tiny: {e}", file=sys.stderr)
        return 2
    adapters = f" and {len(out.adapters)} adapters under {out.adapters_dir}" if out.adapters else ""
    print(f"wrote {out.model}{adapters}")
    return 0


class _Parser(argparse.ArgumentParser):
    """A parser whose subcommands' ``--help`` opens with the line its parent lists them by (argparse
    shows ``help`` only there: ``dlora up --help`` said nothing of what it does, where ``vllm serve``'s does)."""

    def add_subparsers(self, **kwargs: Any) -> Any:
        action = super().add_subparsers(**kwargs)
        add = action.add_parser
        action.add_parser = lambda name, **kw: add(name, **{"description": kw.get("help"), **kw})
        return action

    # Adds this parser's arguments when it first parses (its --help too): see "simulate"
    later: Callable[[argparse.ArgumentParser], None] | None = None

    def parse_known_args(self, args: Any = None, namespace: Any = None) -> Any:
        # (argparse parses a chosen subcommand with that parser's own parse_known_args)
        if self.later is not None:
            add, self.later = self.later, None
            add(self)
        return super().parse_known_args(args, namespace)


def build_parser() -> argparse.ArgumentParser:
    from dlora.loadgen.bundled import data_dir
    from dlora.loadgen.options import count, positive, ranks

    p = _Parser(prog="dlora", description="Serve many LoRA adapters on one base model.")
    sub = p.add_subparsers(dest="command", required=True)

    model = sub.add_parser("model", help="model utilities").add_subparsers(dest="model_command", required=True)
    tiny = model.add_parser("make-tiny", help="write a random Llama-family model and PEFT adapters (offline)")
    tiny.add_argument("--out", required=True, help="directory to write (model/ and adapters/ inside)")
    tiny.add_argument("--preset", choices=["tiny", "small", "7b"], default="tiny")
    tiny.add_argument("--arch", choices=["llama", "qwen2"], default="llama")
    tiny.add_argument("--adapters", type=count, default=4, help="number of adapters")
    tiny.add_argument(
        "--ranks", type=ranks, default="8,16,32", help="ranks, cycled over the adapters (at most 512: max_lora_rank)"
    )
    tiny.add_argument("--seed", type=int, default=0)
    tiny.set_defaults(func=_model_make_tiny)

    gen = sub.add_parser(
        "generate",
        help="offline batch generation from a JSONL file",
        # the line format was in the README alone: --help said "JSONL requests"
        description="Serve each line of --input, write one result line each, in input order. A line: "
        '{"id", "adapter": NAME or null, "prompt" or "prompt_token_ids" or "messages", "max_tokens", '
        '"n", ...any SamplingParams field}. A result: {"id", "token_ids", "text", "finish_reason", '
        '"stop_reason"} ({"id", "outputs": [...]} for n > 1), or {"id", "error"} for a line that '
        "cannot be served (the others are; exit status 1).",
    )
    gen.add_argument("--model", required=True, help="Hugging Face model directory")
    gen.add_argument("--lora", action="append", default=[], metavar="NAME=DIR", help="adapter to register")
    gen.add_argument("--input", required=True, help="JSONL requests, one a line")
    gen.add_argument("--output", required=True, help="JSONL results, one a line")
    gen.add_argument(
        "--mode",
        choices=["merged", "unmerged", "mixed", "dlora"],
        default="unmerged",
        help="merged / unmerged / mixed: that mode only (FCFS); dlora: chosen per step (default %(default)s)",
    )
    gen.add_argument(
        "--dtype",
        choices=["auto", "float32", "bfloat16", "float16"],
        default="auto",
        help="auto: bfloat16 on a GPU, float32 on a CPU",
    )
    gen.add_argument("--device", default="auto", help="cpu, cuda, cuda:1; auto: the first GPU if any, else cpu")
    gen.add_argument("--max-loras", type=int, default=8, help="device adapter slots")
    gen.set_defaults(func=_lazy("dlora.services.worker.engine.offline:run_generate"))

    lg = sub.add_parser("loadgen", help="replay a workload open loop against the gateway or NATS; report")
    from dlora.loadgen.options import add_arguments

    add_arguments(lg)
    lg.set_defaults(func=_lazy("dlora.loadgen.main:run_loadgen"))

    sim = sub.add_parser("simulate", help="a workload through a simulated cluster: the real cores, a cost model")
    # its options import the cost model (numpy): ~1 s of every `dlora serve` (a gateway's restart), unused
    sim.later = lambda p: importlib.import_module("dlora.sim.options").add_arguments(p)
    sim.set_defaults(func=_lazy("dlora.sim.main:run_simulate"))

    serve = sub.add_parser(
        "serve", help="run one service (settings from --config or $DLORA_CONFIG, and DLORA_* variables)"
    )
    serve.add_argument("service", choices=["gateway", "dispatcher", "worker", "migrator"])
    serve.add_argument("--config", help="settings file (dlora.toml; default $DLORA_CONFIG, else none is read)")
    serve.add_argument("--model", help="base model directory (gateway, worker)")
    serve.add_argument("--port", type=int, help="gateway port (gateway)")
    serve.add_argument("--worker-id", help="worker id, a NATS subject token (worker)")
    serve.set_defaults(func=_serve)

    dep = sub.add_parser("deploy", help="install dlora under systemd on this host (deploy/README.md), or remove it")
    dep_sub = dep.add_subparsers(dest="deploy_command", required=True)
    for name, text in (
        ("install", "user, directories, venv, units, /etc/dlora/dlora.toml if absent"),
        ("uninstall", "remove what install added, nothing else"),
    ):
        d = dep_sub.add_parser(name, help=text)
        d.add_argument(
            "--prefix",
            default="/",
            help="root to install under (not /: a tree whose units name paths in it; no user, no systemctl)",
        )
        d.add_argument("--venv", help="an existing virtualenv with dlora installed, instead of making one")
        d.add_argument("--dry-run", action="store_true", help="print the steps, change nothing")
    dep.set_defaults(func=_lazy("dlora.services.deploy:run"))

    upp = sub.add_parser("up", help="start the whole stack on this machine (NATS and Redis too, if not configured)")
    upp.add_argument(
        "--workers", type=positive, default=2, help="worker processes (default 2; several GPUs: one each, round robin)"
    )
    upp.add_argument("--model", help="base model directory (default: the tiny demo model, made if missing)")
    upp.add_argument("--lora", action="append", default=[], metavar="NAME=DIR", help="adapter to register")
    upp.add_argument("--port", type=int, help="gateway port (default: the gateway's port setting, 8000)")
    upp.add_argument("--config", help="settings file (dlora.toml; default $DLORA_CONFIG, else none is read)")
    upp.set_defaults(func=_up)

    keys = sub.add_parser("keys", help="inference API keys: create, list, revoke (on the deployment's Redis and NATS)")
    keys.add_argument("--config", help="dlora.toml (the [gateway] table's NATS and Redis settings)")
    keys_sub = keys.add_subparsers(dest="keys_command", required=True)
    kc = keys_sub.add_parser("create", help="make a key for a tenant; it is printed once, only its hash is kept")
    kc.add_argument("--tenant", required=True, help="who the key acts for (its adapters and the public ones)")
    kc.add_argument("--admin", action="store_true", help="also the admin scope: adapter and key administration")
    kc.add_argument("--rate", type=float, help="requests per second on average (0: none; unset: the gateway's)")
    kc.add_argument("--burst", type=int, help="requests in a burst above the rate (unset: the gateway's)")
    kc.add_argument("--concurrency", type=int, help="requests at once (0: none; unset: the gateway's)")
    kc.add_argument("--json", action="store_true", help="print the key and its record as JSON")
    kl = keys_sub.add_parser("list", help="every key: id, tenant, scopes, limits, revoked (never the key)")
    kl.add_argument("--json", action="store_true")
    kr = keys_sub.add_parser("revoke", help="revoke a key by its id (refused from then on, still listed)")
    kr.add_argument("id")
    for each in (kc, kl, kr):  # after the command too (`dlora keys list --config X`), as `dlora up --config X`
        each.add_argument("--config", default=argparse.SUPPRESS, help="dlora.toml (as before the command)")
    keys.set_defaults(func=_lazy("dlora.services.keys_cli:run_keys"))

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
    return p


def _serve(args: argparse.Namespace) -> int:
    from dlora.common import log
    from dlora.common.bus import ConnectionLost, CredentialsRefused, StoppedConnecting
    from dlora.common.settings import SettingsError, load, unknown_env, unread_config
    from dlora.services.config_file import SERVICES, check_config
    from dlora.services.run import StartupError, run_until_signalled
    from dlora.services.worker.engine.faults import DeviceLost

    overrides = {"model": args.model, "port": args.port, "worker_id": args.worker_id}
    cls = SERVICES[args.service]
    if unused := [k for k, v in overrides.items() if v is not None and k not in cls.__struct_fields__]:
        flags = ", ".join(f"--{k.replace('_', '-')}" for k in unused)  # dropped without a word, as if taken
        print(f"dlora serve {args.service}: not a setting of the {args.service}: {flags}", file=sys.stderr)
        return 2
    for said in unknown_env(os.environ, SERVICES).values():  # warned, not refused: another tool's may be about
        print(f"dlora serve {args.service}: warning: {said}", file=sys.stderr)
    for said in unread_config(args.config):
        print(f"dlora serve {args.service}: warning: {said}", file=sys.stderr)
    try:
        check_config(args.config)
        settings = load(
            cls, args.service, args.config, overrides={k: v for k, v in overrides.items() if k in cls.__struct_fields__}
        )
    except SettingsError as e:
        print(f"dlora serve {args.service}: {e}", file=sys.stderr)
        return 2
    for name in ("nats_url", "redis_url"):  # left empty in the file `dlora deploy install` writes
        if not getattr(settings, name).strip():
            print(
                f"dlora serve {args.service}: {name} is not set (the settings file's top level, or "
                f"DLORA_{name.upper()}); only `dlora up` starts NATS and Redis itself",
                file=sys.stderr,
            )
            return 2
    log.configure(json=settings.log_json, level=settings.log_level)
    if args.service == "gateway":
        from dlora.services.gateway.main import serve
    elif args.service == "dispatcher":
        from dlora.services.dispatcher.main import serve
    elif args.service == "migrator":
        from dlora.services.migrator.main import serve
    else:
        from dlora.services.worker.main import serve
    try:
        run_until_signalled(serve, settings)
    except CredentialsRefused as e:
        print(f"dlora serve {args.service}: {e}", file=sys.stderr)
        return 2
    except StoppedConnecting as e:  # told to stop while waiting for NATS: a clean stop
        print(f"dlora serve {args.service}: {e}", file=sys.stderr)
        return 0
    except socket.gaierror as e:  # a host name that does not resolve: a traceback, and systemd's restarts
        print(f"dlora serve {args.service}: cannot resolve a host name: {e} (host, metrics_host)", file=sys.stderr)
        return 2
    except OSError as e:
        if e.errno not in (errno.EADDRINUSE, errno.EADDRNOTAVAIL, errno.EACCES) or "bind" not in str(e):
            raise
        print(f"dlora serve {args.service}: cannot listen: {e} (set another port or metrics_port)", file=sys.stderr)
        return 2
    except StartupError as e:
        print(f"dlora serve {args.service}: {e}", file=sys.stderr)
        return 2
    except ConnectionLost as e:  # a new process connects afresh
        print(f"dlora serve {args.service}: {e}; exiting to be restarted", file=sys.stderr)
        return 1
    except DeviceLost as e:  # its requests were handed over; a new process gets a new device context
        print(f"dlora serve {args.service}: the device failed for good ({e}); exiting to be restarted", file=sys.stderr)
        return 1
    return 0


def _up(args: argparse.Namespace) -> int:
    from dlora.common import log
    from dlora.services.up import up

    log.configure(json=False)
    return up(args.workers, args.model, args.lora, args.port, args.config)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
