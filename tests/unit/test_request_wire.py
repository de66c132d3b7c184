"""A GenerateRequest on the wire says only what its sender set: an older dispatcher, which refuses
a field it does not know, reads an application's request made with a newer library."""

from __future__ import annotations

import msgspec

from dlora.common.messages import GenerateRequest
from dlora.common.sampling import SamplingParams


class _OlderRequest(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """What a dispatcher of an older version decodes an application's request as (fewer fields)."""

    request_id: str
    reply_to: str
    prompt_token_ids: list[int] | None = None
    params: SamplingParams = SamplingParams()
    adapter: str | None = None


def test_an_older_dispatcher_reads_a_request_that_uses_nothing_new() -> None:
    """A helper's upgrade trial: every field went out at its default ("model_digest": ""), and a
    dispatcher two months older refused every request of an upgraded application."""
    sent = msgspec.json.encode(
        GenerateRequest(request_id="r", reply_to="_INBOX.r", prompt_token_ids=[1, 2], adapter="sql")
    )
    assert msgspec.json.decode(sent, type=_OlderRequest).adapter == "sql"
    assert msgspec.json.decode(sent, type=GenerateRequest).model_digest == ""  # read back as it was
