"""How long one ``GET /v1/status`` poll holds the gateway's event loop at thousands of adapters.

The document is made on a thread (``monitoring.status``), but a thread running Python holds the GIL:
the loop runs only in the switch interval's slices (5 ms), and not at all while msgspec encodes
(C code that keeps the GIL for the whole document). This script times it as the gateway does it
(``Traffic.frozen`` on the loop, then ``status_body`` on a thread) while a ticker on the loop
records how late each 1 ms sleep wakes: the longest lateness is the longest time every stream
of the gateway waited. ``status``: as the gateway does it (one encode call); ``runs``: its long
lists encoded ``RUN`` items a call (an alternative); ``none``: polls that make nothing (the
host's own lateness).
``encode_*_ms``: the longest single encode call of each way, a bound the loop cannot run within.
A measure for a person, not a test (timings vary):

    .venv/bin/python -m dlora.loadgen.bench_status_loop --adapters 4000 --workers 4 --polls 20
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from typing import Any

import msgspec

from dlora.common.messages import AdapterEntry, AdapterResidency, WorkerStats
from dlora.services.gateway import status


def _setup(adapters: int, workers: int, held: int) -> tuple[tuple[Any, ...], status.Traffic]:
    """The poll's arguments as a gateway holds them: ``adapters`` registered and served (20
    latencies each), ``workers`` live, each holding ``held`` of them (8 in device slots)."""
    traffic = status.Traffic()
    for i in range(adapters):
        for k in range(20):
            traffic.first_token(f"adapter-{i}", 0.01 * k)
            traffic.done(f"adapter-{i}", 0.1 * k, 16)
    registered = [AdapterEntry(name=f"adapter-{i}", path="/a", rank=16, created=1.0) for i in range(adapters)]
    live = []
    for w in range(workers):
        places = [
            AdapterResidency(name=f"adapter-{(w * held + j) % adapters}", slot=j if j < 8 else None, merged=False)
            for j in range(held)
        ]
        stats = WorkerStats(
            worker=f"w{w}", running=0, waiting=0, free_blocks=10, total_blocks=100, block_size=16, max_loras=8
        )
        stats = msgspec.structs.replace(stats, adapters=places)
        live.append((stats, 0.1))
    return (live, [], registered, traffic, "model", "gateway", time.time(), ""), traffic


async def _poll(args: tuple[Any, ...], traffic: status.Traffic, body: Any) -> tuple[float, int]:
    """One poll as ``monitoring.status`` makes it; (seconds on the loop before the thread, bytes)."""
    start = time.perf_counter()
    frozen = traffic.frozen()
    on_loop = time.perf_counter() - start
    out = await asyncio.to_thread(body, *args[:3], frozen, *args[4:])
    return on_loop, len(out)


async def _measure(args: tuple[Any, ...], traffic: status.Traffic, polls: int, body: Any) -> dict[str, float]:
    late: list[float] = []
    stop = asyncio.Event()

    async def ticker() -> None:
        while not stop.is_set():
            before = time.perf_counter()
            await asyncio.sleep(0.001)
            late.append(time.perf_counter() - before - 0.001)

    task = asyncio.create_task(ticker())
    await asyncio.sleep(0.05)
    late.clear()
    on_loop, size, took = [], 0, []
    for _ in range(polls):
        start = time.perf_counter()
        spent, size = await _poll(args, traffic, body)
        took.append(time.perf_counter() - start)
        on_loop.append(spent)
        await asyncio.sleep(0.02)  # (the ticker's quiet lateness between polls)
    stop.set()
    await task
    return {
        "bytes": size,
        "poll_ms_median": 1000 * statistics.median(took),
        "frozen_on_loop_ms_median": 1000 * statistics.median(on_loop),
        "loop_late_ms_max": 1000 * max(late),
        "loop_late_ms_p99": 1000 * statistics.quantiles(late, n=100)[98],
    }


def _encode_alone(args: tuple[Any, ...], traffic: status.Traffic) -> tuple[float, float]:
    """Milliseconds of the longest single encode call (medians of 5 tries): the document's in one
    call, and the longest run's (``RUN`` items) as ``_runs_body`` encodes them."""
    doc = status.cluster_status(*args[:3], traffic.frozen(), *args[4:])
    whole, run = [], []
    for _ in range(5):
        start = time.perf_counter()
        msgspec.json.encode(doc)
        whole.append(time.perf_counter() - start)
        lists: list[Any] = [w.adapters for w in doc.workers] + [doc.adapters]
        longest = 0.0
        for items in lists:
            for i in range(0, len(items), RUN):
                start = time.perf_counter()
                msgspec.json.encode(items[i : i + RUN])
                longest = max(longest, time.perf_counter() - start)
        run.append(longest)
    return 1000 * statistics.median(whole), 1000 * statistics.median(run)


RUN = 256  # items one encode call takes in ``_runs_body``


def _runs(items: Any) -> list[Any]:
    """``items`` encoded ``RUN`` at a time, each run's JSON without its brackets (``msgspec.Raw``):
    a list of runs encodes as the list of the items."""
    return [msgspec.Raw(msgspec.json.encode(items[i : i + RUN])[1:-1]) for i in range(0, len(items), RUN)]


def _runs_body(*args: Any) -> bytes:
    """The document with its long lists encoded a run at a time, the GIL free between runs: the
    alternative tried (no gain measured: the encode is not what holds the loop)."""
    doc = status.cluster_status(*args)
    workers = [msgspec.structs.replace(w, adapters=_runs(w.adapters)) for w in doc.workers]
    return msgspec.json.encode(msgspec.structs.replace(doc, workers=_runs(workers), adapters=_runs(doc.adapters)))


def _none(*args: Any) -> bytes:
    """No document: the host's own lateness, for scale."""
    return b""


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--adapters", type=int, default=4000)
    p.add_argument("--workers", type=int, default=4)
    p.add_argument("--held", type=int, default=1000, help="adapters each worker holds (in memory or slots)")
    p.add_argument("--polls", type=int, default=20)
    p.add_argument("--rounds", type=int, default=3, help="each way measured this many times, in turn")
    a = p.parse_args()
    args, traffic = _setup(a.adapters, a.workers, a.held)
    out: dict[str, Any] = {"adapters": a.adapters, "workers": a.workers, "held": a.held}
    out["encode_whole_ms"], out["encode_run_ms_max"] = (round(v, 2) for v in _encode_alone(args, traffic))
    for _ in range(a.rounds):  # interleaved: a shared host's load falls on both alike
        for name, body in (("none", _none), ("status", status.status_body), ("runs", _runs_body)):
            for k, v in asyncio.run(_measure(args, traffic, a.polls, body)).items():
                out.setdefault(f"{name}_{k}", []).append(round(v, 2))
    for k, v in out.items():
        print(f"{k}: {v}")


if __name__ == "__main__":
    main()
