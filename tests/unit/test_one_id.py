"""Which of two processes beating under one worker id gives it up (services/worker/one_id.py)."""

from __future__ import annotations

from dlora.common.messages import WorkerStats
from dlora.services.worker.one_id import taken_over


def beat(incarnation: str, started: float) -> WorkerStats:
    return WorkerStats(
        worker="w-a",
        incarnation=incarnation,
        started=started,
        running=0,
        waiting=0,
        free_blocks=1,
        total_blocks=1,
        block_size=16,
        max_loras=1,
    )


def test_the_earlier_start_gives_the_id_up_and_only_it() -> None:
    old, new = beat("bbb", 100.0), beat("aaa", 105.0)
    assert taken_over(old, new) and not taken_over(new, old)


def test_a_tie_is_broken_by_the_incarnation_so_exactly_one_gives_up() -> None:
    one, other = beat("aaa", 100.0), beat("bbb", 100.0)
    assert taken_over(one, other) != taken_over(other, one)


def test_its_own_beat_no_beat_and_an_older_worker_that_does_not_say_take_nothing() -> None:
    mine = beat("aaa", 100.0)
    assert not taken_over(mine, None)
    assert not taken_over(mine, beat("aaa", 100.0))
    assert not taken_over(mine, beat("zzz", 0.0))  # an older version's worker (started 0)
