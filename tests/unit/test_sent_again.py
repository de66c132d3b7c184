"""Which second request under an id in flight is that request sent again (``inflight.sent_again``). Pure."""

from __future__ import annotations

import msgspec
import pytest

from dlora.common.inflight import sent_again
from dlora.common.messages import GenerateRequest, SamplingParams

SENT = GenerateRequest(
    request_id="r",
    reply_to="dlora.reply.app.r",
    adapter="lora-0",
    prompt_token_ids=[5, 6],
    params=SamplingParams(max_tokens=8, temperature=0.7),
    created=100.0,
    deadline=200.0,
)
# as the dispatcher recorded it: a seed drawn, the version stamped, resumed once after a worker died
HELD = msgspec.structs.replace(
    SENT,
    params=msgspec.structs.replace(SENT.params, seed=12345),
    adapter_version="v1",
    recorded=True,
    resume_token_ids=[7, 8],
    next_seq=3,
    recoveries=1,
    continued=True,
)


@pytest.mark.parametrize(
    "change,again",
    [
        ({}, True),
        ({"created": 150.0, "deadline": 260.0}, True),  # built anew: the sender's clock moved
        ({"params": SamplingParams(max_tokens=8, temperature=0.7, seed=1)}, False),  # a seed of its own
        ({"adapter_version": "v2"}, False),  # a version of its own
        ({"adapter_version": "v1"}, True),
        ({"prompt_token_ids": [5, 7]}, False),
        ({"params": SamplingParams(max_tokens=5, temperature=0.7)}, False),
        ({"priority": -1}, False),
        ({"reply_to": "dlora.reply.app.other"}, False),
    ],
)
def test_a_retry_is_the_request_as_sent_whatever_the_services_added(change: dict, again: bool) -> None:
    assert sent_again(HELD, msgspec.structs.replace(SENT, **change)) is again


def test_a_seed_the_sender_gave_must_match() -> None:
    seeded = msgspec.structs.replace(SENT, params=SamplingParams(max_tokens=8, temperature=0.7, seed=12345))
    assert sent_again(HELD, seeded)


def test_a_retry_of_a_request_moved_before_its_first_token_is_sent_again() -> None:
    # as the worker that moved it recorded it at the destination: its wait there carried along
    # (a retry refused as another request failed the stream under way with duplicate-id)
    moved = msgspec.structs.replace(HELD, queued_s=1.5, kv_chunks=2, kv_transfer="t", kv_export_s=0.01)
    assert sent_again(moved, SENT)
