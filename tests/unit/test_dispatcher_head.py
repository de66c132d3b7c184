"""What the dispatcher reads of a request that does not decode, to tell its sender why."""

from __future__ import annotations

import json

from dlora.services.dispatcher.main import request_head


def test_the_head_of_a_request_msgspec_refuses_is_read_to_answer_it() -> None:
    head = {"request_id": "r-1", "reply_to": "dlora.reply.app.r-1"}
    assert request_head(json.dumps(head | {"params": {"max_tokens": "4"}}).encode()) == ("r-1", head["reply_to"], False)
    # Python's json.dumps writes a lone surrogate as a valid escape; msgspec calls it truncated
    assert request_head(json.dumps(head | {"prompt": "hi \ud800"}).encode()) == ("r-1", head["reply_to"], True)
    assert request_head(json.dumps(head | {"request_id": 12345}).encode()) == ("12345", head["reply_to"], False)
    for unreadable in (b"{nope", b"[1]", json.dumps({"request_id": "r"}).encode(), b"\xff\xfe"):
        assert request_head(unreadable) is None
    assert request_head(json.dumps(head | {"request_id": "r\ud800"}).encode()) is None  # cannot be written back
