"""``dlora loadgen``: build a workload from the options, replay it open loop against the gateway or
NATS with a live progress bar, and write the report."""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from dlora.loadgen import arrivals, bundled, popularity, report, workload
from dlora.loadgen.clients import HttpClient, NatsClient
from dlora.loadgen.metrics import SLO, RequestResult, summarize, summarize_by_adapter
from dlora.loadgen.runner import Clock, replay
from dlora.loadgen.traces import (
    LLMRequestRow,
    RequestTrace,
    TenantSeries,
    TraceError,
    read_azure_functions,
    read_azure_llm,
    read_trace,
)


def load_traces(args: argparse.Namespace) -> tuple[RequestTrace | None, TenantSeries | None]:
    """The request trace and the popularity source among ``--trace``, each defaulting to a bundled
    one where the options need it.

    Raises:
        TraceError: a trace cannot be read, two of one kind are given, or one is given that no option uses.
    """
    needs_requests, needs_tenants = args.arrivals == "trace" or args.lengths == "trace", args.popularity == "stride"
    requests: RequestTrace | None = None
    tenants: TenantSeries | None = None
    if len(args.trace or []) > 1 and args.trace_format != "auto":
        raise TraceError(f"--trace-format {args.trace_format} applies to every --trace, and two traces are of two "
                         "kinds: leave it at auto to give a request trace and a popularity source")
    for path in args.trace or []:
        trace = read_trace(bundled.resolve(path), args.trace_format)
        if isinstance(trace, RequestTrace):
            if requests is not None:
                raise TraceError(f"{path}: a second request trace ({trace.format}); give at most one")
            if not needs_requests:
                raise TraceError(f"{path}: a request trace ({trace.format}), used only by --arrivals trace "
                                 "or --lengths trace")
            requests = trace
        else:
            if tenants is not None:
                raise TraceError(f"{path}: a second popularity source ({trace.format}); give at most one")
            if not needs_tenants:
                raise TraceError(f"{path}: a popularity source ({trace.format}), used only by --popularity stride")
            tenants = trace
    if requests is None and needs_requests:
        requests = read_azure_llm(bundled.path(bundled.AZURE_CONV))
    if tenants is None and needs_tenants:
        tenants = read_azure_functions(bundled.path(bundled.AZURE_FUNCTIONS))
    return requests, tenants


def build_specs(args: argparse.Namespace,
                traces: tuple[RequestTrace | None, TenantSeries | None] | None = None) -> list[workload.RequestSpec]:
    rng = np.random.default_rng(args.seed)
    n = args.requests
    trace, tenants = traces or load_traces(args)
    if args.arrivals == "trace":
        times = arrivals.replay([r.t for r in trace.rows[:n]], rate=args.rate)
    else:
        times = arrivals.gamma(args.rate, 1.0 if args.arrivals == "poisson" else args.cv, n, rng)
    if args.lengths == "trace":
        rows = trace.rows
        scaling = workload.LengthScaling(args.length_divide, args.max_prompt, args.max_output)
    else:
        scaling = workload.LengthScaling()
        if args.lengths == "fixed":
            rows = [LLMRequestRow(0.0, args.prompt_len, args.output_len)]
        else:
            rows = [LLMRequestRow(0.0, int(p), int(o)) for p, o in zip(rng.integers(1, args.prompt_len + 1, 1000),
                                                                         rng.integers(1, args.output_len + 1, 1000))]
    names: list[str | None] = ([None if a == "-" else a for a in args.adapter_names.split(",")]
                               if args.adapter_names else [f"lora-{i}" for i in range(args.adapters)])
    k = len(names)
    if args.popularity == "stride":
        # The Azure Functions sample's one timer function carries 63 % of all invocations: clipped
        # to the k-th largest so even stride 1 is not dominated by it. ServeGen's skew is kept.
        cap = k if tenants.format == "azure-functions" else None
        weights = popularity.tenants(tenants, k, args.stride, cap_rank=cap, window_s=args.tenant_window)
    else:
        weights = {
            "uniform": lambda: popularity.uniform(k),
            "zipf": lambda: popularity.zipf(k, args.alpha),
            "power": lambda: popularity.power(k, args.alpha),
        }[args.popularity]()
    return workload.build(times, weights, rows, rng, scaling, names=names, shift_every_s=args.shift_every,
                          lengths_in_order=args.arrivals == "trace" and args.lengths == "trace",
                          block_tokens=trace.block_tokens if args.lengths == "trace" else None)


async def run(args: argparse.Namespace, console: Console) -> dict:
    traces = load_traces(args)
    if traces[0] is not None and traces[0].skipped:
        console.print(f"trace: skipped {traces[0].skipped} failed requests (no response tokens)")
    specs = build_specs(args, traces)
    clock = Clock()
    client = (await NatsClient.connect(args.target, clock) if args.target.startswith("nats://")
              else HttpClient(args.target, args.base_model, clock))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGINT, stop.set)
    progress = Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                        TimeElapsedColumn(), console=console, disable=not console.is_terminal)
    task = progress.add_task("sending", total=len(specs))

    def on_update(results: list[RequestResult]) -> None:
        done = sum(r.completed for r in results)
        failed = sum(r.error is not None for r in results)
        tokens = sum(r.tokens for r in results)
        progress.update(task, completed=done + failed,
                        description=f"{tokens / max(clock(), 1e-9):7.1f} tok/s  errors {failed}")

    try:
        with progress:
            results, end = await replay(specs, client, clock, args.duration, stop, on_update=on_update)
    finally:
        loop.remove_signal_handler(signal.SIGINT)
        await client.close()
    slo = SLO(args.slo_ttft, args.slo_tpot)
    summary = summarize(results, end, slo)
    by_adapter = summarize_by_adapter([r for r in results if r.sent], end, slo)
    config = {k: v for k, v in vars(args).items() if k != "func"} | {"interrupted": stop.is_set()} | {
        f"{kind}_format": t.format for kind, t in zip(("request_trace", "popularity_source"), traces) if t is not None
    } | ({"request_trace_skipped_rows": traces[0].skipped} if traces[0] is not None else {})
    report.write(Path(args.out), config, summary, by_adapter, results, end, console)
    return summary


def run_loadgen(args: argparse.Namespace) -> int:
    console = Console(stderr=True)
    if not console.is_terminal:  # a log or a pipe: room for the whole table
        console = Console(stderr=True, width=160)
    try:
        summary = asyncio.run(run(args, console))
    except (TraceError, ValueError, OSError) as e:
        print(f"dlora loadgen: {e}", file=sys.stderr)
        return 2
    console.print(f"lost requests: {summary['lost']}  ->  {args.out}/result.json, report.png, report.html")
    return 0 if summary["lost"] == 0 and summary["failed"] == 0 else 1
