"""Where a request without output goes among those waiting: by when it entered the system, as
Llumnix queues a migrated waiting request (``sequence.fcfs_arrival``). Pure: sequences by hand."""

from __future__ import annotations

from dlora.services.worker.engine.sequence import PRIORITY_SPAN, Sequence, fcfs_arrival
from tests.unit.test_scheduler import seq


def waiting(rid: str, key: int, arrival_time: float, outputs: int = 0, cached: int = 0) -> Sequence:
    s = seq(rid, key, 4, outputs=outputs)
    s.arrival_time, s.num_cached = arrival_time, cached
    return s


def order(seqs: list[Sequence], key: int, rid: str) -> list[str]:
    return [s.request_id for s in sorted([*seqs, waiting(rid, key, 0.0)], key=lambda s: s.arrival)]


def test_a_request_moved_before_its_first_token_waits_behind_only_those_that_came_before_it() -> None:
    """llumnix-project/llumnix-ray PR #36: a migrated waiting request keeps its arrival_time and
    the destination's waiting queue is sorted by it. Here 'a' came at 10 s and 'b' at 30 s; one
    that came at 20 s goes between them (it was keyed after 'b', the newest), one at 5 s before
    both, one at 40 s after both, and the keys of others' priorities are not looked at."""
    seqs = [waiting("a", 0, 10.0), waiting("b", 2, 30.0), waiting("other", PRIORITY_SPAN, 25.0)]
    assert order(seqs, fcfs_arrival(3, False, seqs, arrival_time=20.0), "m") == ["a", "m", "b", "other"]
    assert order(seqs, fcfs_arrival(3, False, seqs, arrival_time=5.0), "m") == ["m", "a", "b", "other"]
    assert fcfs_arrival(3, False, seqs, arrival_time=40.0) == fcfs_arrival(3, False, seqs) == 6


def test_it_does_not_go_ahead_of_a_request_that_holds_kv_or_has_output() -> None:
    """A prompt part-prefilled (holding blocks: vLLM's running list) or a request that has made
    tokens is no newcomer to pass: the moved one goes behind them, as before; and a later-moved one
    that came earlier than an earlier-moved one still goes ahead of it (its key below that one's)."""
    half = waiting("half", 0, 30.0, cached=4)
    made = waiting("made", 1, 30.0, outputs=2)
    assert fcfs_arrival(2, False, [half, made], arrival_time=20.0) == 4
    first = [waiting("a", 0, 10.0), waiting("b", 2, 30.0)]
    moved = waiting("m", fcfs_arrival(3, False, first, arrival_time=20.0), 20.0)
    earlier = fcfs_arrival(4, False, [*first, moved], arrival_time=15.0)
    assert order([*first, moved], earlier, "e") == ["a", "e", "m", "b"]


def test_a_resumed_request_is_keyed_as_before() -> None:
    """One with output (moved while generating, preempted) goes ahead of every newcomer waiting,
    whatever its arrival_time (``fcfs_arrival``'s resumed rule, unchanged)."""
    seqs = [waiting("a", 0, 10.0), waiting("b", 2, 30.0)]
    assert fcfs_arrival(3, True, seqs, arrival_time=50.0) == -1
