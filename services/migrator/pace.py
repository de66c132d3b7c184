"""How fast this machine runs the planner now, measured while it plans: the time bound's reserves
(CBC's round trip, as past plans measured it, and the model's build) are priced at that pace. Pure
but for the clocks."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from dlora.services.migrator.settings import CBC_OVERHEAD_S, PlannerSettings

# Pace is capped here: past it every reserve is larger than any bound a migrator is given anyway.
MAX_PACE = 20.0
# Wall seconds without CPU forgiven once: a window of a few ms holds one stall (the GIL held by the
# migrator's loop for its switch interval, 5 ms; a slice of another process), not a share of a core.
# Counted, 1.5 ms of greedy pass and a 4 ms stall read as pace 3.5, a 1.05 s reserve, and a 2-worker
# cluster got the greedy plan with 0.99 s of its 1 s bound left (5 plans in 60 beside a loop decoding
# stats; a review). Taken as a prior of 20 ms at pace 1 instead, it hid the share too: 32 x 128 x
# 2,000 built its model at 4.5x oversubscription and its plan came in 1.06 s.
STALL_S = 0.01
# Kept back at the least for CBC's round trip once measured, in seconds at pace 1, and the margin
# over the measured figure: runs vary (0.26-0.65 s of wall at one size under load 14 here) and the
# plan may not come late.
RESERVE_FLOOR_S = 0.05
RESERVE_MARGIN = 1.5
# Weight of the latest run in the kept figure (``RoundTrips``): a few runs, load changing slowly.
ROUND_TRIP_WEIGHT = 0.3
# CPU seconds a model variable takes to build (PuLP, here: 0.03-0.04 ms of thread time each at
# 2,000-5,000 variables), priced at the pace before a model is built.
BUILD_S_PER_VARIABLE = 4e-5


def reserve_s(pace: float, round_trip: float | None) -> float:
    """Seconds kept back from CBC's time limit for its round trip (writing the model, starting CBC,
    reading its solution back) at ``pace`` (``Clock.pace``): ``round_trip``, the seconds it took
    past the limit at this planner's past runs, at pace 1 (``RoundTrips``), with a margin and a
    floor; before any (None), ``CBC_OVERHEAD_S`` at that pace. The fixed 0.3 s, measured at 32 x
    128 x 2,000 idle, is 2.7 s at pace 9: past the 1 s bound, so no model was built where a small
    one's round trip takes a tenth of that (8 x 64 x 500 fell back using 0.17 s of its 1 s). Never
    more than that fixed figure: a reserve past the bound builds no model, so no CBC run measures
    the round trip again, and one slow run (or a solve's whole time) kept every later plan greedy."""
    if round_trip is None:
        return CBC_OVERHEAD_S * pace
    return min(CBC_OVERHEAD_S, max(RESERVE_FLOOR_S, RESERVE_MARGIN * round_trip)) * pace


@dataclass
class RoundTrips:
    """CBC's round trip at a planner's past runs, from its start to the plan's return less the time
    CBC was given, in seconds at pace 1 (a decayed mean), kept by its caller across plans (the
    migrator's service): what ``reserve_s`` reserves. None: none yet. Counted to CBC's return
    alone, the checks after it were left out and plans came 10 ms past the bound at load 15."""

    seconds: float | None = None
    # This plan's solve: (when CBC was started, perf_counter seconds; the seconds it was given;
    # whether it ran to them; whether it gave a solution); None: none started since the last ``done``.
    solving: tuple[float, float, bool, bool] | None = None

    def done(self, now: float, pace: float) -> None:
        """The plan returns at ``now`` (perf_counter seconds): its solve, if one ran, is observed."""
        if self.solving is not None:
            began, limit, stopped, solved = self.solving
            self.solving = None
            self.observe(now - began, limit, stopped, pace, solved)

    def observe(self, elapsed: float, limit: float, stopped: bool, pace: float, solved: bool = True) -> None:
        """One solve: ``elapsed`` wall seconds for CBC given ``limit`` seconds, ``stopped``: it ran to
        that limit (else it ended sooner, and ``elapsed`` bounds the round trip from above: it can
        lower the figure, never raise it; taken as the trip, a small model solved to optimum in
        0.2 s kept back 0.3 s of its bound at every later plan), at ``pace``. ``solved``: it gave a
        solution (optimal, or its incumbent at the limit); a run that gave none (an infeasible
        model ended at once, or none found by the limit) may raise the figure, never lower it nor
        set the first (a CBC killed is not observed: ``ilp.solve`` returns before):
        read as having run to its limit, an infeasible end counted a round trip of 0 (left by the
        last session), and the next plans kept back only the floor."""
        trip = max(0.0, elapsed - limit if stopped else elapsed) / max(1.0, pace)
        if not solved and (self.seconds is None or trip <= self.seconds):
            return
        if not stopped:
            trip = min(trip, CBC_OVERHEAD_S if self.seconds is None else self.seconds)
        self.seconds = trip if self.seconds is None else self.seconds + ROUND_TRIP_WEIGHT * (trip - self.seconds)


@dataclass(frozen=True)
class Clock:
    """When planning began, by the wall (``time.perf_counter``) and by this thread's CPU
    (``time.thread_time``); ``trips``: CBC's round trips at past plans (None: none kept)."""

    wall: float = field(default_factory=lambda: time.perf_counter())
    cpu: float = field(default_factory=lambda: time.thread_time())
    trips: RoundTrips | None = None

    def pace(self) -> float:
        """Wall seconds (less one stall, ``STALL_S``) per CPU second this thread had since it
        began: 1 where it had a core to itself, about 7 where seven runnable threads share each
        core; 1 to ``MAX_PACE``. CBC (a process of its own) is started, fed and read back at
        that pace: under 6x oversubscription its 0.2-0.25 s took 0.3-1.4 s, past the 0.3 s kept
        back, and the plan came 0.1-0.2 s late."""
        cpu = time.thread_time() - self.cpu
        wall = time.perf_counter() - self.wall
        return min(MAX_PACE, max(1.0, (wall - STALL_S) / cpu)) if cpu > 0 else 1.0

    def left(self, settings: PlannerSettings) -> float:
        """Seconds of the time bound left; a node bound is not timed (infinite)."""
        if settings.max_nodes is not None:
            return float("inf")
        return settings.time_limit_s - (time.perf_counter() - self.wall)

    def reserve(self) -> float:
        """Seconds kept back from CBC's time limit for its round trip, at this pace (``reserve_s``)."""
        return reserve_s(self.pace(), self.trips.seconds if self.trips else None)
