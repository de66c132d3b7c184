"""The gateway's reply stream: duplicates after a resume dropped, tokens counted, the end known."""

from dlora.common.messages import ErrorCode, FinishReason, TokenChunk
from dlora.services.gateway.replies import GAP_WAIT_S, ReplyStream


def chunk(seq: int, tokens: int = 1, **kw) -> TokenChunk:
    return TokenChunk(request_id="r", seq=seq, token_ids=list(range(tokens)), **kw)


def test_a_resumed_request_repeating_chunks_counts_each_once() -> None:
    r = ReplyStream("r")
    assert [r.accept(c) for c in (chunk(0, text="a"), chunk(1, text="b"), chunk(2, text="c"))] == [True, True, True]
    # the worker died; the recovered request resumes from its record, which says chunk 1
    assert r.accept(chunk(1, text="b")) is False and r.accept(chunk(2, text="c")) is False
    assert r.accept(chunk(3, text="d", finish_reason=FinishReason.LENGTH)) is True
    assert (r.tokens, r.text, r.next_seq, r.done, r.finish_reason) == (4, "abcd", 4, True, FinishReason.LENGTH)
    assert r.accept(chunk(4)) is False and r.tokens == 4  # nothing after the end


def test_an_error_ends_the_stream_with_its_reason() -> None:
    r = ReplyStream("r")
    r.accept(chunk(0, tokens=2))
    assert r.accept(
        chunk(1, tokens=0, error="worker died twice", error_code=ErrorCode.INTERNAL, finish_reason=FinishReason.ERROR)
    )
    assert r.done and r.error == "worker died twice" and r.error_code is ErrorCode.INTERNAL and r.tokens == 2


def test_chunks_after_a_gap_wait_for_it_to_fill() -> None:
    """Around a NATS restart a reader can miss chunks its worker sends again once reconnected:
    later chunks wait, and the whole run comes out in order when the gap fills."""
    r = ReplyStream("r")
    assert r.take(chunk(0, text="a"), now=0.0) == [chunk(0, text="a")]
    assert r.take(chunk(3, text="d"), now=1.0) == [] and r.take(chunk(2, text="c"), now=1.5) == []
    assert [c.seq for c in r.take(chunk(1, text="b"), now=3.0)] == [1, 2, 3]
    assert r.text == "abcd" and r.next_seq == 4 and r.tokens == 4 and not r.done
    assert r.take(chunk(2, text="c"), now=3.5) == []  # the second re-send: a duplicate


def test_a_gap_that_never_fills_fails_the_stream_instead_of_leaving_a_hole() -> None:
    r = ReplyStream("r")
    r.take(chunk(0), now=0.0)
    r.take(chunk(2), now=1.0)
    assert r.take(chunk(3), now=1.0 + GAP_WAIT_S + 0.1) == []
    assert r.done and r.error_code is ErrorCode.UNAVAILABLE and "chunks 1..1 were lost" in (r.error or "")


def test_an_error_numbered_behind_what_arrived_still_ends_the_stream() -> None:
    """A recovered request failed by the dispatcher is numbered from its in-flight record, which
    can lag the chunks the client has: the error must end the stream, not be dropped."""
    r = ReplyStream("r")
    for seq in range(4):
        r.accept(chunk(seq, text="x"))
    lagging = chunk(
        2,
        tokens=0,
        error="the request was in flight on 2 workers that died",
        error_code=ErrorCode.INTERNAL,
        finish_reason=FinishReason.ERROR,
    )
    assert r.accept(lagging) is True
    assert r.done and r.finish_reason is FinishReason.ERROR and r.tokens == 4 and r.text == "xxxx"
    assert r.accept(chunk(4)) is False  # nothing after the end


def test_a_stale_workers_late_error_does_not_end_a_resumed_stream() -> None:
    r = ReplyStream("r")
    r.accept(chunk(0, worker="w-old"))
    r.accept(chunk(1, worker="w-new"))  # resumed elsewhere
    late = chunk(
        1, tokens=0, error="boom", error_code=ErrorCode.INTERNAL, finish_reason=FinishReason.ERROR, worker="w-old"
    )
    assert r.accept(late) is False and not r.done
    assert (
        r.accept(chunk(2, finish_reason=FinishReason.LENGTH, worker="w-new")) and r.finish_reason is FinishReason.LENGTH
    )


def test_a_stalled_workers_chunks_are_dropped_once_a_later_attempt_spoke() -> None:
    """A worker stopped longer than the heartbeat is given up and its request re-dispatched
    (attempt 1); when it resumes, its attempt-0 chunks must not interleave with the new ones."""
    r = ReplyStream("r")
    assert r.accept(chunk(0, text="a", worker="w-hung"))
    assert r.accept(chunk(1, text="b", worker="w-new", recoveries=1))
    assert not r.accept(chunk(2, text="X", worker="w-hung"))  # resumed: its attempt is over
    late_error = chunk(2, tokens=0, error="boom", error_code=ErrorCode.INTERNAL, worker="w-hung")
    assert not r.accept(late_error) and not r.done
    assert r.accept(chunk(2, text="c", worker="w-new", recoveries=1, finish_reason=FinishReason.STOP))
    assert r.text == "abc" and r.attempt == 1


def test_held_chunks_of_an_earlier_attempt_are_dropped_when_a_later_one_speaks() -> None:
    r = ReplyStream("r")
    r.take(chunk(0, worker="w-hung"))
    assert r.take(chunk(2, text="stale", worker="w-hung")) == []  # held behind a gap
    assert r.gap_open
    assert [c.text for c in r.take(chunk(1, text="b", worker="w-new", recoveries=1))] == ["b"]
    assert not r.gap_open  # the stale attempt's chunk 2 went with its attempt
    assert [c.text for c in r.take(chunk(2, text="c", worker="w-new", recoveries=1))] == ["c"]


def test_cached_tokens_are_the_first_runs_after_a_move_or_recovery() -> None:
    """A trial: after a move or a recovery the usage said the recompute's prefix-cache hit (0 for a
    first run's 32; 40 of a 40-token prompt after a recovery), not the prompt's own prefill's."""
    from dlora.common.messages import Usage

    moved = ReplyStream("r")
    moved.accept(chunk(0, prompt_cached_tokens=32))
    moved.accept(chunk(1, recoveries=1))  # the destination's first chunk says none: continued
    moved.accept(
        chunk(
            2,
            recoveries=1,
            finish_reason=FinishReason.LENGTH,
            usage=Usage(prompt_tokens=40, completion_tokens=3, cached_tokens=40),
        )
    )
    assert moved.cached_tokens == 32
    alone = ReplyStream("r")  # never moved, or moved before its first chunk came: the usage's
    alone.accept(
        chunk(
            0, finish_reason=FinishReason.LENGTH, usage=Usage(prompt_tokens=40, completion_tokens=1, cached_tokens=16)
        )
    )
    assert alone.cached_tokens == 16


def test_a_long_completion_is_not_copied_at_each_chunk() -> None:
    """A chunk's text is kept as a piece, joined once when the text is read: the text was one str
    grown at every chunk, all of it copied each time (38 us a chunk at 128k tokens, 5 s of the loop).
    Checked by what is kept, not by the clock."""
    r, piece = ReplyStream("r"), "k" * 4096
    for seq in range(1600):
        r.take(chunk(seq, text=piece))
    assert len(r._pieces) == 1600  # none joined yet
    assert r.text == piece * 1600 and len(r._pieces) == 1 and r.text == piece * 1600  # joined once


def test_a_later_attempts_error_numbered_behind_ends_the_stream_and_names_its_worker() -> None:
    """A review: a recovered request's worker failed it (its adapter unreadable there) numbered from
    its in-flight record, which lagged the chunks the client had; from a worker other than the last
    token's, the error was dropped as a stale one's, and the client waited out its timeout. The
    stream also named the earlier worker as the one serving it (the access log's ``workers``)."""
    r = ReplyStream("r")
    for seq in range(4):
        r.accept(chunk(seq, text="x", worker="w-a"))
    error = dict(tokens=0, error="adapter could not be loaded", error_code=ErrorCode.INTERNAL)
    assert r.accept(chunk(2, worker="w-b", recoveries=1, finish_reason=FinishReason.ERROR, **error))
    assert (r.done, r.error_code, r.text, r.worker, r.attempt) == (True, ErrorCode.INTERNAL, "xxxx", "w-b", 1)


def test_a_later_attempts_worker_is_the_one_serving_the_request_before_it_sends_anything_new() -> None:
    """Its first chunks repeat what the client has (dropped); its error at the next number comes
    from the worker serving the request now, and the stream says which."""
    r = ReplyStream("r")
    for seq in range(3):
        r.accept(chunk(seq, worker="w-a"))
    assert not r.accept(chunk(2, worker="w-b", recoveries=1)) and r.worker == "w-b"
    failed = chunk(3, tokens=0, error="boom", error_code=ErrorCode.INTERNAL, worker="w-b", recoveries=1)
    assert r.accept(failed) and r.done and r.worker == "w-b"
    dispatcher = ReplyStream("r")  # a dispatcher's chunk names no worker: the last one stays
    dispatcher.accept(chunk(0, worker="w-a"))
    assert dispatcher.accept(chunk(0, tokens=0, error="lost", error_code=ErrorCode.INTERNAL, recoveries=1))
    assert dispatcher.worker == "w-a"
