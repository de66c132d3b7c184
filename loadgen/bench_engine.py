"""``dlora bench engine``: decode throughput of base, merged and unmerged LoRA, and switch costs.

Every point runs on one engine: ``batch`` requests are prefilled (untimed), then ``steps`` decode
steps are timed. Decisions are given to ``step()`` directly, so the mode is exactly the one named.
The three ratios the engine issue sets as targets are computed from points of the same run.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from dlora.common.messages import SamplingParams
from dlora.loadgen.bench_common import ensure_model, machine, save, today
from dlora.loadgen.bench_engine_report import markdown, plot, projected_ratio  # noqa: F401 - the bench's API
from dlora.loadgen.step_phases import timed_phases
from dlora.services.worker.engine import EngineConfig, LLMEngine
from dlora.services.worker.policy import StepDecision, lora_work

if TYPE_CHECKING:
    from dlora.loadgen.baselines import HFPeftServer

PROMPT_LEN = 32


@dataclass
class Point:
    mode: str  # base | merged | unmerged | mixed (three quarters of the batch on the merged adapter)
    adapters: int  # distinct adapters in the batch (0 for base)
    batch: int
    step_ms: float  # median decode step
    tokens_per_s: float
    lora_bytes: int  # adapter weight bytes the unmerged step reads
    # The LoRA work the step ran (``policy.lora_work``): what the simulator's calibrated profile
    # fits the LoRA cost to (``sim.cost.calibrated``).
    lora_segments: int = 0
    lora_rank_tokens: int = 0


def weight_bytes(engine: LLMEngine) -> int:
    w = engine.merger.weights
    tensors = [w.lm_head, w.norm] + [t for lw in w.layers for t in vars(lw).values() if t is not None]
    return sum(t.nbytes for t in tensors)


def _start(
    engine: LLMEngine, adapters: list[str | None], merged: str | None, steps: int, prefix: str = "b"
) -> StepDecision:
    """One request per entry of ``adapters`` (ids ``prefix`` and a number), prefilled and one decode
    step in (untimed)."""
    ids = [f"{prefix}{i}" for i in range(len(adapters))]
    for rid, name in zip(ids, adapters):
        engine.add_request(
            rid,
            prompt_token_ids=[(7 * i + 3) % 500 for i in range(PROMPT_LEN)],
            params=SamplingParams(max_tokens=steps + 3, ignore_eos=True),
            adapter=name,
        )
    # With others beside the merged adapter's requests, a mixed step (else they would not run).
    mixed = merged is not None and any(a != merged for a in adapters)
    decision = StepDecision(merged=merged, request_ids=ids, mixed=mixed)
    engine.step(decision)  # prefill
    engine.step(decision)  # first decode warms caches
    return decision


def _stop(engine: LLMEngine, decision: StepDecision) -> None:
    for rid in decision.request_ids:
        engine.abort(rid)


def measure(
    engine: LLMEngine, adapters: list[str | None], merged: str | None, steps: int, phases: dict | None = None
) -> float:
    """Median seconds of one decode step with one request per entry of ``adapters``.

    The median, not the mean: on a shared 2-core machine a single descheduled step would
    otherwise decide a ratio. Each step ends when its tokens are on the host, so on a GPU the
    time is the step's wall time, kernels included. ``phases``: filled with the timed steps' mean
    milliseconds per phase (``timed_phases``)."""
    decision = _start(engine, adapters, merged, steps)
    times = []
    with timed_phases(engine) if phases is not None else contextlib.nullcontext({}) as spent:
        for _ in range(steps):
            start = time.perf_counter()
            engine.step(decision)
            times.append(time.perf_counter() - start)
    if phases is not None:
        phases.update({k: v * 1e3 / steps for k, v in spent.items()})
    _stop(engine, decision)
    return statistics.median(times)


def copy_once_ms(engine: LLMEngine, adapter: str) -> float:
    """Milliseconds to copy once, on the device, every weight row a merge of ``adapter`` rewrites:
    the yardstick issue 15 sets a merge against (at most twice this)."""
    import torch

    def sync() -> None:
        if engine.device.type == "cuda":
            torch.cuda.synchronize(engine.device)

    views = engine.merger.touched(engine.adapters[adapter])
    for v in views:  # untimed: the allocator's first request for these sizes
        v.clone()
    sync()
    start = time.perf_counter()
    copies = [v.clone() for v in views]
    sync()
    del copies
    return (time.perf_counter() - start) * 1e3


def lora_tax(engine: LLMEngine, adapter: str, batch: int, pairs: int) -> dict[str, float]:
    """One unmerged adapter against the base at ``batch``, step by step: a base batch and an
    adapter batch held at once, their steps alternating (the order flipped every pair) so a slow
    spell of a shared machine hits both alike; medians of each side and of the pairs' ratios."""
    base = _start(engine, [None] * batch, None, pairs + 2, "base")
    lora = _start(engine, [adapter] * batch, None, pairs + 2, "lora")
    times: dict[int, list[float]] = {0: [], 1: []}
    for i in range(pairs):
        for side in (0, 1) if i % 2 == 0 else (1, 0):
            start = time.perf_counter()
            engine.step((base, lora)[side])
            times[side].append(time.perf_counter() - start)
    _stop(engine, base)
    _stop(engine, lora)
    base_ms, lora_ms = statistics.median(times[0]) * 1e3, statistics.median(times[1]) * 1e3
    pairwise = statistics.median(b / u for b, u in zip(times[0], times[1]))
    return {"batch": batch, "pairs": pairs, "base_ms": base_ms, "unmerged_ms": lora_ms, "ratio_of_pairs": pairwise}


# CUDA runtime / driver calls that start GPU work, as the profiler names them.
LAUNCH_CALLS = ("cudaLaunchKernel", "cuLaunchKernel", "cudaGraphLaunch", "cudaLaunchCooperativeKernel")


def profile_step(engine: LLMEngine, adapters: list[str | None], merged: str | None, steps: int) -> dict:
    """Per decode step, under torch.profiler: GPU kernels launched and their summed time (CUDA),
    or on a CPU the operators dispatched (aten ops not inside another aten op), the launches a
    GPU would see. Wall time is not taken from here (the profiler slows the host)."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    decision = _start(engine, adapters, merged, steps)
    cuda = engine.device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        for _ in range(steps):
            engine.step(decision)
    _stop(engine, decision)
    if cuda:
        events = prof.key_averages()
        kernels = [e for e in events if e.device_type == DeviceType.CUDA]
        # What the host paid for: runtime and driver launch calls, a graph's replay counting one.
        calls = [e for e in events if e.device_type == DeviceType.CPU and e.key.startswith(LAUNCH_CALLS)]
        return {
            "launches_per_step": sum(e.count for e in kernels) / steps,
            "kernel_ms_per_step": sum(e.self_device_time_total for e in kernels) / 1e3 / steps,
            "host_launch_calls_per_step": sum(e.count for e in calls) / steps,
        }

    def nested(e: object) -> bool:
        parent = getattr(e, "cpu_parent", None)
        while parent is not None:
            if parent.name.startswith("aten::"):
                return True
            parent = parent.cpu_parent
        return False

    ops = [e for e in prof.events() if e.name.startswith("aten::") and not nested(e)]
    return {"launches_per_step": len(ops) / steps, "kernel_ms_per_step": None}


def hf_step_ms(server: HFPeftServer, adapter: str, batch: int, steps: int) -> float:
    """transformers + peft (``server``, the same model and adapter): milliseconds per decode step at
    ``batch``, as (generate of steps + 1 tokens - generate of 1 token) / steps, so the prefill cancels."""
    prompts = [[(7 * i + 3) % 500 for i in range(PROMPT_LEN)]] * batch
    server.generate(adapter, prompts, 2)  # warm up

    def timed(n: int) -> float:
        start = time.perf_counter()
        server.generate(adapter, prompts, n)
        return time.perf_counter() - start

    return (
        (statistics.median(timed(steps + 1) for _ in range(3)) - statistics.median(timed(1) for _ in range(3)))
        / steps
        * 1e3
    )


def run(
    preset: str,
    batch_sizes: list[int],
    adapter_counts: list[int],
    steps: int,
    rounds: int,
    dtype: str,
    workdir: Path,
    device: str = "cpu",
    profile: bool = False,
    hf_baseline: bool = False,
    enforce_eager: bool = False,
    async_scheduling: bool = False,
) -> dict:
    max_adapters = max(adapter_counts)
    root = ensure_model(workdir, preset, max_adapters, ranks=[16])  # one rank: simple byte accounting
    engine = LLMEngine(
        str(root / "model"),
        EngineConfig(
            dtype=dtype,
            device=device,
            max_loras=max_adapters,
            max_num_seqs=max(batch_sizes),
            kv_cache_bytes=1 << 30,
            enforce_eager=enforce_eager,
            async_scheduling=async_scheduling,
        ),
    )
    names = [f"lora-{i}" for i in range(max_adapters)]
    for name in names:
        engine.register_adapter(name, root / "adapters" / name)
    points: list[Point] = []

    def add(mode: str, n: int, in_batch: list[str | None], merged: str | None, seconds: float, lora_bytes: int) -> None:
        batch = len(in_batch)
        ranks = {a: engine.adapters[a].rank for a in {*in_batch, merged} if a is not None}
        segments, rank_tokens = lora_work([(a, 1) for a in in_batch], merged, ranks)
        points.append(Point(mode, n, batch, seconds * 1e3, batch / seconds, lora_bytes, segments, rank_tokens))
        print(
            f"{mode:>9} adapters={n:<3} batch={batch:<3} step={seconds * 1e3:8.2f} ms  {batch / seconds:9.1f} tok/s",
            flush=True,
        )

    measure(engine, [None] * max(batch_sizes), None, steps)  # warm up allocator and thread pool
    for batch in batch_sizes:
        configs: list[tuple[str, int, list[str | None], str | None]] = [
            ("base", 0, [None] * batch, None),
            ("merged", 1, [names[0]] * batch, names[0]),
        ]
        configs += [("unmerged", n, [names[i % n] for i in range(batch)], None) for n in adapter_counts]
        if batch >= 4 and max_adapters >= 2:  # a mixed step: the merged adapter's quarter of the batch is others'
            others = min(8, max_adapters) - 1
            hot = 3 * batch // 4
            mix = [names[0]] * hot + [names[1 + i % others] for i in range(batch - hot)]
            configs.append(("mixed", len(set(mix)), mix, names[0]))
        # Rounds interleave the configurations, so a slow spell of the machine hits all of them.
        samples: dict[int, list[float]] = {i: [] for i in range(len(configs))}
        for _ in range(rounds):
            for i, (_, _, in_batch, merged) in enumerate(configs):
                samples[i].append(measure(engine, in_batch, merged, steps))
        for i, (mode, n, in_batch, merged) in enumerate(configs):
            lora_bytes = 0
            if mode == "unmerged":
                lora_bytes = sum(engine.adapters[a].nbytes for a in set(in_batch)) * engine.dtype.itemsize // 4
            add(mode, n, in_batch, merged, statistics.median(samples[i]), lora_bytes)

    # Switches as the engine pays them (A and B from a device slot where the adapter has one, as
    # the unmerged points above left these), after one untimed round that warms the allocator.
    cycled = names[:5]
    for name in cycled:
        engine.switch(name)
        engine.switch(None)
    merge_ms, unmerge_ms, copy_ms = [], [], []
    for name in cycled:
        merge_s, _ = engine.switch(name)
        _, unmerge_s = engine.switch(None)
        merge_ms.append(merge_s * 1e3)
        unmerge_ms.append(unmerge_s * 1e3)
        copy_ms.append(copy_once_ms(engine, name))

    profiled: dict[str, dict] = {}
    if profile:  # at batch 32 (or the largest below it): where a GPU step's time goes
        batch = max([b for b in batch_sizes if b <= 32] or batch_sizes[:1])
        for label, in_batch, merged in (
            ("base", [None] * batch, None),
            ("unmerged, 1 adapter", [names[0]] * batch, None),
            (f"unmerged, {max_adapters} adapters", [names[i % max_adapters] for i in range(batch)], None),
        ):
            phases: dict[str, float] = {}
            profiled[label] = {"batch": batch, **profile_step(engine, in_batch, merged, steps)}
            profiled[label]["wall_ms_per_step"] = measure(engine, in_batch, merged, steps, phases) * 1e3
            profiled[label]["host_phases_ms"] = phases
    hf: dict[str, float] = {}
    if hf_baseline:
        import torch

        from dlora.loadgen.baselines import HFPeftServer

        # One load for both batch sizes: at 7B widths a load is seconds of a GPU check's budget.
        dt = getattr(torch, dtype)
        server = HFPeftServer(root / "model", {names[0]: root / "adapters" / names[0]}, device=device, dtype=dt)
        for batch in sorted({1, min(32, max(batch_sizes))}):
            hf[f"batch {batch}"] = hf_step_ms(server, names[0], batch, steps)

    # The LoRA tax at batch 32 (or the largest below it), step by step: the per-point medians above
    # move by more than the tax on a shared machine.
    tax_batch = max([b for b in batch_sizes if b <= 32] or batch_sizes[:1])
    tax = lora_tax(engine, names[0], tax_batch, max(20, steps * rounds))
    base_bytes = weight_bytes(engine)
    by = {(p.mode, p.adapters, p.batch): p for p in points}
    ratios = {
        f"unmerged 1 adapter/base @batch {tax_batch}, steps interleaved pairwise (target >= 0.95)": tax[
            "ratio_of_pairs"
        ]
    }
    for batch in batch_sizes:
        base = by[("base", 0, batch)]
        ratios[f"merged/base throughput @batch {batch} (target >= 0.97)"] = (
            by[("merged", 1, batch)].tokens_per_s / base.tokens_per_s
        )
        if ("unmerged", 1, batch) in by:
            ratios[f"unmerged 1 adapter/base throughput @batch {batch} (target >= 0.90)"] = (
                by[("unmerged", 1, batch)].tokens_per_s / base.tokens_per_s
            )
    ratios["merge / one copy of the rows it rewrites (target <= 2.0 on CUDA)"] = sum(merge_ms) / sum(copy_ms)
    many = max(adapter_counts)
    for batch in batch_sizes:
        p = by.get(("unmerged", many, batch))
        if p is not None and batch >= 32:
            explained = by[("base", 0, batch)].step_ms * (base_bytes + p.lora_bytes) / base_bytes
            ratios[f"unmerged {many} adapters step / bytes-explained @batch {batch} (target <= 1.15)"] = (
                p.step_ms / explained
            )
    return {
        "machine": machine(engine.device),
        "date": today(),
        "preset": preset,
        "num_layers": engine.model_config.num_layers,
        "device": str(engine.device),
        "dtype": dtype,
        "cuda_graphs": engine.graphs is not None,
        "async_scheduling": engine.config.async_scheduling,  # (it changes how steps run: said, as graphs are)
        "prompt_len": PROMPT_LEN,
        "timed_decode_steps": steps,
        "rounds": rounds,
        "base_weight_bytes": base_bytes,
        "merge_ms": sum(merge_ms) / len(merge_ms),
        "unmerge_ms": sum(unmerge_ms) / len(unmerge_ms),
        "copy_once_ms": sum(copy_ms) / len(copy_ms),
        "points": [asdict(p) for p in points],
        "lora_tax": tax,
        "ratios": ratios,
        "profile": profiled,
        "hf_peft_step_ms": hf,
    }


TITLE = "Engine decode throughput (`dlora bench engine`)"


def run_bench_engine(args: argparse.Namespace) -> int:
    from dlora.services.worker.engine.device import resolve_device

    try:  # before a model is made: a device or dtype this machine cannot run on is a usage error
        resolve_device(args.device, args.dtype)
    except ValueError as e:
        print(f"dlora bench engine: {e}", file=sys.stderr)
        return 2
    result = run(
        preset=args.preset,
        batch_sizes=[int(b) for b in args.batch_sizes.split(",")],
        adapter_counts=[int(a) for a in args.adapters.split(",")],
        steps=args.steps,
        rounds=args.rounds,
        dtype=args.dtype,
        workdir=Path(args.workdir),
        device=args.device,
        profile=args.profile,
        hf_baseline=args.hf_baseline,
        enforce_eager=args.enforce_eager,
        async_scheduling=args.async_scheduling,
    )
    print(f"merge {result['merge_ms']:.2f} ms, unmerge {result['unmerge_ms']:.2f} ms")
    for name, value in result["ratios"].items():
        print(f"{value:6.3f}  {name}")
    save(result, args.json, args.benchmarks, "engine", TITLE, markdown(result), plot=plot)
    return 0
