"""``dlora bench features``: what prefix caching and chunked prefill buy, each on vs off on one
engine with the same arrivals (issue 19's benchmarks).

- **Multi-turn**: conversations start as a Poisson process; each turn resends the whole history
  (a shared system prompt, every earlier user message and answer) plus a new user message, and
  the next turn comes a think time after the answer ends. Mean and P90 time to first token and
  output throughput, prefix caching on vs off.
- **Long-prompt interference**: streams decode while long prompts arrive every few seconds;
  P99 and mean inter-token latency of the streams, chunked prefill (a small token budget) vs a
  step that takes each prompt whole.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from dlora.common.messages import SamplingParams
from dlora.loadgen.bench_common import ensure_model, figure, grouped_bars, machine, save, today
from dlora.services.worker.engine import EngineConfig, LLMEngine
from dlora.services.worker.policy import PolicyConfig

if TYPE_CHECKING:
    from matplotlib.figure import Figure

TITLE = "Engine features: prefix caching and chunked prefill (`dlora bench features`)"
_LONG_OUTPUT = 2  # tokens each long prompt generates


def _engine(root: Path, dtype: str, adapters: int, policy: str = "unmerged-only", **config: object) -> LLMEngine:
    engine = LLMEngine(
        str(root / "model"),
        EngineConfig(dtype=dtype, policy=PolicyConfig(name=policy), kv_cache_bytes=1 << 30, **config),  # type: ignore[arg-type]
    )
    for i in range(adapters):
        engine.register_adapter(f"lora-{i}", root / "adapters" / f"lora-{i}")
    return engine


def _tokens(rng: random.Random, n: int, vocab: int) -> list[int]:
    return [rng.randrange(3, vocab) for _ in range(n)]


@dataclass
class _Turn:
    conversation: int
    index: int
    arrival_s: float
    prompt: list[int]
    first_token_s: float | None = None
    finish_s: float | None = None
    output: list[int] = field(default_factory=list)


def multi_turn(engine: LLMEngine, args: argparse.Namespace) -> dict:
    """Replay ``args.conversations`` conversations of ``args.turns`` turns; TTFT and throughput."""
    rng = random.Random(args.seed)
    vocab = engine.model_config.vocab_size
    system = _tokens(rng, args.system_tokens, vocab)
    starts, t = [], 0.0
    for _ in range(args.conversations):
        t += rng.expovariate(args.conversation_rate)
        starts.append(t)
    users = [[_tokens(rng, args.user_tokens, vocab) for _ in range(args.turns)] for _ in range(args.conversations)]
    adapter = [f"lora-{c % args.adapters}" if args.adapters else None for c in range(args.conversations)]
    pending = [_Turn(c, 0, starts[c], system + users[c][0]) for c in range(args.conversations)]
    done: list[_Turn] = []
    running: dict[str, _Turn] = {}
    params = SamplingParams(max_tokens=args.output_tokens, ignore_eos=True)
    start = time.perf_counter()
    while pending or running:
        now = time.perf_counter() - start
        for turn in sorted((p for p in pending if p.arrival_s <= now), key=lambda p: p.arrival_s):
            pending.remove(turn)
            rid = f"{turn.conversation}-{turn.index}"
            engine.add_request(rid, prompt_token_ids=turn.prompt, params=params, adapter=adapter[turn.conversation])
            running[rid] = turn
        if not running:
            time.sleep(max(0.0, min(min(p.arrival_s for p in pending) - now, 0.05)))
            continue
        outputs = engine.step()
        now = time.perf_counter() - start
        for out in outputs:
            turn = running[out.request_id]
            turn.output += out.new_token_ids
            turn.first_token_s = turn.first_token_s if turn.first_token_s is not None else now
            if out.finished:
                turn.finish_s = now
                done.append(running.pop(out.request_id))
                if turn.index + 1 < args.turns:
                    c, i = turn.conversation, turn.index + 1
                    history = turn.prompt + turn.output + users[c][i]
                    pending.append(_Turn(c, i, now + args.think_s, history))
    elapsed = time.perf_counter() - start
    ttft = [t.first_token_s - t.arrival_s for t in done if t.first_token_s is not None]
    later = [t.first_token_s - t.arrival_s for t in done if t.first_token_s is not None and t.index > 0]
    st = engine.stats
    return {
        "turns": len(done),
        "mean_prompt_tokens": statistics.fmean(len(t.prompt) for t in done),
        "ttft_mean_s": statistics.fmean(ttft),
        "ttft_p90_s": _quantile(ttft, 0.9),
        "later_turns_ttft_mean_s": statistics.fmean(later) if later else None,
        "output_tokens_per_s": sum(len(t.output) for t in done) / elapsed,
        "seconds": elapsed,
        "prefill_tokens": st.prefill_tokens,
        "prefix_cache_hit_rate": st.prefix_cache_hits / st.prefix_cache_queries if st.prefix_cache_queries else 0.0,
    }


def interference(engine: LLMEngine, args: argparse.Namespace) -> dict:
    """``args.streams`` requests decode ``args.stream_tokens`` tokens each while a
    ``args.long_prompt``-token prompt arrives every ``args.long_every_s``; the streams' gaps."""
    rng = random.Random(args.seed)
    vocab = engine.model_config.vocab_size
    stream_params = SamplingParams(max_tokens=args.stream_tokens, ignore_eos=True)
    for i in range(args.streams):
        engine.add_request(f"s{i}", prompt_token_ids=_tokens(rng, 16, vocab), params=stream_params)
    last: dict[str, float] = {}
    gaps: list[float] = []
    longs, next_long = 0, 0.0
    start = time.perf_counter()
    while any(rid.startswith("s") for rid in engine.seqs):
        now = time.perf_counter() - start
        if now >= next_long and longs < args.long_prompts:
            engine.add_request(
                f"long{longs}",
                prompt_token_ids=_tokens(rng, args.long_prompt, vocab),
                params=SamplingParams(max_tokens=_LONG_OUTPUT, ignore_eos=True),
            )
            longs += 1
            next_long = now + args.long_every_s
        outputs = engine.step()
        now = time.perf_counter() - start
        for out in outputs:
            if out.request_id.startswith("s") and out.new_token_ids:
                if out.request_id in last:
                    gaps.append(now - last[out.request_id])
                last[out.request_id] = now
    while engine.has_unfinished():
        engine.step()
    return {
        "itl_p99_s": _quantile(gaps, 0.99),
        "itl_p50_s": _quantile(gaps, 0.5),
        "itl_mean_s": statistics.fmean(gaps),
        "long_prompts": longs,
        "seconds": time.perf_counter() - start,
    }


def _quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def run(args: argparse.Namespace) -> dict:
    root = ensure_model(Path(args.workdir), args.preset, max(1, args.adapters), [8])
    result: dict = {"machine": machine(), "date": today(), "preset": args.preset, "dtype": args.dtype}
    result["multi_turn"] = {
        "settings": {
            k: getattr(args, k)
            for k in ("conversations", "turns", "conversation_rate", "system_tokens", "user_tokens", "output_tokens")
        }
        | {"think_s": args.think_s, "policy": args.policy, "adapters": args.adapters},
    }
    for on in (True, False):
        engine = _engine(root, args.dtype, args.adapters, args.policy, enable_prefix_caching=on)
        result["multi_turn"]["cache_on" if on else "cache_off"] = point = multi_turn(engine, args)
        print(f"multi-turn cache {'on ' if on else 'off'}: {point}", flush=True)
    on, off = result["multi_turn"]["cache_on"], result["multi_turn"]["cache_off"]
    result["multi_turn"]["ttft_mean_off_over_on"] = off["ttft_mean_s"] / on["ttft_mean_s"]
    result["interference"] = {
        "settings": {
            k: getattr(args, k)
            for k in ("streams", "stream_tokens", "long_prompt", "long_prompts", "long_every_s", "chunk_budget")
        }
    }
    for chunked in (True, False):
        engine = _engine(
            root,
            args.dtype,
            0,
            enable_chunked_prefill=chunked,
            max_num_batched_tokens=args.chunk_budget,
            enable_prefix_caching=False,
        )
        key = "chunked" if chunked else "whole"
        result["interference"][key] = point = interference(engine, args)
        print(f"interference {key}: {point}", flush=True)
    ch, whole = result["interference"]["chunked"], result["interference"]["whole"]
    result["interference"]["itl_p99_whole_over_chunked"] = whole["itl_p99_s"] / ch["itl_p99_s"]
    return result


def markdown(r: dict) -> str:
    mt, it = r["multi_turn"], r["interference"]
    s = mt["settings"]
    lines = [
        f"Measured {r['date']} on **{r['machine']}**, preset `{r['preset']}`, {r['dtype']}, one engine, "
        "the same arrivals for each pair of runs.",
        "",
        f"**Multi-turn** ({s['conversations']} conversations × {s['turns']} turns starting at "
        f"{s['conversation_rate']}/s, a {s['system_tokens']}-token shared system prompt, {s['user_tokens']}-token "
        f"user messages, {s['output_tokens']}-token answers, {s['think_s']} s think time, "
        f"{s.get('adapters', 0)} adapters, policy {s.get('policy', 'unmerged-only')}; each turn resends the history):",
        "",
        "| prefix cache | mean TTFT (s) | P90 TTFT (s) | later turns' mean TTFT (s) | output tok/s "
        "| prefill tokens | hit rate |",
        "|---|---|---|---|---|---|---|",
    ]
    for key, name in (("cache_on", "on"), ("cache_off", "off")):
        p = mt[key]
        later = f"{p['later_turns_ttft_mean_s']:.3f}" if p["later_turns_ttft_mean_s"] is not None else "-"
        lines.append(
            f"| {name} | {p['ttft_mean_s']:.3f} | {p['ttft_p90_s']:.3f} | {later} | "
            f"{p['output_tokens_per_s']:.1f} | {p['prefill_tokens']} | {p['prefix_cache_hit_rate']:.0%} |"
        )
    lines.append(f"\nMean TTFT off / on: **{mt['ttft_mean_off_over_on']:.2f}×** (target ≥ 3×).")
    s = it["settings"]
    lines += [
        "",
        f"**Long-prompt interference** ({s['streams']} streams decoding {s['stream_tokens']} tokens while "
        f"{s['long_prompts']} prompts of {s['long_prompt']} tokens arrive every {s['long_every_s']} s; chunked: "
        f"`max_num_batched_tokens = {s['chunk_budget']}`; whole: chunked prefill off):",
        "",
        "| prefill | streams' P99 inter-token (s) | P50 (s) | mean (s) | run (s) |",
        "|---|---|---|---|---|",
    ]
    for key in ("chunked", "whole"):
        p = it[key]
        lines.append(
            f"| {key} | {p['itl_p99_s']:.3f} | {p['itl_p50_s']:.3f} | {p['itl_mean_s']:.3f} | {p['seconds']:.1f} |"
        )
    lines.append(f"\nP99 inter-token whole / chunked: **{it['itl_p99_whole_over_chunked']:.2f}×** (target ≥ 3×).")
    return "\n".join(lines)


def plot(r: dict) -> Figure:
    """Time to first token with the prefix cache on and off; streams' inter-token gaps, chunked vs whole."""
    fig, ax = figure(2)
    mt, it = r["multi_turn"], r["interference"]
    ttft = {"mean": "ttft_mean_s", "P90": "ttft_p90_s", "later turns' mean": "later_turns_ttft_mean_s"}
    grouped_bars(
        ax[0],
        list(ttft),
        {
            f"cache {name}": [mt[key][k] or 0.0 for k in ttft.values()]
            for key, name in (("cache_on", "on"), ("cache_off", "off"))
        },
    )
    ax[0].set(ylabel="time to first token (s)")
    ax[0].set_title(f"Multi-turn: prefix cache (off/on {mt['ttft_mean_off_over_on']:.1f}x)")
    itl = {"P50": "itl_p50_s", "mean": "itl_mean_s", "P99": "itl_p99_s"}
    grouped_bars(ax[1], list(itl), {key: [it[key][k] for k in itl.values()] for key in ("chunked", "whole")})
    ax[1].set(ylabel="streams' inter-token latency (s)")
    ax[1].set_title(f"Long prompts: prefill (whole/chunked P99 {it['itl_p99_whole_over_chunked']:.1f}x)")
    return fig


def settings_problem(args: argparse.Namespace) -> str | None:
    """What of ``args`` the engine or the model would refuse, said before any run (a helper's
    trial: found after the multi-turn half, as a traceback that lost it)."""
    from dlora.model.make_tiny import PRESETS

    config = EngineConfig(enable_chunked_prefill=True, max_num_batched_tokens=args.chunk_budget)
    if bad := config.check():
        return f"--chunk-budget: {bad[0][0]}={bad[0][1]!r} {bad[0][2]}"
    context = PRESETS[args.preset]["max_position_embeddings"]
    if args.long_prompt + _LONG_OUTPUT > context:
        return f"--long-prompt {args.long_prompt}: past the {args.preset} model's context ({context} tokens)"
    return None


def run_bench_features(args: argparse.Namespace) -> int:
    if (problem := settings_problem(args)) is not None:
        print(f"dlora bench features: {problem}", file=sys.stderr)
        return 2
    result = run(args)
    save(result, args.json, args.benchmarks, "features", TITLE, markdown(result), plot=plot)
    return 0
