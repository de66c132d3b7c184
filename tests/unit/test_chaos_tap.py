"""The chaos tap's verdict on what the workers published (pure: chunks in, counts out)."""

from dlora.loadgen.chaos.tap import Seen, generation


def seen(at: float, worker: str, attempt: int, seq: int) -> Seen:
    return Seen(at=at, worker=worker, attempt=attempt, seq=seq, tokens=1, error=False)


def test_a_takeover_that_regenerates_the_step_in_flight_is_not_generated_twice() -> None:
    chunks = [seen(0.1 * i, "w0", 0, i) for i in range(10)] + [seen(5.0 + 0.1 * i, "w1", 1, 9 + i) for i in range(5)]
    g = generation(chunks)
    assert (g.regenerated, g.stale_after_takeover, g.twice) == (1, 0, False)


def test_the_stopped_worker_s_last_chunk_arriving_late_is_not_generated_twice() -> None:
    """SIGSTOPped with its step's chunk in the process's buffer, it goes out on SIGCONT, after the
    later attempt regenerated it: the same chunk, late, not a step run after the takeover."""
    chunks = [seen(0.1 * i, "w0", 0, i) for i in range(10)] + [seen(5.0 + 0.1 * i, "w1", 1, 10 + i) for i in range(5)]
    chunks.append(seen(8.0, "w0", 0, 10))
    g = generation(chunks)
    assert (g.regenerated, g.stale_after_takeover, g.twice) == (1, 0, False)


def test_a_step_the_earlier_attempt_ran_after_the_takeover_is_generated_twice() -> None:
    chunks = [seen(0.1 * i, "w0", 0, i) for i in range(10)] + [seen(5.0 + 0.1 * i, "w1", 1, 10 + i) for i in range(5)]
    chunks += [seen(8.0, "w0", 0, 10), seen(8.1, "w0", 0, 11)]
    g = generation(chunks)
    assert g.stale_after_takeover == 1 and g.twice
