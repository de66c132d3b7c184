import pytest

from dlora.services.worker.cycles import StepCycles, batch_bucket


def test_batch_buckets_are_the_power_of_two_at_or_above() -> None:
    assert [batch_bucket(n) for n in (1, 2, 3, 4, 5, 8, 9, 33, 64)] == [1, 2, 4, 4, 8, 8, 16, 64, 64]


def test_a_cycle_runs_from_a_decode_step_s_start_to_the_next_step_s_while_busy() -> None:
    c = StepCycles()
    c.stepped(10.0, 3, prefill=0, engine_s=0.4)  # opens a cycle of bucket 4
    c.stepped(10.5, 4, prefill=0, engine_s=0.4)  # closes it: 0.5 s; opens another of 4
    c.stepped(11.25, 8, prefill=40, engine_s=0.4)  # closes: 0.75 s; a prefill step opens none
    c.stepped(12.0, 8, prefill=0, engine_s=0.4)  # nothing open to close
    c.idle()  # the loop waited: the open cycle is dropped
    c.stepped(20.0, 16, prefill=0, engine_s=0.4)
    assert c.counts == {4: 2} and c.sequences == {4: 7} and c.seconds == {4: 1.25}


def test_steps_that_switched_or_loaded_and_stalls_are_not_timed() -> None:
    """The simulator prices merges, unmerges and loads apart; a cycle over 5x its engine step is a
    stall (a flush or a Redis write waiting out an outage), not the shell's steady cost."""
    c = StepCycles()
    c.stepped(0.0, 8, prefill=0, engine_s=0.1, switched=True)  # a merge in it: opens none
    c.stepped(1.0, 8, prefill=0, engine_s=0.1)
    c.stepped(1.6, 8, prefill=0, engine_s=0.1)  # 0.6 s > 5 x 0.1: a stall, dropped
    c.stepped(1.75, 8, prefill=0, engine_s=0.1)  # 0.15 s: timed
    assert c.counts == {8: 1} and c.seconds == {8: pytest.approx(0.15)}
