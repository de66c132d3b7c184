"""What a worker keeps to publish again after a NATS reconnect (``chunks.Resend``). Pure."""

from __future__ import annotations

from dlora.common.messages import TokenChunk
from dlora.services.worker.chunks import Resend


def test_chunks_older_than_the_window_and_forgotten_requests_are_not_sent_again() -> None:
    resend = Resend(window_s=10.0)
    resend.add(0.0, "r.a", TokenChunk(request_id="a", seq=0))
    resend.add(5.0, "r.b", TokenChunk(request_id="b", seq=0))
    resend.add(6.0, "r.a", TokenChunk(request_id="a", seq=1))
    assert [(s, c.seq) for s, c in resend.recent(12.0)] == [("r.b", 0), ("r.a", 1)]
    resend.forget("a")  # another attempt serves it now
    assert [(s, c.request_id) for s, c in resend.recent(12.0)] == [("r.b", "b")]
    resend.add(13.0, "r.a", TokenChunk(request_id="a", seq=2, recoveries=1))  # the later attempt's own
    assert [c.request_id for _, c in resend.recent(13.0)] == ["b", "a"]
