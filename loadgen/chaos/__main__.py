"""``python -m dlora.loadgen.chaos`` (``make chaos``): every fault in turn under load; the results
as JSON, a table on the terminal and a section of BENCHMARKS.md with its plot (docs/bench-chaos.png).
Exit status 1 if any fault failed its checks."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path
from typing import Any

from dlora.loadgen.chaos.phases import Timing
from dlora.loadgen.chaos.report import code_version, failure_lines, plot, table, version_text
from dlora.loadgen.chaos.run import ChaosConfig, run_chaos
from dlora.loadgen.chaos.stack import demo_model
from dlora.loadgen.chaos.traffic import LoadShape


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m dlora.loadgen.chaos", description=__doc__)
    p.add_argument("--faults", help="comma-separated fault names (default: all; a wrong name lists them)")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--heartbeat-ttl", type=float, default=5.0, help="s (the services' default)")
    p.add_argument("--rate", type=float, default=1.5, help="load, requests/s (Poisson)")
    p.add_argument("--probes", type=int, default=3, help="probe streams per fault")
    p.add_argument("--probe-tokens", type=int, default=96)
    p.add_argument("--lead", type=float, default=4.0, help="s of load before each fault")
    p.add_argument("--tail", type=float, default=6.0, help="s of load after each fault")
    p.add_argument("--workdir", default="bench-results/chaos", help="logs and server data, per run")
    p.add_argument("--json", default="bench-results/chaos.json")
    p.add_argument("--benchmarks", default="BENCHMARKS.md", help="file whose chaos section is rewritten ('' for none)")
    p.add_argument("--from-json", help="no run: the table and the BENCHMARKS.md section from an earlier run's JSON")
    return p


def section(result: dict[str, Any]) -> str:
    cfg = result["config"]
    load = cfg["load"]
    lines = [
        f"Measured on {result['machine']}, {result['date']}. The stack as separate processes (nats-server "
        f"with JetStream, redis-server, dispatcher, migrator, {cfg['workers']} workers with one torch thread "
        f"each, gateway) on the tiny demo model; heartbeat TTL {cfg['heartbeat_ttl_s']:g} s. Load through the "
        f"gateway: {load['rate']:g} req/s Poisson, greedy, streamed, {load['output_tokens'][0]}-"
        f"{load['output_tokens'][1]} output tokens, over the base model and {len(cfg['adapters'])} adapters, "
        f"plus {cfg['timing']['probes']} probes of {cfg['probe_tokens']} tokens per fault compared with the "
        f"offline oracle; the client retries as the openai package does ({cfg['client_retries']} retries on "
        f"429/503/refused, honouring Retry-After). Code: {version_text(result.get('code'))}. "
        f"Overall: **{'pass' if result['passed'] else 'fail'}**.",
        "",
        *table(result["phases"]),
        "",
        "Columns: *completed* = HTTP 200, every token asked for, a finish reason and `[DONE]`, no error "
        "event; *via killed gateway* = in flight on the gateway when it was killed or sent while it was "
        "down (outside the sent = completed check); *probes exact* = text equal to the offline oracle's; "
        "*resumed* = requests a second attempt continued (recovery); *generated twice* = requests whose "
        "chunks, as read off the bus (`dlora.reply.>`), show an attempt publishing after a later attempt "
        "had begun, or a later attempt generating more than the one chunk a takeover may repeat (the same "
        "chunk sent again by its own attempt, as workers do after a NATS reconnect, is counted apart in "
        "the JSON as re-sent); "
        "*longest stall* = longest gap between two events of a completed stream; *recovery* = from the "
        "fault until what it stopped is back, /healthz is 200 with every worker and a request to the "
        "base model and one to an adapter both complete; *steady after* = every process up, every worker "
        "live and idle, no `dlora:inflight:*` key left.",
    ]
    notes = failure_lines(result["phases"])
    if notes:
        lines += ["", "What failed, per fault:", "", *notes]
    return "\n".join(lines)


TITLE = "Chaos: faults under load (`make chaos`)"


def write_benchmarks(result: dict[str, Any], benchmarks: Path) -> None:
    """The chaos section of ``benchmarks``, ending with its plot (``docs/bench-chaos.png`` beside it)."""
    from dlora.loadgen.bench_common import embed_plot, write_section

    write_section(benchmarks, "chaos", TITLE, embed_plot(section(result), result, plot, benchmarks, "chaos"))


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    from dlora.loadgen.bench_common import machine
    from dlora.loadgen.chaos.run import pick_faults

    if args.from_json:
        result = json.loads(Path(args.from_json).read_text())
        print("\n".join(table(result["phases"]) + failure_lines(result["phases"])))
        if args.benchmarks:
            write_benchmarks(result, Path(args.benchmarks))
        return 0 if result["passed"] else 1

    faults = args.faults.split(",") if args.faults else None
    try:
        pick_faults([f"worker-{i}" for i in range(args.workers)], faults)
    except ValueError as e:
        print(f"chaos: {e}", file=sys.stderr)
        return 2
    model, adapters = demo_model()
    cfg = ChaosConfig(
        workdir=Path(args.workdir) / time.strftime("%Y%m%d-%H%M%S"),
        model=model,
        adapters=adapters,
        workers=args.workers,
        heartbeat_ttl_s=args.heartbeat_ttl,
        faults=faults,
        shape=LoadShape(rate=args.rate),
        timing=Timing(lead_s=args.lead, tail_s=args.tail, probes=args.probes),
        probe_tokens=args.probe_tokens,
    )
    version = code_version()
    result = asyncio.run(run_chaos(cfg, machine()))
    result["code"] = version
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    print("\n".join(table(result["phases"])))
    for line in failure_lines(result["phases"]):
        print(line)
    if args.benchmarks:
        write_benchmarks(result, Path(args.benchmarks))
    print(f"{'all faults passed' if result['passed'] else 'some faults FAILED'}; details in {args.json}")
    return 0 if result["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
