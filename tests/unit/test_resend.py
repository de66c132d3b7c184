"""What a worker keeps to publish again after a NATS reconnect (``chunks.Resend``). Pure."""

from __future__ import annotations

from dlora.common import subjects
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


def test_a_reader_is_sent_again_its_requests_chunks_wherever_their_reply_subject_is() -> None:
    """An application named ``app.rs3`` reads replies under its user's subjects
    (``reply_inbox(id, "app")``, as the README's example does): sent again only what was on
    ``dlora.reply.app.rs3.*``, it got nothing back after a reconnect (a helper's finding)."""
    resend = Resend(window_s=10.0)
    resend.add(0.0, subjects.reply_inbox("x", "app"), TokenChunk(request_id="x", seq=0), client="app.rs3")
    resend.add(0.0, subjects.reply_inbox("y", "app"), TokenChunk(request_id="y", seq=0), client="app.other")
    resend.add(0.0, subjects.reply_inbox("z", "gw-1"), TokenChunk(request_id="z", seq=0))  # a reader without a name
    assert [c.request_id for _, c in resend.recent(1.0, "app.rs3")] == ["x"]
    assert [c.request_id for _, c in resend.recent(1.0, "gw-1")] == ["z"]  # by its subjects, as before
    assert [c.request_id for _, c in resend.recent(1.0)] == ["x", "y", "z"]  # the worker's own reconnect: all


def test_the_workers_own_reconnect_sends_named_readers_chunks_at_most_once() -> None:
    """After a NATS restart each named reader says it reconnected and is sent its own then
    (``recent(now, client)``): the worker's own passes carry a named reader's chunks only at the
    first, where none were sent to it since (``claimed``), and an unnamed reader's at every one."""
    resend = Resend(window_s=10.0)
    resend.add(0.0, subjects.reply_inbox("g", "gw-1"), TokenChunk(request_id="g", seq=0), client="gw-1")
    resend.add(0.0, subjects.reply_inbox("h", "gw-2"), TokenChunk(request_id="h", seq=0), client="gw-2")
    resend.add(0.0, subjects.reply_inbox("u", "app"), TokenChunk(request_id="u", seq=0))
    resend.add(-20.0, subjects.reply_inbox("old", "app"), TokenChunk(request_id="old", seq=0))  # past the window
    cases = [(set[str](), ["g", "h", "u"]), ({"gw-1"}, ["h", "u"]), ({"gw-1", "gw-2"}, ["u"]), (None, ["u"])]
    for claimed, sent in cases:
        assert [c.request_id for _, c in resend.unclaimed(1.0, claimed)] == sent, claimed
