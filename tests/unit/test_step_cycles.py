from dlora.services.worker.cycles import StepCycles, batch_bucket


def test_batch_buckets_are_the_power_of_two_at_or_above() -> None:
    assert [batch_bucket(n) for n in (1, 2, 3, 4, 5, 8, 9, 33, 64)] == [1, 2, 4, 4, 8, 8, 16, 64, 64]


def test_a_cycle_runs_from_a_decode_step_s_start_to_the_next_step_s_while_busy() -> None:
    c = StepCycles()
    c.stepped(10.0, 3, prefill=0)  # opens a cycle of bucket 4
    c.stepped(10.5, 4, prefill=0)  # closes it: 0.5 s; opens another of 4
    c.stepped(11.25, 8, prefill=40)  # closes: 0.75 s; a prefill step opens none
    c.stepped(12.0, 8, prefill=0)  # nothing open to close
    c.idle()  # the loop waited: the open cycle is dropped
    c.stepped(20.0, 16, prefill=0)
    assert c.counts == {4: 2} and c.sequences == {4: 7} and c.seconds == {4: 1.25}
