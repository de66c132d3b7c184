"""``python -m dlora.loadgen.soak`` (``make soak DURATION=30m``): the stack as separate processes
(as ``make chaos`` runs it) under mixed load for a long while, sampling every ``--interval``
seconds what would grow if something leaked: each service's resident memory (/proc), Redis's key
count (DBSIZE) and memory, and NATS's subscriptions and connections (nats-server's monitoring
endpoint, /subsz and /connz). The curve goes to JSON and BENCHMARKS.md, with a check that each
stayed bounded: the last third's maximum within a factor (plus a little slack) of the first
third's, which includes the warm-up. Exit status 1 if one did not, or a request failed.

Mixed load: streamed and plain completions, chat completions, and streams the client abandons
after a few tokens (the gateway aborts them on the worker), over the base model and the adapters.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import re
import sys
import time
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Any

import aiohttp

from dlora.loadgen.chaos.report import code_version, version_text
from dlora.loadgen.chaos.stack import ChaosStack, demo_model

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

KINDS = {"stream": 0.45, "plain": 0.2, "chat": 0.2, "abandon": 0.15}
# metric -> (factor, slack): the last third's max may be at most factor x the first third's + slack
BOUNDS: dict[str, tuple[float, float]] = {
    "rss_mb": (1.15, 16.0),
    "redis_keys": (1.5, 25.0),
    "redis_memory_mb": (1.5, 2.0),
    "nats_subscriptions": (1.2, 10.0),
    "nats_connections": (1.0, 2.0),
}


def parse_duration(text: str) -> float:
    """``30m``, ``90s``, ``1h`` or plain seconds."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smh]?)\s*", text)
    if m is None:
        raise argparse.ArgumentTypeError(f"not a duration: {text!r} (e.g. 30m, 180s, 1h)")
    return float(m.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600}[m.group(2)]


def rss_mb(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


class MixedLoad:
    def __init__(self, url: str, base: str, adapters: list[str], rate: float, seed: int = 0) -> None:
        self.url, self.models, self.rate = url, [base, *adapters], rate
        self.rng = random.Random(seed)
        self.sent: Counter[str] = Counter()
        self.ok: Counter[str] = Counter()
        self.failures: Counter[str] = Counter()
        self.tasks: set[asyncio.Task[None]] = set()
        self.http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=180))

    async def run(self, until: float) -> None:
        while time.monotonic() < until:
            kind = self.rng.choices(list(KINDS), weights=list(KINDS.values()))[0]
            task = asyncio.create_task(self.one(kind))
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)
            await asyncio.sleep(self.rng.expovariate(self.rate))

    async def one(self, kind: str) -> None:
        model, tokens = self.rng.choice(self.models), self.rng.randint(8, 64)
        body: dict[str, Any] = {"model": model, "max_tokens": tokens, "temperature": 0, "ignore_eos": True}
        if kind == "chat":
            path = "/v1/chat/completions"
            body["messages"] = [{"role": "user", "content": f"kalo remi {self.rng.randint(0, 999)}"}]
            body["stream"] = self.rng.random() < 0.5
        else:
            path = "/v1/completions"
            body["prompt"] = [self.rng.randint(3, 255) for _ in range(self.rng.randint(4, 24))]
            body["stream"] = kind != "plain"
        self.sent[kind] += 1
        try:
            async with self.http.post(f"{self.url}{path}", json=body) as r:
                if r.status != 200:
                    self.failures[f"{kind}: HTTP {r.status}: {(await r.text())[:120]}"] += 1
                    return
                if not body["stream"]:
                    await r.json()
                    self.ok[kind] += 1
                    return
                events = 0
                async for raw in r.content:
                    line = raw.decode().strip()
                    if '"error"' in line:
                        self.failures[f"{kind}: {line[:160]}"] += 1
                        return
                    if line == "data: [DONE]":
                        self.ok[kind] += 1
                        return
                    events += line.startswith("data: ")
                    if kind == "abandon" and events >= 3:
                        self.ok[kind] += 1  # hung up on purpose: the gateway aborts it on the worker
                        return
                self.failures[f"{kind}: the stream ended without [DONE]"] += 1
        except (aiohttp.ClientError, TimeoutError) as e:
            self.failures[f"{kind}: {type(e).__name__}: {e}"[:160]] += 1

    async def close(self, limit_s: float = 120.0) -> None:
        if self.tasks:
            await asyncio.wait(set(self.tasks), timeout=limit_s)
        await self.http.close()


async def sample(stack: ChaosStack, http: aiohttp.ClientSession, load: MixedLoad, t0: float) -> dict[str, Any]:
    s: dict[str, Any] = {"t_s": round(time.monotonic() - t0, 1)}
    for name, proc in stack.procs.items():
        if proc.popen is not None:
            s[f"rss_mb:{name}"] = rss_mb(proc.pid)
    s["redis_keys"] = await stack.redis.dbsize()
    s["redis_memory_mb"] = round(int((await stack.redis.info("memory"))["used_memory"]) / 2**20, 2)
    s["inflight_records"] = len(await stack.inflight_keys())
    async with http.get(f"{stack.monitor_url}/subsz") as r:
        s["nats_subscriptions"] = (await r.json())["num_subscriptions"]
    async with http.get(f"{stack.monitor_url}/connz") as r:
        s["nats_connections"] = (await r.json())["num_connections"]
    s["sent"], s["ok"], s["failed"] = sum(load.sent.values()), sum(load.ok.values()), sum(load.failures.values())
    return s


def bounded(samples: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per series: the first and last third's maximum, the limit (BOUNDS) and whether it held."""
    third = max(1, len(samples) // 3)
    first, last = samples[:third], samples[-third:]
    out = {}
    for key in sorted({k for s in samples for k in s}):
        metric = key.split(":")[0]
        if metric not in BOUNDS:
            continue
        a = [s[key] for s in first if s.get(key) is not None]
        b = [s[key] for s in last if s.get(key) is not None]
        if not a or not b:
            continue
        factor, slack = BOUNDS[metric]
        limit = max(a) * factor + slack
        out[key] = {
            "first_max": max(a),
            "last_max": max(b),
            "limit": round(limit, 2),
            "ok": max(b) <= limit,
            "per_hour": _slope([s for s in samples[third:] if s.get(key) is not None], key),
        }
    return out


def _slope(samples: list[dict[str, Any]], key: str) -> float | None:
    """Least-squares growth per hour after the warm-up (the first third): a leak's rate, which a
    short run's factor check cannot see."""
    if len(samples) < 3:
        return None
    ts = [float(s["t_s"]) for s in samples]
    vs = [float(s[key]) for s in samples]
    mt, mv = sum(ts) / len(ts), sum(vs) / len(vs)
    var = sum((t - mt) ** 2 for t in ts)
    return None if var == 0 else round(3600 * sum((t - mt) * (v - mv) for t, v in zip(ts, vs)) / var, 2)


async def soak(duration_s: float, interval_s: float, rate: float, workdir: Path, say: Any = print) -> dict[str, Any]:
    model, adapters = demo_model()
    stack = ChaosStack(workdir, model, adapters)
    samples: list[dict[str, Any]] = []
    say(f"starting the stack under {workdir}")
    await stack.start()
    load = MixedLoad(stack.url, model.name, sorted(adapters), rate)
    http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10))
    try:
        t0 = time.monotonic()
        sender = asyncio.create_task(load.run(t0 + duration_s))
        while True:
            samples.append(await sample(stack, http, load, t0))
            say(json.dumps(samples[-1]))
            if time.monotonic() - t0 >= duration_s:
                break
            await asyncio.sleep(min(interval_s, max(0.0, t0 + duration_s - time.monotonic())))
        await sender
        await load.close()
        await asyncio.sleep(2 * stack.heartbeat_ttl_s)  # the last requests' records go
        samples.append({**await sample(stack, http, load, t0), "after_load": True})
    finally:
        await http.close()
        await stack.stop()
    return {
        "duration_s": duration_s,
        "interval_s": interval_s,
        "rate": rate,
        "mix": KINDS,
        "sent": dict(load.sent),
        "ok": dict(load.ok),
        "failures": dict(load.failures.most_common(10)),
        "samples": samples,
        "bounded": bounded([s for s in samples if not s.get("after_load")]),
        "bounds": {k: {"factor": f, "slack": sl} for k, (f, sl) in BOUNDS.items()},
    }


def section(result: dict[str, Any]) -> str:
    samples = result["samples"]
    step = max(1, len(samples) // 12)
    shown = samples[::step] + ([samples[-1]] if (len(samples) - 1) % step else [])
    workers = sorted(k for k in samples[0] if k.startswith("rss_mb:worker"))
    head = ["t (s)", *[f"{w.split(':')[1]} RSS (MB)" for w in workers], "gateway RSS (MB)", "Redis keys"]
    head += ["Redis MB", "in-flight records", "NATS subs", "NATS conns", "sent", "failed"]
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for s in shown:
        t = f"{s['t_s']:.0f}" + (" (load over)" if s.get("after_load") else "")
        cells = [t, *[f"{s[w]:.0f}" for w in workers], f"{s.get('rss_mb:gateway') or 0:.0f}", s["redis_keys"]]
        cells += [s["redis_memory_mb"], s["inflight_records"], s["nats_subscriptions"], s["nats_connections"]]
        cells += [s["sent"], s["failed"]]
        rows.append("| " + " | ".join(str(c) for c in cells) + " |")
    checks = [
        f"{k}: first third max {v['first_max']:.1f}, last third max {v['last_max']:.1f}, limit {v['limit']:.1f} "
        f"({'ok' if v['ok'] else '**grew**'}); trend after the first third {v['per_hour']} per hour"
        for k, v in result["bounded"].items()
    ]
    minutes = result["duration_s"] / 60
    lines = [
        f"Measured on {result['machine']}, {result['date']}: {minutes:g} minutes of mixed load at "
        f"{result['rate']:g} req/s ({', '.join(f'{k} {v:.0%}' for k, v in result['mix'].items())}; "
        f"8-64 output tokens over the base model and the 4 demo adapters), sampled every "
        f"{result['interval_s']:g} s; code: {version_text(result.get('code'))}. Sent {sum(result['sent'].values())}, "
        "answered as expected "
        f"{sum(result['ok'].values())}, failed {sum(result['failures'].values())}.",
        "",
        *rows,
        "",
        "Bounded (the last third's maximum within the factor and slack of the first third's):",
        "",
        *[f"- {c}" for c in checks],
    ]
    if result["failures"]:
        lines += ["", "Failures:", "", *[f"- {n}x {r}" for r, n in result["failures"].items()]]
    return "\n".join(lines)


def plot(result: dict[str, Any]) -> Figure:
    """The sampled series over time: each service's memory, Redis's keys, NATS's subscriptions."""
    from dlora.loadgen.bench_common import figure

    fig, ax = figure(3)
    samples = result["samples"]
    minutes = [s["t_s"] / 60 for s in samples]

    def line(a: Axes, key: str, label: str) -> None:
        points = [(t, s[key]) for t, s in zip(minutes, samples) if s.get(key) is not None]
        if points:
            a.plot(*zip(*points), marker=".", markersize=3, label=label)

    for key in sorted({k for s in samples for k in s if k.startswith("rss_mb:")}):
        line(ax[0], key, key.split(":", 1)[1])
    line(ax[1], "redis_keys", "Redis keys")
    line(ax[1], "inflight_records", "in-flight records")
    line(ax[2], "nats_subscriptions", "subscriptions")
    line(ax[2], "nats_connections", "connections")
    ax[0].set(ylabel="resident memory (MB)", yscale="log", title="Memory per service")
    ax[1].set(ylabel="keys (count)", title="Redis")
    ax[2].set(ylabel="count", title="NATS")
    for a in ax:
        # The last sample is taken after the load stops, once the last requests' records expire.
        a.axvline(result["duration_s"] / 60, color="grey", linestyle=":")
        a.set_xlabel("time (min)")
        if a.get_legend_handles_labels()[0]:  # a soak stopped before its first sample has no series
            a.legend(fontsize=6)
    return fig


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m dlora.loadgen.soak", description=__doc__.split("\n\n")[0])
    p.add_argument("--duration", type=parse_duration, default=parse_duration("30m"), help="e.g. 30m, 180s")
    p.add_argument("--interval", type=float, default=10.0, help="seconds between samples")
    p.add_argument("--rate", type=float, default=1.5, help="requests/s, Poisson")
    p.add_argument("--workdir", default="bench-results/soak", help="logs and server data, per run")
    p.add_argument("--json", default="bench-results/soak.json")
    p.add_argument("--benchmarks", default="BENCHMARKS.md", help="file whose soak section is rewritten ('' for none)")
    args = p.parse_args(argv)
    from dlora.loadgen.bench_common import embed_plot, machine, write_section

    workdir = Path(args.workdir) / time.strftime("%Y%m%d-%H%M%S")
    version = code_version()
    result = asyncio.run(soak(args.duration, args.interval, args.rate, workdir))
    result["machine"], result["date"], result["code"] = machine(), time.strftime("%Y-%m-%d"), version
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    text = section(result)
    print(text)
    if args.benchmarks:
        body = embed_plot(text, result, plot, Path(args.benchmarks), "soak")
        write_section(Path(args.benchmarks), "soak", "Soak: mixed load over time (`make soak`)", body)
    ok = all(v["ok"] for v in result["bounded"].values()) and not result["failures"]
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
