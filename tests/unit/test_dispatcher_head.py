"""What a dispatcher or worker reads of a request that does not decode, to tell its sender why."""

from __future__ import annotations

import json

import msgspec
import pytest

from dlora.common import subjects
from dlora.common.messages import MAX_NAME, GenerateRequest
from dlora.common.undecodable import RequestHead, field_of, refusal, request_head


def test_the_head_of_a_request_msgspec_refuses_is_read_to_answer_it() -> None:
    head = {"request_id": "r-1", "reply_to": "dlora.reply.app.r-1"}
    plain = RequestHead("r-1", head["reply_to"], False, 0, 0)
    assert request_head(json.dumps(head | {"params": {"max_tokens": "4"}}).encode()) == plain
    # Python's json.dumps writes a lone surrogate as a valid escape; msgspec calls it truncated
    assert request_head(json.dumps(head | {"prompt": "hi \ud800"}).encode()) == plain._replace(lone_surrogate=True)
    assert request_head(json.dumps(head | {"request_id": 12345}).encode()) == plain._replace(request_id="12345")
    assert request_head(json.dumps(head | {"request_id": -1}).encode()) == plain._replace(request_id="-1")
    # a resumed request's answer continues its numbering, in its attempt
    resumed = head | {"next_seq": 7, "recoveries": 1, "params": {"newer_field": 1}}
    assert request_head(json.dumps(resumed).encode()) == plain._replace(next_seq=7, recoveries=1)
    assert request_head(json.dumps(head | {"next_seq": -1, "recoveries": True}).encode()) == plain
    # sent with NATS request/reply, it may name no reply subject: its id still goes back (a trial)
    for reply in ({}, {"reply_to": 7}):
        assert request_head(json.dumps({"request_id": "r", "prompt": 7} | reply).encode()) == RequestHead(
            "r", "", False, 0, 0
        )
    for unreadable in (b"{nope", b"[1]", json.dumps({"reply_to": "x"}).encode(), b"\xff\xfe"):
        assert request_head(unreadable) is None
    assert request_head(json.dumps(head | {"request_id": "r\ud800"}).encode()) is None  # cannot be written back


def test_a_request_id_too_long_is_answered_cut_on_its_reply_subject_too() -> None:
    """A helper's finding: a request whose id was over ``MAX_NAME`` characters was answered on the
    NATS reply subject of a request/reply alone, though README promises an error chunk on its
    reply_to too, where its reader waited for ever. It is answered there, under its id's first
    ``MAX_NAME`` characters; a reply_to not its sender's is still not written to."""
    rid, own, alices = "i" * 100_000, subjects.reply_inbox("r", "alice"), subjects.requests_of("alice")
    data = json.dumps({"request_id": rid, "reply_to": own, "prompt": "x"}).encode()
    with pytest.raises(msgspec.ValidationError) as e:
        msgspec.json.decode(data, type=GenerateRequest)
    assert request_head(data) is None  # a worker hands back no request under a cut id
    for reply, targets in (("", [own]), ("_INBOX.alice.x", [own, "_INBOX.alice.x"])):
        refused = refusal(alices, reply, data, e.value)
        assert refused is not None and refused[0] == targets
        chunk = refused[1]
        assert (chunk.request_id, chunk.error_code, chunk.param) == (rid[:MAX_NAME], "bad_request", "request_id")
    elsewhere = json.dumps({"request_id": rid, "reply_to": subjects.reply_inbox("r", "bob"), "prompt": "x"}).encode()
    assert refusal(alices, "", elsewhere, e.value) is None


def test_a_decode_error_names_the_field_at_fault() -> None:
    """An application over NATS read param null for a wrong type inside ``params`` (a trial), where
    a worker names the SamplingParams field for a wrong value: the same name for both."""
    head = {"request_id": "r", "reply_to": "x"}
    for fields, param in (
        ({"params": {"max_tokens": "ten"}}, "max_tokens"),
        ({"params": {"stop": [1]}}, "stop"),
        ({"params": {"temprature": 1}}, "temprature"),
        ({"params": 7}, "params"),
        ({"prompt": 7}, "prompt"),
        ({"prompt_token_ids": ["a"]}, "prompt_token_ids"),
        ({"request_id": ""}, "request_id"),  # "" ran, and a second at once was "already in flight"
    ):
        with pytest.raises(msgspec.ValidationError) as e:
            msgspec.json.decode(json.dumps(head | fields), type=GenerateRequest)
        assert field_of(str(e.value), "params") == param, (fields, str(e.value))
    assert field_of("Object missing required field `request_id`", "params") == "request_id"
    # the gateway's OpenAI bodies: the top-level field, a nested path named by its first
    assert field_of("Expected `str`, got `int` - at `$.messages[0].role`") == "messages"
    assert field_of("Object contains unknown field `x` - at `$.response_format`") == "response_format"
    assert field_of("not a validation message") is None
