"""Which workers dispatch and the migrator take for likely dead (``DispatchState.quiet``, the quiet
part of ``looks.unheard``): silent past half the heartbeat TTL and three of their last gaps between
stats, each gap taken as at least the interval the worker says it sends them at."""

import msgspec

from dlora.services.dispatcher.choose import DispatchCosts, DispatchMode
from dlora.services.dispatcher.state import DispatchState
from dlora.services.migrator.looks import unheard
from tests.unit.test_dispatch_choice import w


def test_a_gap_shorter_than_the_interval_a_worker_says_does_not_make_it_quiet() -> None:
    """A worker sends its stats every 2 s under a 5 s TTL: its next stats come 2 s and its Redis
    writes after its last, but heard once (no gap yet) or last heard by the early stats it sends as
    it falls idle (a 0.5 s gap), it was quiet past 2.5 s, and passed over by dispatch and left out
    of plans (the worker that just fell idle: where a plan would move requests to), whenever its
    Redis writes took half a second. Its gap is now at least the interval it says; a worker that
    says none (an older one) and one silent past three of its intervals are quiet as before."""
    state = DispatchState(5.0, DispatchMode.PROACTIVE, DispatchCosts())
    says = {"first": 2.0, "early": 2.0, "older": 0.0, "dead": 0.5}
    for name, interval in says.items():
        state.heard(msgspec.structs.replace(w(name), stats_interval_s=interval), now=0.0)
    state.heard(msgspec.structs.replace(w("early"), stats_interval_s=2.0), now=0.5)  # (fell idle)
    assert state.quiet(3.5) == {"older", "dead"}  # (each silent 3.5 s, "early" 3 s)
    # the migrator's rule alike (its silence: now less when the last stats came, monotonic seconds)
    heard = {v: 100.0 - 3.0 for v in says}
    intervals = {v: i for v, i in says.items() if i > 0}
    left_out = unheard(heard, {"early": 0.5}, 100.0, ttl_s=5.0, solve_s=1.0, intervals=intervals)
    assert left_out == {"older", "dead"}
