"""Where a structured output's grammar starts (``structured_after_token_ids``, a reasoning model's
``</think>``), read from the output's token ids alone; and the field on the wire, which a worker
that does not know it refuses rather than serving the request constrained from its first token."""

from __future__ import annotations

import msgspec
import pytest

from dlora.common.messages import SamplingParams
from dlora.services.worker.engine.grammar_start import completes, grammar_start


@pytest.mark.parametrize(
    ("output", "after", "start"),
    [
        ([], [], 0),  # none named: from the first token
        ([7, 8], [], 0),
        ([], [9], None),  # not yet
        ([1, 2, 3], [9], None),
        ([1, 9, 3], [9], 2),  # just past it
        ([9], [9], 1),  # the last token: the next one is the grammar's
        ([1, 9, 4, 9, 5], [9], 2),  # the first occurrence: a later "</think>" is the document's text
        ([4, 5, 4, 6, 4, 5], [4, 5], 2),
        ([4, 4, 5, 1], [4, 5], 3),  # overlapping its own start
        ([4, 6, 5], [4, 5], None),  # its ids apart are not it
        ([5], [4, 5], None),
    ],
)
def test_the_grammar_starts_past_the_first_end_sequence(output: list[int], after: list[int], start: int | None) -> None:
    assert grammar_start(output, after) == start


@pytest.mark.parametrize(
    ("output", "after"), [([1, 9, 4, 9, 5], [9]), ([4, 4, 5, 1, 4, 5], [4, 5]), ([3, 3, 3], [3, 3]), ([1, 2], [2, 1])]
)
def test_a_token_at_a_time_finds_the_start_a_replay_finds(output: list[int], after: list[int]) -> None:
    """The engine checks each token as it comes (``completes``); a resumed request scans its
    output (``grammar_start``): both must say the same, or a moved request leaves its grammar."""
    found = None
    for n in range(1, len(output) + 1):
        if found is None and completes(output[:n], after):
            found = n
        assert found == grammar_start(output[:n], after)


def test_the_field_is_sent_only_when_set_and_an_older_worker_refuses_it() -> None:
    """Left empty it is not on the wire (an older worker takes the request); set, a worker whose
    SamplingParams lack it refuses to read the request (forbid_unknown_fields: handed back for a
    newer worker, else a 503 naming the field), never grammar-binding the reasoning."""
    assert b"structured_after_token_ids" not in msgspec.json.encode(SamplingParams(json_schema="{}"))
    sent = msgspec.json.encode(SamplingParams(json_schema="{}", structured_after_token_ids=[151668]))
    assert msgspec.json.decode(sent, type=SamplingParams).structured_after_token_ids == [151668]
    fields = [
        (f.name, f.type, msgspec.field(default=f.default, default_factory=f.default_factory))
        for f in msgspec.structs.fields(SamplingParams)
        if f.name != "structured_after_token_ids"
    ]
    older = msgspec.defstruct("SamplingParams", fields, kw_only=True, forbid_unknown_fields=True)
    with pytest.raises(msgspec.ValidationError, match="structured_after_token_ids"):
        msgspec.json.decode(sent, type=older)


def test_the_field_is_checked() -> None:
    assert SamplingParams(structured_after_token_ids=[-1]).invalid()[0] == "structured_after_token_ids"  # type: ignore[index]
    assert SamplingParams(structured_after_token_ids=[1] * 65).invalid()[0] == "structured_after_token_ids"  # type: ignore[index]
    assert SamplingParams(structured_after_token_ids=[600]).outside_vocab(512)[0] == "structured_after_token_ids"  # type: ignore[index]
