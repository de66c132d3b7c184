"""One fault under load, start to finish: the cluster steady before; load, then probes, then the
fault; load on for a while after it; every request drained; the recovery time; the cluster steady
after (every process up, every worker live and idle, /healthz ok, no in-flight record left in
Redis). What the requests, the bus and the services' logs show is summed up per fault (``report``)."""

from __future__ import annotations

import asyncio
import contextlib
import time
import traceback
from dataclasses import dataclass
from typing import Any

from dlora.loadgen.chaos.faults import Ctx, Fault, FaultLog, log_notes
from dlora.loadgen.chaos.report import summarize_phase
from dlora.loadgen.chaos.stack import StackError
from dlora.loadgen.chaos.traffic import Ask, Outcome, StreamClient, Traffic


@dataclass(frozen=True)
class Timing:
    lead_s: float = 4.0  # load before the fault (then the probes go out, and the fault waits for work in flight)
    tail_s: float = 6.0  # load after the fault is over
    probes: int = 3  # probes per fault, sent so they are running when it hits
    drain_s: float = 150.0  # longest wait for the requests sent to end (the gateway's own timeout is 60 s)
    settle_s: float = 60.0  # longest wait for the steady state
    recovery_timeout_s: float = 90.0


async def steady(ctx: Ctx, limit_s: float) -> dict[str, Any]:
    """Wait (up to ``limit_s``) for the steady state and say how it stands: every process running,
    /healthz 200 with every worker, every worker's heartbeat in Redis and its stats idle, and no
    ``dlora:inflight:*`` record left."""
    stack, start = ctx.stack, time.monotonic()
    while True:
        status, body = await stack.health()
        try:
            left = await stack.inflight_keys()
        except Exception as e:  # noqa: BLE001 - Redis still restarting
            left = [f"(redis: {type(e).__name__})"]
        live = [w for w in stack.worker_ids if await stack.heartbeat(w) is not None]
        busy = {w: ctx.tap.busy(w) for w in stack.worker_ids if ctx.tap.busy(w)}
        dead = stack.dead()
        state = {
            "ok": status == 200 and body.get("workers") == stack.workers and not left and not dead and not busy,
            "healthz": status,
            "healthz_reason": body.get("reason"),
            "workers_live": len(live),
            "workers_busy": busy,
            "dead_processes": dead,
            "inflight_left": len(left),
            "waited_s": round(time.monotonic() - start, 2),
        }
        # a process that exited does not come back by itself: no use waiting for it
        if state["ok"] or dead or time.monotonic() - start > limit_s:
            if left and not state["ok"]:
                state["inflight_keys"] = left[:10]
            return state
        await asyncio.sleep(0.25)


async def _canary(client: StreamClient, asks: list[Ask]) -> bool:
    outs = [Outcome(a, "canary", time.monotonic(), 0) for a in asks]
    await asyncio.gather(*(client.send(o) for o in outs))
    return all(o.completed for o in outs)


async def recovery(ctx: Ctx, log: FaultLog, canary: StreamClient, asks: list[Ask], limit_s: float) -> float | None:
    """Seconds from the fault's start until the cluster serves as before: what it stopped is back,
    /healthz is 200 with every worker live, and a short request to the base model and one to an
    adapter both complete (tried every half second). None if not within ``limit_s`` of the
    fault's end."""
    await log.restored_event.wait()
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        if ctx.stack.dead():  # something exited after the fault was over: it will not recover
            return None
        status, body = await ctx.stack.health()
        if status == 200 and body.get("workers") == ctx.stack.workers and await _canary(canary, asks):
            return time.monotonic() - log.start
        await asyncio.sleep(0.5)
    return None


async def run_phase(
    ctx: Ctx, traffic: Traffic, fault: Fault, probes: list[Ask], canary: StreamClient, timing: Timing
) -> dict[str, Any]:
    stack = ctx.stack
    before = await steady(ctx, timing.settle_s)
    offsets = {name: proc.log.stat().st_size for name, proc in stack.procs.items()}
    traffic.phase = fault.name
    traffic.start()
    await asyncio.sleep(timing.lead_s)
    for p in probes:  # just before the fault, which waits until requests are in flight: they are
        traffic.send(p)
    log = FaultLog(time.monotonic())
    adapter = next((a for a in traffic.adapters if a is not None), None)
    asks = [Ask("canary", 0, None, [5, 6, 7], 2)] + ([Ask("canary", 1, adapter, [5, 6, 7], 2)] if adapter else [])
    monitor = asyncio.create_task(recovery(ctx, log, canary, asks, timing.recovery_timeout_s))
    try:
        await fault.inject(ctx, log)
    except Exception as e:  # noqa: BLE001 - reported as the fault's own failure; the run goes on
        log.event("the fault itself failed", error=f"{type(e).__name__}: {e}", trace=traceback.format_exc()[-1500:])
        log.restored()
    await asyncio.sleep(timing.tail_s)
    await traffic.pause()
    await traffic.drain(timing.drain_s)
    try:
        recovery_s = await asyncio.wait_for(monitor, timing.recovery_timeout_s + 30)
    except TimeoutError:
        recovery_s = None
    after = await steady(ctx, timing.settle_s)
    exited = await repair(ctx, offsets)
    # An empty Redis lost the adapter registry: say so, and register the adapters again (as an
    # operator would) so the faults after this one have them.
    reregistered: list[str] = []
    with contextlib.suppress(Exception):
        reregistered = await stack.register_adapters()
    notes = {}
    for name, proc in stack.procs.items():
        if name not in ("nats", "redis") and (n := log_notes(proc.log_since(offsets[name]))):
            notes[name] = n
    outcomes = [o for o in traffic.outcomes if o.phase == fault.name]
    return summarize_phase(
        fault,
        log,
        outcomes,
        ctx,
        before=before,
        after=after,
        recovery_s=recovery_s,
        reregistered=reregistered,
        notes=notes,
        exited=exited,
    )


async def repair(ctx: Ctx, offsets: dict[str, int]) -> dict[str, dict[str, Any]]:
    """Processes that exited during the phase: their exit status and last log lines (the evidence),
    then started again (as an operator would), so the next fault is judged on its own."""
    found: dict[str, dict[str, Any]] = {}
    for name in ctx.stack.dead():
        proc = ctx.stack.procs[name]
        lines = [line for line in proc.log_since(offsets[name]).splitlines() if line.strip()]
        found[name] = {"exit_status": proc.popen.returncode if proc.popen else None, "log_tail": lines[-8:]}
        try:
            if name in ("nats", "redis"):
                await ctx.stack.start_server(name)
            else:
                await ctx.stack.restart_service(name)
        except StackError as e:
            found[name]["restart_failed"] = str(e)[-500:]
    if found:
        await steady(ctx, 60.0)
    return found
