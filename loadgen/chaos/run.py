"""A chaos run: the stack up, the probes' expected text computed, then each fault in turn under
load (``phases``), the stack down, the results returned (and written, by ``main``)."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from dlora.loadgen.chaos.faults import Ctx, Fault, all_faults, catalogue
from dlora.loadgen.chaos.phases import Timing, run_phase, steady
from dlora.loadgen.chaos.report import summary
from dlora.loadgen.chaos.stack import ChaosStack
from dlora.loadgen.chaos.tap import BusTap
from dlora.loadgen.chaos.traffic import LoadShape, StreamClient, Traffic, oracle, probe_asks


@dataclass
class ChaosConfig:
    workdir: Path
    model: Path
    adapters: dict[str, Path]
    workers: int = 2
    heartbeat_ttl_s: float = 5.0
    faults: list[str] | None = None  # names (see faults.all_faults); None: every one
    shape: LoadShape = field(default_factory=LoadShape)
    timing: Timing = field(default_factory=Timing)
    probe_tokens: int = 96
    retries: int = 2  # as the openai package retries


def pick_faults(workers: list[str], names: list[str] | None) -> list[Fault]:
    """The faults named (ValueError, listing the known ones, for a wrong name), or the default run."""
    if names is None:
        return all_faults(workers)
    known = catalogue(workers)
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ValueError(f"unknown faults {unknown}; known: {', '.join(known)}")
    return [known[n] for n in names]


async def run_chaos(cfg: ChaosConfig, machine: str, say: Callable[[str], None] = print) -> dict[str, Any]:
    stack = ChaosStack(cfg.workdir, cfg.model, cfg.adapters, cfg.workers, cfg.heartbeat_ttl_s)
    faults = pick_faults(stack.worker_ids, cfg.faults)
    adapters: list[str | None] = [None, *cfg.adapters]
    count = max(1, cfg.timing.probes) * len(faults)
    say(f"computing the expected text of {count} probes offline, while the stack starts")
    # In a thread beside the stack's start, which mostly waits for its processes: before it, the
    # oracle alone took over a quarter of a short run (the chaos test's: 24 s of 84, loaded).
    asks = probe_asks(adapters, count, cfg.probe_tokens)
    expected = asyncio.ensure_future(asyncio.to_thread(oracle, cfg.model, cfg.adapters, asks))
    tap = BusTap()
    ctx = Ctx(stack, tap)
    phases: list[dict[str, Any]] = []
    client = canary = None
    try:
        say(f"starting the stack under {cfg.workdir} (logs in {cfg.workdir / 'logs'})")
        t0 = time.monotonic()
        await stack.start()
        say(f"stack up in {time.monotonic() - t0:.1f} s: {stack.url}")
        probes = await expected
        await tap.start(stack.observer_nats_url)
        base = cfg.model.name

        def gen() -> int:
            return ctx.gateway_gen

        client = StreamClient(stack.url, base, gen, retries=cfg.retries)
        canary = StreamClient(stack.url, base, gen, retries=0, timeout_s=30)
        traffic = Traffic(client, adapters, cfg.shape)
        ctx.nudge = lambda: traffic.send(traffic.next_ask())
        per = cfg.timing.probes
        for i, fault in enumerate(faults):
            say(f"[{i + 1}/{len(faults)}] {fault.name}: {fault.what}")
            result = await run_phase(ctx, traffic, fault, probes[i * per : (i + 1) * per], canary, cfg.timing)
            phases.append(result)
            say(
                f"    sent {result['sent']} completed {result['completed']} failed {result['failed']} "
                f"(via killed gateway {result['through_killed_gateway']['requests']}); probes "
                f"{result['probes']['exact']}/{result['probes']['sent']} exact; recovery {result['recovery_s']} s; "
                f"steady {result['steady_after']['ok']}; {'pass' if result['pass'] else 'FAIL'}"
            )
        final = await steady(ctx, cfg.timing.settle_s)
    finally:
        for c in (client, canary):
            if c is not None:
                await c.close()
        await tap.close()
        with contextlib.suppress(Exception):
            await stack.stop()
        # After the stop, so a failed start or a Ctrl-C does not leave the stack up while the
        # oracle's thread (~20 s, not cancellable) runs out: the wait for it comes last.
        await asyncio.gather(expected, return_exceptions=True)
    config = {
        "workers": cfg.workers,
        "heartbeat_ttl_s": cfg.heartbeat_ttl_s,
        "load": asdict(cfg.shape),
        "timing": asdict(cfg.timing),
        "probe_tokens": cfg.probe_tokens,
        "client_retries": cfg.retries,
        "model": str(cfg.model),
        "adapters": sorted(cfg.adapters),
    }
    out = summary(phases, machine, config)
    out["steady_at_end"] = final
    return out
