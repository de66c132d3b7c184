"""Per fault: what was sent and how it ended, the probes against the oracle, what the workers
published twice, how long the cluster took to serve again and whether it came back to rest; then
one table for the terminal and BENCHMARKS.md.

Requests "routed through the killed gateway" (in flight on it when it died, or sent while it was
down and refused) are counted apart: no gateway can answer a connection that its process took
with it, so they are outside the sent = completed check, and reported.
"""

from __future__ import annotations

import re
import time
from collections import Counter
from typing import TYPE_CHECKING, Any

from dlora.loadgen.chaos.faults import Ctx, Fault, FaultLog
from dlora.loadgen.chaos.tap import Generation, generation
from dlora.loadgen.chaos.traffic import Outcome

if TYPE_CHECKING:
    from matplotlib.figure import Figure

_IDS = re.compile(r"\b(?:cmpl-)?[0-9a-f]{8,}(?:-\d+)?\b")


def _reason(o: Outcome) -> str:
    """A failure's reason with request ids taken out, so equal reasons count together."""
    return _IDS.sub("<id>", o.reason or "")[:240]


def _through_killed_gateway(o: Outcome, ctx: Ctx) -> bool:
    if o.completed:
        return False
    at = o.broke_at if o.broke_at is not None else o.sent_at
    return any(killed - 0.5 <= at <= back + 0.5 for killed, back in ctx.gateway_down)


def summarize_phase(
    fault: Fault,
    log: FaultLog,
    outcomes: list[Outcome],
    ctx: Ctx,
    *,
    before: dict[str, Any],
    after: dict[str, Any],
    recovery_s: float | None,
    reregistered: list[str],
    notes: dict[str, dict[str, int]],
    exited: dict[str, dict[str, Any]],
) -> dict[str, Any]:
    through_gateway = [o for o in outcomes if _through_killed_gateway(o, ctx)]
    counted = [o for o in outcomes if o not in through_gateway]
    failed = [o for o in counted if not o.completed]
    probes = [o for o in counted if o.ask.kind == "probe"]
    mismatched = [o for o in probes if o.completed and not o.exact]
    # Requests running when the fault began: when the last of them ended.
    hit = [o for o in outcomes if o.sent_at < log.start and (o.ended_at or 0) > log.start]
    gens = {o.request_id: generation(ctx.tap.of(o.request_id)) for o in outcomes if o.request_id}
    twice = {rid: g for rid, g in gens.items() if g.twice}
    # Work done for nobody: tokens workers published for requests whose client was cut off with
    # the killed gateway, after it died.
    abandoned, abandoned_until = 0, 0.0
    for o in through_gateway:
        if o.request_id and o.broke_at is not None:
            late = [c for c in ctx.tap.of(o.request_id) if c.worker and c.at > o.broke_at]
            abandoned += sum(c.tokens for c in late)
            abandoned_until = max([abandoned_until, *(c.at - log.start for c in late)])
    gaps = [o.max_gap_s for o in counted if o.completed]
    result: dict[str, Any] = {
        "fault": fault.name,
        "what": fault.what,
        "sent": len(counted),
        "completed": len(counted) - len(failed),
        "failed": len(failed),
        "failures": dict(Counter(_reason(o) for o in failed).most_common()),
        "completed_after_retry": sum(1 for o in counted if o.completed and o.retried),
        "retry_reasons": dict(Counter(_reason_text(r) for o in counted for r in o.retried).most_common(5)),
        "through_killed_gateway": {
            "requests": len(through_gateway),
            "reasons": dict(Counter(_reason(o) for o in through_gateway).most_common(5)),
            "tokens_generated_after_it_died": abandoned,
            "last_of_them_s": round(abandoned_until, 2),  # after the kill (its heartbeat TTL bounds it)
        },
        "probes": {
            "sent": len(probes),
            "exact": sum(1 for o in probes if o.completed and o.exact),
            "mismatched": [_mismatch(o, ctx, log.start) for o in mismatched],
        },
        "hit_by_fault": len(hit),
        "affected_done_s": round(max((o.ended_at or 0) - log.start for o in hit), 2) if hit else None,
        "longest_stall_s": round(max(gaps), 2) if gaps else None,
        # served, in part or whole, by a later attempt (re-dispatched after its worker was lost)
        "resumed": sum(1 for g in gens.values() if g.last_attempt > 0),
        "generated_twice": {
            "requests": len(twice),
            "resent_chunks": sum(g.same_attempt_duplicates for g in gens.values()),  # sent again, not generated
            "stale_after_takeover": sum(g.stale_after_takeover for g in gens.values()),
            "regenerated_chunks": sum(g.regenerated for g in gens.values()),
            "examples": {rid: _evidence(g, log.start) for rid, g in list(twice.items())[:3]},
        },
        "published_tokens": sum(g.published_tokens for g in gens.values()),
        "delivered_tokens": sum(o.tokens for o in outcomes),
        "recovery_s": None if recovery_s is None else round(recovery_s, 2),
        "steady_before": before,
        "steady_after": after,
        "adapters_reregistered": reregistered,
        "events": log.events,
        "facts": log.facts,
        "service_log_notes": notes,
        "exited": exited,  # processes that exited on their own during the phase (restarted after it)
    }
    result["pass"] = bool(
        not failed
        and not mismatched
        and not twice
        and recovery_s is not None
        and after["ok"]
        and not reregistered
        and not exited
        and not any(e["what"] == "the fault itself failed" for e in log.events)
    )
    return result


def _mismatch(o: Outcome, ctx: Ctx, t0: float) -> dict[str, Any]:
    """A probe whose text is not the oracle's: where they part, and its chunks as the bus saw them."""
    got, expected = o.text, o.ask.expected or ""
    at = next((i for i, (a, b) in enumerate(zip(got, expected)) if a != b), min(len(got), len(expected)))
    return {
        "request_id": o.request_id,
        "adapter": o.ask.adapter,
        "first_difference_at_char": at,
        # the event (the chunk's seq) whose text first differs
        "first_difference_at_seq": next((i for i, end in enumerate(o.text_ends) if end > at), None),
        "got": got,
        "expected": expected,
        "retried": o.retried,
        "chunks": _evidence(generation(ctx.tap.of(o.request_id or "")), t0),
    }


def _evidence(g: Generation, t0: float) -> dict[str, Any]:
    """A request generated twice, its attempts' times from the fault's start."""
    out = dict(vars(g))
    out["timeline"] = [
        {**t, "first_at": round(float(t["first_at"]) - t0, 2), "last_at": round(float(t["last_at"]) - t0, 2)}  # type: ignore[arg-type]
        for t in g.timeline
    ]
    return out


def _reason_text(text: str) -> str:
    return _IDS.sub("<id>", text)[:160]


def table(phases: list[dict[str, Any]]) -> list[str]:
    """The per-fault figures as a Markdown table."""
    rows = [
        "| fault | sent | completed | failed | via killed gateway | retried, then ok | probes exact | "
        "resumed | generated twice | longest stall (s) | recovery (s) | steady after | pass |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for p in phases:
        steady_after = "yes" if p["steady_after"]["ok"] else f"no ({_why_not_steady(p['steady_after'])})"
        rows.append(
            f"| {p['fault']} | {p['sent']} | {p['completed']} | {p['failed']} | "
            f"{p['through_killed_gateway']['requests']} | {p['completed_after_retry']} | "
            f"{p['probes']['exact']}/{p['probes']['sent']} | {p['resumed']} | {p['generated_twice']['requests']} | "
            f"{p['longest_stall_s']} | {p['recovery_s'] if p['recovery_s'] is not None else 'never'} | "
            f"{steady_after} | {'yes' if p['pass'] else '**no**'} |"
        )
    return rows


def _why_not_steady(s: dict[str, Any]) -> str:
    why = []
    if s["healthz"] != 200:
        why.append(f"/healthz {s['healthz']}")
    if s["dead_processes"]:
        why.append(f"dead: {', '.join(s['dead_processes'])}")
    if s["inflight_left"]:
        why.append(f"{s['inflight_left']} in-flight records")
    if s["workers_busy"]:
        why.append(f"busy: {s['workers_busy']}")
    return "; ".join(why) or "?"


def plot(result: dict[str, Any]) -> Figure:
    """Per fault: how long the cluster took to serve again and the longest stall of a stream; how the
    requests sent during it ended. A fault that failed its checks has its name in red."""
    from dlora.loadgen.bench_common import figure

    fig, ax = figure(2)
    phases = result["phases"]
    at = list(range(len(phases)))
    names = [p["fault"] for p in phases]
    # Recovery "never" is drawn as no bar, and said at the axis.
    recovery = [p["recovery_s"] for p in phases]
    stall = [p["longest_stall_s"] or 0.0 for p in phases]
    height = 0.4
    ax[0].barh([y - height / 2 for y in at], [r or 0.0 for r in recovery], height, color="C0", label="recovery")
    ax[0].barh([y + height / 2 for y in at], stall, height, color="C1", label="longest stall")
    for y, r in zip(at, recovery):
        if r is None:
            ax[0].text(0, y - height / 2, " never", va="center", fontsize=6, color="C3")
    ax[0].set(xlabel="seconds from the fault", title="Recovery and longest stall")
    # Stacked: what was counted (completed, then failed), then what went through the killed gateway.
    completed = [p["completed"] for p in phases]
    failed = [p["failed"] for p in phases]
    gateway = [p["through_killed_gateway"]["requests"] for p in phases]
    ax[1].barh(at, completed, 0.6, color="C2", label="completed")
    ax[1].barh(at, failed, 0.6, left=completed, color="C3", label="failed")
    ax[1].barh(
        at, gateway, 0.6, left=[c + f for c, f in zip(completed, failed)], color="C7", label="via killed gateway"
    )
    ax[1].set(xlabel="requests sent during the fault", title="How the requests ended")
    for a in ax:
        a.set_yticks(at, names, fontsize=6)
        for label, p in zip(a.get_yticklabels(), phases):
            if not p["pass"]:
                label.set_color("C3")
        a.invert_yaxis()
        a.legend(fontsize=6)
    return fig


def failure_lines(phases: list[dict[str, Any]]) -> list[str]:
    """Every failure reason per fault, and the gateway's cut-off requests, as Markdown bullets."""
    out = []
    for p in phases:
        for reason, n in p["failures"].items():
            out.append(f"- {p['fault']}: {n} failed: {reason}")
        tg = p["through_killed_gateway"]
        if tg["requests"]:
            reasons = "; ".join(f"{n}x {r}" for r, n in tg["reasons"].items())
            out.append(
                f"- {p['fault']}: {tg['requests']} routed through the killed gateway ({reasons}); "
                f"workers generated {tg['tokens_generated_after_it_died']} tokens for them after it died"
            )
        for name, e in p.get("exited", {}).items():
            tail = " / ".join(e["log_tail"][-3:])[:400]
            out.append(f"- {p['fault']}: {name} exited by itself (status {e['exit_status']}): {tail}")
        if p["adapters_reregistered"]:
            out.append(
                f"- {p['fault']}: the adapter registry was gone afterwards; re-registered "
                f"{', '.join(p['adapters_reregistered'])} through the admin API"
            )
        if p["probes"]["mismatched"]:
            out.append(f"- {p['fault']}: {len(p['probes']['mismatched'])} probes differ from the oracle")
        if p["generated_twice"]["requests"]:
            g = p["generated_twice"]
            out.append(
                f"- {p['fault']}: {g['requests']} requests generated twice ({g['stale_after_takeover']} chunks from "
                f"a superseded attempt after the next had begun, {g['regenerated_chunks']} chunks generated by "
                "two attempts)"
            )
        if p["recovery_s"] is None:
            out.append(f"- {p['fault']}: the cluster did not serve the base model and an adapter again in time")
        if not p["steady_after"]["ok"]:
            out.append(f"- {p['fault']}: not back to steady state: {_why_not_steady(p['steady_after'])}")
    return out


def summary(phases: list[dict[str, Any]], machine: str, config: dict[str, Any]) -> dict[str, Any]:
    return {
        "machine": machine,
        "date": time.strftime("%Y-%m-%d"),
        "config": config,
        "passed": all(p["pass"] for p in phases),
        "phases": phases,
    }


def code_version() -> dict[str, Any]:
    """The commit of the code this process runs (and the stack with it: the services inherit its
    import path), and the files changed since: a chaos run tests a working tree."""
    import subprocess
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]

    def git(*a: str) -> str:
        done = subprocess.run(["git", "-C", str(root), *a], capture_output=True, text=True, check=False)
        return done.stdout.strip()

    changed = [line[3:] for line in git("status", "--porcelain", "--untracked-files=no").splitlines()]
    return {"commit": git("rev-parse", "--short", "HEAD"), "tree": str(root), "uncommitted": changed}


def version_text(code: dict[str, Any] | None) -> str:
    """``code_version()`` in words, for BENCHMARKS.md."""
    code = code or {}
    dirty = code.get("uncommitted") or []
    return f"commit {code.get('commit', '?')}" + (f" with uncommitted changes in {', '.join(dirty)}" if dirty else "")
