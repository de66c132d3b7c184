"""``dlora bench policy``: the paper's Fig. 10 ablation on one replica.

The same workload (Gamma arrivals with CV 1 at a rate near the replica's saturation, Azure
conversation lengths scaled to fit, adapters by the stride mapping over Azure Functions
popularity, counts clipped at the n-th most popular function so stride 1 is near uniform) is
replayed in real time against an engine under each policy, for each stride, ``--repeats`` times
(rounds interleaved, so a slow spell of the machine hits every policy alike); each figure is the
median of the repeats, with their spread (min-max).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from dlora.common.messages import SamplingParams
from dlora.loadgen import bundled, workload
from dlora.loadgen.bench_common import ensure_model, figure, machine, save, today
from dlora.loadgen.metrics import RequestResult, summarize
from dlora.loadgen.spec import WorkloadSpec
from dlora.services.worker.engine import EngineConfig, LLMEngine
from dlora.services.worker.engine.stats import EngineStats
from dlora.services.worker.policy import PolicyConfig, StepDecision

if TYPE_CHECKING:
    from matplotlib.figure import Figure

# The figures each run gives, kept per repeat and summarized as median and spread.
METRICS = ("throughput_tok_s", "norm_latency_mean_s", "norm_latency_p90_s", "finished", "merges", "mixed_steps")


# lora-<i> is made at ADAPTER_RANKS[i % 3] for bench policy and bench e2e (``ensure_model``).
ADAPTER_RANKS = (8, 16, 32)


def engine_config(policy: str, num_adapters: int, dtype: str = "float32") -> EngineConfig:
    """The engine ``bench policy`` and ``bench e2e`` run (and ``bench simulate --experiment
    validate`` simulates): a device slot for every adapter."""
    return EngineConfig(
        dtype=dtype, policy=PolicyConfig(name=policy), max_loras=num_adapters, max_num_seqs=32, kv_cache_bytes=1 << 30
    )


def make_engine(root: Path, policy: str, num_adapters: int, dtype: str) -> LLMEngine:
    engine = LLMEngine(str(root / "model"), engine_config(policy, num_adapters, dtype))
    for i in range(num_adapters):
        engine.register_adapter(f"lora-{i}", root / "adapters" / f"lora-{i}")
    # A long-running worker has merged before: the first merge of a process costs several times
    # the next ones (1.4 s against 0.1-0.25 s for the small preset on this CPU: its saved rows
    # touch fresh memory), which would charge every policy that merges a start-up cost per run.
    engine.switch("lora-0")
    engine.switch(None)
    engine.stats = EngineStats()
    return engine


class StepLog:
    """The steps a loop ran, a row each (``dlora.sim.cost.STEP_FIELDS``): its shape and its cycle,
    the loop's seconds from its start to the next step's (what the loop did between, admissions
    included), or to its own end where the loop idles after it; its switches and adapter loads
    left out, as the simulator prices those apart, and CUDA graph recording, as the engine leaves
    it out of its steps. What ``dlora.sim.cost.from_steps`` fits a profile to."""

    def __init__(self, engine: LLMEngine) -> None:
        self.engine = engine
        self.rows: list[list[float]] = []
        self._open: list[float] | None = None  # the last step's row, its cycle's start in the last field
        self._began = (0.0, 0, 0.0)  # the running step's start: (seconds, steps and ``_aside`` before)

    def starting(self, now: float) -> None:
        """A step begins at ``now`` (seconds): the open cycle ends."""
        self._close(now)
        self._began = (now, self.engine.stats.steps, self._aside())

    def ran(self, now: float) -> None:
        """The step has run and its outputs were handled, at ``now``."""
        st, (began, steps, aside) = self.engine.stats, self._began
        if st.steps == steps:  # nothing could run
            return
        decode = st.last_fed - st.last_prefill
        # Its cycle begins once its switches, loads and graph recordings are done.
        self._open = [decode, st.last_prefill, st.last_batch - decode, *st.last_lora, began + self._aside() - aside]
        if not self.engine.has_unfinished():  # the loop idles next
            self._close(now)

    def _aside(self) -> float:
        """Seconds the engine spent so far on what a step's cycle leaves out."""
        return self.engine.stats.switch_and_load_seconds() + self.engine.stats.cuda_graph_seconds

    def _close(self, now: float) -> None:
        if self._open is not None:
            self._open[-1] = now - self._open[-1]
            self.rows.append(self._open)
            self._open = None


def replay(
    engine: LLMEngine, specs: list[workload.RequestSpec], max_seconds: float, log: StepLog | None = None
) -> tuple[list[RequestResult], float]:
    """Open loop: each request is added when its arrival time has passed, whatever is running;
    ``log`` records the steps."""
    # sent once added
    results = [RequestResult(s.arrival_s, s.adapter, s.output_len, prompt_len=s.prompt_len) for s in specs]
    start = time.perf_counter()
    nxt = 0
    vocab = engine.model_config.vocab_size
    while True:
        now = time.perf_counter() - start
        if now > max_seconds or (nxt == len(specs) and not engine.has_unfinished()):
            return results, now
        while nxt < len(specs) and specs[nxt].arrival_s <= now:
            s = specs[nxt]
            engine.add_request(
                str(nxt),
                prompt_token_ids=[(13 * nxt + 7 * j) % (vocab - 3) + 3 for j in range(s.prompt_len)],
                params=SamplingParams(max_tokens=s.output_len, ignore_eos=True),
                adapter=s.adapter,
            )
            results[nxt].sent = True
            nxt += 1
        if not engine.has_unfinished():
            time.sleep(max(0.0, min(specs[nxt].arrival_s - now, 0.05)))
            continue
        if log is not None:
            log.starting(time.perf_counter() - start)
        outputs = engine.step()
        t = time.perf_counter() - start
        for out in outputs:
            r = results[int(out.request_id)]
            r.tokens += len(out.new_token_ids)
            r.first_token_s = r.first_token_s if r.first_token_s is not None else t
            if out.finished:
                r.finish_s = t
        if log is not None:
            log.ran(time.perf_counter() - start)


def switch_ms(stats: list[EngineStats]) -> dict[str, float]:
    """Mean milliseconds of a merge and of an unmerge over the runs' engines (``merge_ms`` /
    ``unmerge_ms``, the keys the simulator's calibrated profile reads), those that ran."""
    out = {}
    for kind in ("merge", "unmerge"):
        count = sum(getattr(st, f"{kind}s") for st in stats)
        if count:
            out[f"{kind}_ms"] = 1e3 * sum(getattr(st, f"{kind}_seconds") for st in stats) / count
    return out


def saturation_rate(root: Path, num_adapters: int, dtype: str, mean_prompt: float, mean_output: float) -> float:
    """Requests/s one replica sustains unmerged across many adapters: a request costs its share of
    a prefill step of 8 prompts plus its output tokens' share of batch-32 decode steps."""
    engine = make_engine(root, "unmerged-only", num_adapters, dtype)
    prompt = max(1, round(mean_prompt))
    for i in range(32):
        engine.add_request(
            str(i),
            prompt_token_ids=[3 + i] * prompt,
            params=SamplingParams(max_tokens=12, ignore_eos=True),
            adapter=f"lora-{i % num_adapters}",
        )
    ids = [str(i) for i in range(32)]
    t0 = time.perf_counter()
    engine.step(StepDecision(None, ids[:8]))
    prefill = time.perf_counter() - t0
    engine.step(StepDecision(None, ids))  # the other 24 prefill
    engine.step(StepDecision(None, ids))
    t0 = time.perf_counter()
    for _ in range(8):
        engine.step(StepDecision(None, ids))
    decode = (time.perf_counter() - t0) / 8
    return 1.0 / (prefill / 8 + mean_output * decode / 32)


def workload_spec(args: argparse.Namespace) -> WorkloadSpec:
    """The ablation's workload, less its rate and stride (set per run): Poisson arrivals (Gamma CV
    1), Azure conversation lengths scaled to fit, adapters by the stride mapping over the Azure
    Functions popularity, counts clipped at the n-th function (as ``workload.adapter_weights`` does
    for that source)."""
    traces = Path(args.traces)
    return WorkloadSpec(
        trace=(str(traces / bundled.AZURE_CONV), str(traces / bundled.AZURE_FUNCTIONS)),
        requests=args.requests,
        arrivals="poisson",
        lengths="trace",
        length_divide=args.length_divide,
        max_prompt=args.max_prompt,
        max_output=args.max_output,
        adapters=args.adapters,
        popularity="stride",
        duration=args.max_seconds,
        seed=args.seed,
    )


def run(args: argparse.Namespace) -> dict:
    root = ensure_model(Path(args.workdir), args.preset, args.adapters, ranks=list(ADAPTER_RANKS))
    base = workload_spec(args)
    traces = workload.load_traces(base)  # read once: every stride replays the same two traces
    lengths = traces[0].rows
    scaling = workload.LengthScaling(divide=base.length_divide, max_prompt=base.max_prompt, max_output=base.max_output)
    mean_prompt, mean_output = np.mean([scaling.apply(r.input_tokens, r.output_tokens) for r in lengths], axis=0)
    rate = args.rate or args.load * saturation_rate(root, args.adapters, args.dtype, mean_prompt, mean_output)
    print(
        f"rate {rate:.2f} req/s, {args.requests} requests, mean prompt {mean_prompt:.1f}, output {mean_output:.1f} "
        "tokens",
        flush=True,
    )
    cases = [(s, policy) for s in args.strides for policy in args.policies]
    runs: dict[tuple[int, str], list[dict]] = {case: [] for case in cases}
    specs = {s: replace(base, rate=rate, stride=s) for s in args.strides}
    shares = {s: max(workload.adapter_weights(spec, traces[1])) for s, spec in specs.items()}
    built = {s: workload.build_specs(spec, traces) for s, spec in specs.items()}
    if empty := [s for s, spec in specs.items() if not any(r.arrival_s <= spec.duration for r in built[s])]:
        raise ValueError(  # (its latencies were None, and printing them a traceback)
            f"no request arrives within --max-seconds {args.max_seconds:g} at {rate:.3g} req/s (stride "
            f"{empty[0]}): raise --rate, --load or --max-seconds"
        )
    stats: list[EngineStats] = []
    for round_ in range(args.repeats):
        for s, policy in cases:
            requests, duration = built[s], specs[s].duration
            engine = make_engine(root, policy, args.adapters, args.dtype)
            stats.append(engine.stats)
            log = StepLog(engine)
            results, end = replay(engine, requests, duration, log)
            full = summarize(results, end)
            m = {
                "throughput_tok_s": full["throughput_tok_s"],
                "norm_latency_mean_s": full["normalized_latency_s"]["mean"],
                "norm_latency_p90_s": full["normalized_latency_s"]["p90"],
                "finished": full["completed"],
                "merges": engine.stats.merges,
                "mixed_steps": engine.stats.steps_by_mode.get("mixed", 0) / max(1, engine.stats.steps),
                "steps": log.rows,  # what the simulator's calibrated profile is fitted to
            }
            runs[s, policy].append(m)
            print(
                f"round {round_ + 1} stride {s:>2} {policy:>13}: {m['throughput_tok_s']:7.1f} tok/s  norm latency "
                f"mean {m['norm_latency_mean_s']:.3f} p90 {m['norm_latency_p90_s']:.3f} s/token  finished "
                f"{m['finished']}/{len(requests)}  merges {m['merges']}  mixed steps {m['mixed_steps']:.0%}",
                flush=True,
            )
    rows = [
        {
            "stride": s,
            "policy": policy,
            "top_adapter_share": shares[s],
            "requests": len(built[s]),
            "workload": specs[s].options(),  # what `bench simulate --experiment validate` replays
            "runs": runs[s, policy],
            **{k: _summary([r[k] for r in runs[s, policy]]) for k in METRICS},
        }
        for s, policy in cases
    ]
    return {
        "machine": machine(),
        "date": today(),
        "preset": args.preset,
        "adapters": args.adapters,
        "rate_req_s": rate,
        "requests": args.requests,
        "repeats": args.repeats,
        "length_scaling": vars(scaling),
        "rows": rows,
        **switch_ms(stats),
    }


def _summary(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


TITLE = "Batching policy ablation (`dlora bench policy`, the paper's Fig. 10)"


def markdown(r: dict) -> str:
    sc = r["length_scaling"]
    lines = [
        f"Measured {r.get('date', '?')} on **{r['machine']}**, preset `{r['preset']}`, {r['adapters']} adapters "
        f"(ranks 8/16/32), {r['requests']} requests, Gamma arrivals (CV 1) at {r['rate_req_s']:.2f} req/s; "
        f"Azure conversation lengths divided by {sc['divide']:g}, capped at {sc['max_prompt']} prompt / "
        f"{sc['max_output']} output tokens; adapters by the stride mapping over Azure Functions popularity "
        "(clipped at the n-th function). Normalized latency = end-to-end seconds / output tokens. Each "
        f"figure is the median of {r.get('repeats', 1)} runs of the same workload, with their spread "
        "(min–max); mixed = share of steps that ran mixed.",
        "",
        "| stride | top adapter share | policy | throughput (tok/s) | norm. latency mean (s/token) | P90 | "
        "finished | merges | mixed |",
        "|---|---|---|---|---|---|---|---|---|",
    ]

    def cell(x: dict, key: str, fmt: str) -> str:
        v = x[key]
        if not isinstance(v, dict):  # a result from before repeats
            return format(v, fmt)
        if v["min"] == v["max"]:
            return format(v["median"], fmt)
        return f"{format(v['median'], fmt)} ({format(v['min'], fmt)}–{format(v['max'], fmt)})"

    for x in r["rows"]:
        mixed = cell(x, "mixed_steps", ".0%") if "mixed_steps" in x else "–"
        lines.append(
            f"| {x['stride']} | {x['top_adapter_share']:.2f} | {x['policy']} | {cell(x, 'throughput_tok_s', '.1f')} | "
            f"{cell(x, 'norm_latency_mean_s', '.3f')} | {cell(x, 'norm_latency_p90_s', '.3f')} | "
            f"{cell(x, 'finished', '.0f')}/{x['requests']} | {cell(x, 'merges', '.0f')} | {mixed} |"
        )
    return "\n".join(lines)


def plot(r: dict) -> Figure:
    """Fig. 10's panels: throughput and mean normalized latency per policy across strides (bars: min-max)."""
    fig, ax = figure(2)
    strides = sorted({x["stride"] for x in r["rows"]})
    share = {x["stride"]: x["top_adapter_share"] for x in r["rows"]}

    def spread(v: dict | float) -> tuple[float, float, float]:
        # Results from before repeats hold one figure, not a median and its range.
        return (v["median"], v["min"], v["max"]) if isinstance(v, dict) else (v, v, v)

    for policy in dict.fromkeys(x["policy"] for x in r["rows"]):
        xs = sorted((x for x in r["rows"] if x["policy"] == policy), key=lambda x: x["stride"])
        at = [strides.index(x["stride"]) for x in xs]
        for a, key in zip(ax, ("throughput_tok_s", "norm_latency_mean_s")):
            mid, lo, hi = zip(*(spread(x[key]) for x in xs))
            err = [[m - low for m, low in zip(mid, lo)], [h - m for m, h in zip(mid, hi)]]
            a.errorbar(at, mid, yerr=err, marker="o", capsize=3, label=policy)
    for a in ax:
        a.set_xticks(range(len(strides)), [f"{s}\n({share[s]:.2f})" for s in strides], fontsize=8)
        a.set_xlabel("stride (top adapter share)")
    ax[0].set(ylabel="throughput (tok/s)", title="Throughput")
    ax[1].set(ylabel="mean normalized latency (s/token)", title="Latency")
    ax[1].legend(fontsize=7)
    return fig


def run_bench_policy(args: argparse.Namespace) -> int:
    args.strides = [int(s) for s in args.strides.split(",")]
    args.policies = [v.strip() for v in args.policies.split(",") if v.strip()]
    if args.rate and args.load is not None:  # --rate won without a word (a helper's trial)
        print("dlora bench policy: give --rate or --load, not both", file=sys.stderr)
        return 2
    args.load = 0.9 if args.load is None else args.load
    try:
        result = run(args)
    except ValueError as e:
        print(f"dlora bench policy: {e}", file=sys.stderr)
        return 2
    save(result, args.json, args.benchmarks, "policy", TITLE, markdown(result), plot=plot)
    return 0
