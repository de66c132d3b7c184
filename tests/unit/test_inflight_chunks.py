"""Chunks kept for a record while Redis is down, joined: a run joined already joins whole."""

from __future__ import annotations

from dlora.common.inflight import Sent


def test_a_chunk_joins_a_run_that_is_joined_already() -> None:
    """A failed retry's joined run put back after an older chunk: it was counted as one chunk and
    its last seq taken for its first's, so the record's next lagged its tokens (a review)."""
    a, b, c = (Sent(0, seq, [10 + seq], 0) for seq in range(3))
    run = b.then(c)
    assert run is not None and (run.seq, run.last, run.counts) == (1, 2, (1, 1))
    whole = a.then(run)
    assert whole is not None and (whole.seq, whole.last, whole.counts) == (0, 2, (1, 1, 1))
    assert whole.token_ids == [10, 11, 12]
    assert whole.spans == (2, "1,1,1") and a.spans == (0, "1")
    assert a.then(Sent(1, 1, [11], 0)) is None and a.then(c) is None  # another attempt, or not the next chunk
