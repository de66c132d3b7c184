"""``dlora bench control-plane``: what the gateway, NATS and the dispatcher add to a request.

Three paths serve the same one-token requests on the tiny model: the engine called directly,
the NATS request subject (dispatcher + worker), and the HTTP gateway in front of that. Added
latency is each path's per-request percentile minus the engine's; the sustained rate is the
gateway's request throughput with many requests in flight.
"""

from __future__ import annotations

import argparse
import asyncio
import time
import urllib.parse
import uuid
from pathlib import Path
from typing import TYPE_CHECKING

import aiohttp
import msgspec
import nats
import numpy as np

from dlora.common import subjects
from dlora.common.messages import GenerateRequest, SamplingParams, TokenChunk
from dlora.loadgen.bench_common import figure, grouped_bars, machine, save, today
from dlora.services.launcher import LocalStack
from dlora.services.servers import free_port
from dlora.services.worker.engine import LLMEngine
from dlora.services.worker.settings import WorkerSettings

if TYPE_CHECKING:
    from matplotlib.figure import Figure

PROMPT = [5, 40, 41, 300, 17, 9, 12, 60]


def _pcts(seconds: list[float]) -> dict[str, float]:
    ms = np.array(seconds) * 1e3
    return {"p50_ms": float(np.percentile(ms, 50)), "p99_ms": float(np.percentile(ms, 99)), "mean_ms": float(ms.mean())}


def engine_latencies(model: Path, n: int) -> list[float]:
    engine = LLMEngine(str(model), WorkerSettings().engine)  # as the worker runs it
    out = []
    for i in range(n + 10):
        t0 = time.perf_counter()
        engine.add_request(str(i), prompt_token_ids=PROMPT, params=SamplingParams(max_tokens=1))
        while engine.has_unfinished():
            engine.step()
        if i >= 10:  # warm-up
            out.append(time.perf_counter() - t0)
    return out


async def nats_latencies(url: str, n: int) -> list[float]:
    nc = await nats.connect(url)
    user = urllib.parse.urlsplit(url).username or "app"  # an application: its own subjects only
    out = []
    try:
        for i in range(n + 10):
            rid = uuid.uuid4().hex
            sub = await nc.subscribe(subjects.reply_inbox(rid, user))
            req = GenerateRequest(
                request_id=rid,
                reply_to=subjects.reply_inbox(rid, user),
                prompt_token_ids=PROMPT,
                params=SamplingParams(max_tokens=1),
            )
            t0 = time.perf_counter()
            await nc.publish(subjects.requests_of(user), msgspec.json.encode(req))
            while True:
                chunk = msgspec.json.decode((await sub.next_msg(timeout=30)).data, type=TokenChunk)
                if chunk.finish_reason:
                    break
            if i >= 10:
                out.append(time.perf_counter() - t0)
            await sub.unsubscribe()
    finally:
        await nc.drain()
    return out


async def http_latencies(url: str, model: str, n: int) -> list[float]:
    body = {"model": model, "prompt": PROMPT, "max_tokens": 1, "temperature": 0}
    out = []
    async with aiohttp.ClientSession() as http:
        for i in range(n + 10):
            t0 = time.perf_counter()
            async with http.post(f"{url}/v1/completions", json=body) as r:
                assert r.status == 200, await r.text()
                await r.read()
            if i >= 10:
                out.append(time.perf_counter() - t0)
    return out


async def http_rate(url: str, model: str, seconds: float, concurrency: int) -> float:
    body = {"model": model, "prompt": PROMPT, "max_tokens": 1, "temperature": 0}
    done = 0
    deadline = time.perf_counter() + seconds

    async def client(http: aiohttp.ClientSession) -> None:
        nonlocal done
        while time.perf_counter() < deadline:
            async with http.post(f"{url}/v1/completions", json=body) as r:
                await r.read()
                done += r.status == 200

    t0 = time.perf_counter()
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency)) as http:
        await asyncio.gather(*(client(http) for _ in range(concurrency)))
    return done / (time.perf_counter() - t0)


def run(args: argparse.Namespace) -> dict:
    stack = LocalStack(workers=1, model=None, lora=[], port=free_port(), config=None, migrator=False)
    stack.start()
    try:
        model = stack.model_dir
        direct = engine_latencies(model, args.requests)
        via_nats = asyncio.run(nats_latencies(stack.app_nats_url, args.requests))
        via_http = asyncio.run(http_latencies(stack.url, model.name, args.requests))
        rate = asyncio.run(http_rate(stack.url, model.name, args.seconds, args.concurrency))
    finally:
        stack.stop()
    paths = {"engine": _pcts(direct), "nats": _pcts(via_nats), "gateway": _pcts(via_http)}
    added = {
        name: {k: paths[name][k] - paths["engine"][k] for k in ("p50_ms", "p99_ms")} for name in ("nats", "gateway")
    }
    return {
        "machine": machine(),
        "date": today(),
        "model": "tiny",
        "requests": args.requests,
        "paths": paths,
        "added": added,
        "gateway_rate_req_s": rate,
        "concurrency": args.concurrency,
    }


TITLE = "Control plane (`dlora bench control-plane`)"


def markdown(r: dict) -> str:
    p, a = r["paths"], r["added"]
    return "\n".join(
        [
            f"Measured {r.get('date', '?')} on **{r['machine']}**, everything on this one machine (nats-server, "
            "redis-server, dispatcher, one worker with the tiny model, gateway, client). Requests: 8 prompt tokens, "
            f"`max_tokens` 1, one at a time ({r['requests']} after 10 warm-up).",
            "",
            "| path | p50 | p99 |",
            "|---|---|---|",
            f"| engine called directly | {p['engine']['p50_ms']:.2f} ms | {p['engine']['p99_ms']:.2f} ms |",
            f"| NATS request subject (dispatcher + worker) | {p['nats']['p50_ms']:.2f} ms "
            f"| {p['nats']['p99_ms']:.2f} ms |",
            f"| HTTP gateway | {p['gateway']['p50_ms']:.2f} ms | {p['gateway']['p99_ms']:.2f} ms |",
            f"| **added by NATS + dispatcher + worker shell** | **{a['nats']['p50_ms']:.2f} ms** "
            f"| {a['nats']['p99_ms']:.2f} ms |",
            f"| **added by gateway + NATS + dispatcher + worker shell** (target p50 ≤ 2 ms) | "
            f"**{a['gateway']['p50_ms']:.2f} ms** | {a['gateway']['p99_ms']:.2f} ms |",
            "",
            f"Sustained: the gateway completes **{r['gateway_rate_req_s']:,.0f} req/s** with "
            f"{r['concurrency']} requests in flight (tiny model, one token each).",
        ]
    )


def plot(r: dict) -> Figure:
    """Each path's one-token latency, and what the layers add over the engine (target p50 <= 2 ms)."""
    fig, ax = figure(2)
    p, a = r["paths"], r["added"]
    paths = {"engine": "engine", "nats": "NATS + dispatcher", "gateway": "HTTP gateway"}
    grouped_bars(ax[0], list(paths.values()), {q: [p[k][f"{q}_ms"] for k in paths] for q in ("p50", "p99")})
    ax[0].set(ylabel="latency, 1 token (ms)", title="Per path")
    added = {"nats": "NATS + dispatcher", "gateway": "HTTP gateway"}
    grouped_bars(ax[1], list(added.values()), {q: [a[k][f"{q}_ms"] for k in added] for q in ("p50", "p99")})
    ax[1].axhline(2.0, color="grey", linestyle=":")
    ax[1].set(ylabel="added over the engine (ms)")
    ax[1].set_title(f"Added (dotted: p50 target); gateway {r['gateway_rate_req_s']:,.0f} req/s")
    return fig


def run_bench_control_plane(args: argparse.Namespace) -> int:
    result = run(args)
    for name, p in result["paths"].items():
        print(f"{name:>8}: p50 {p['p50_ms']:.2f} ms  p99 {p['p99_ms']:.2f} ms")
    for name, a in result["added"].items():
        print(f"added by {name:>7}: p50 {a['p50_ms']:.2f} ms  p99 {a['p99_ms']:.2f} ms  (target p50 <= 2 ms)")
    print(f"gateway sustains {result['gateway_rate_req_s']:.0f} req/s at concurrency {result['concurrency']}")
    save(result, args.json, args.benchmarks, "control-plane", TITLE, markdown(result), plot=plot)
    return 0
