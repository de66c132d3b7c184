"""Stop handling alone: stop strings cut and checked only in the new text, stop tokens and EOS,
a complete structured document, the length limits, and the text held back for a stop string."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dlora.common.messages import FinishReason, SamplingParams
from dlora.services.worker.engine import stopping
from dlora.services.worker.engine.stopping import check_stop, ends_by_token, find_stop, partial_stop, visible_end

EOS = {2}


def stop(text: str, old_len: int, token: int = 7, n: int = 1, total: int = 10, **params) -> tuple:
    s = check_stop(text, old_len, token, SamplingParams(**params), EOS, n, total, max_model_len=100)
    return s.reason, s.text


def test_a_stop_string_cuts_the_text_where_it_begins() -> None:
    assert stop("hello wor", 8, stop=["wor"]) == (FinishReason.STOP, "hello ")
    assert stop("abXYcd", 3, stop=["cd", "XY"]) == (FinishReason.STOP, "ab")  # the earliest ending in the new part
    assert stop("XY and more", 10, stop=["XY"]) == (None, "XY and more")  # only the new text is looked at


def test_stop_tokens_eos_and_documents() -> None:
    # The ending token's text is not in the output (vLLM: it is left out of detokenization), be it
    # a stop token id or EOS shown because skip_special_tokens is off (vLLM #2538).
    assert stop("ab<x>", 2, token=9, stop_token_ids=[9]) == (FinishReason.STOP, "ab")
    assert check_stop("ab<x>", 2, 9, SamplingParams(stop_token_ids=[9]), EOS, 1, 5, 100).dropped
    assert stop("ab</s>", 2, token=2, skip_special_tokens=False) == (FinishReason.STOP, "ab")
    assert stop("a", 0, token=2, ignore_eos=True)[0] is None
    done = check_stop("{}", 1, 7, SamplingParams(), EOS, 1, 5, 100, document_complete=True)
    assert done[:3] == (FinishReason.STOP, "{}", None) and not done.dropped  # the document's last token is part of it


@pytest.mark.parametrize(
    ("output", "params", "ends"),
    [
        ([], {}, False),
        ([5, 9], {"stop_token_ids": [9]}, True),
        ([5, 9], {"stop_token_ids": [9], "include_stop_str_in_output": True, "stop": ["z"]}, True),
        ([5, 2], {}, True),
        ([5, 2], {"ignore_eos": True}, False),
        ([9], {"stop_token_ids": [9], "min_tokens": 2}, False),  # held back by min_tokens, as sampling masks it
        ([5, 9], {"stop_token_ids": [9], "min_tokens": 2}, True),
        ([5, 7], {"max_tokens": 2}, False),  # its length: a grammar's complete document would say "stop"
    ],
)
def test_a_resume_ends_by_its_last_token_as_check_stop_says(output: list[int], params: dict, ends: bool) -> None:
    """The rule the engine and the worker's arrival share for a resume ended before its grammar is
    compiled: its last token a stop token or EOS that ends it, nothing else."""
    assert ends_by_token(output, SamplingParams(**params), EOS) is ends


def test_stop_reason_names_the_stop_string_or_token_not_eos() -> None:
    def matched(text: str, old_len: int, token: int = 7, **params) -> str | int | None:
        return check_stop(text, old_len, token, SamplingParams(**params), EOS, 1, 10, 100).matched

    assert matched("hello wor", 8, stop=["wor", "xyz"]) == "wor"
    assert matched("ab<x>", 2, token=9, stop_token_ids=[9, 2]) == 9
    assert matched("ab", 2, token=2, stop_token_ids=[2]) is None  # a stop token that is also EOS: EOS (vLLM)
    assert matched("ab", 2, token=2) is None  # EOS (vLLM: stop_reason None)
    # the model's other end-of-sequence ids (generation_config.json's) are vLLM's stop_token_ids: named
    extra = check_stop("ab", 2, 74, SamplingParams(), {2, 74}, 1, 10, 100, primary_eos=2)
    assert (
        extra.matched == 74
        and check_stop("ab", 2, 2, SamplingParams(), {2, 74}, 1, 10, 100, primary_eos=2).matched is None
    )
    assert matched("ab", 2, max_tokens=1) is None  # length


def test_a_stop_token_whose_text_would_complete_a_stop_string_ends_by_itself() -> None:
    """vLLM v1: the engine core stops on a stop token or EOS, and the detokenizer leaves its text
    out before looking for stop strings, so the token is the stop_reason (the helpers' replay: a
    stop token spelling "si" beside stop=["si"] was reported as "si"). Kept in the output
    (include_stop_str_in_output), its text is looked in, and a stop string it completes wins."""

    def ended(text: str, token: int, **params) -> tuple:
        s = check_stop(text, 4, token, SamplingParams(**params), EOS, 2, 10, 100)
        return s.reason, s.text, s.matched

    assert ended("almisi", 9, stop_token_ids=[9], stop=["si"]) == (FinishReason.STOP, "almi", 9)
    assert ended("almi</s>", 2, stop=["</s>"], skip_special_tokens=False) == (FinishReason.STOP, "almi", None)
    kept = {"include_stop_str_in_output": True}
    assert ended("almisi", 9, stop_token_ids=[9], stop=["si"], **kept) == (FinishReason.STOP, "almisi", "si")
    assert ended("almisi", 9, stop_token_ids=[9], stop=["zz"], **kept) == (FinishReason.STOP, "almisi", 9)
    # an ordinary token completing a stop string: the string, as before
    assert ended("almisi", 7, stop_token_ids=[9], stop=["si"]) == (FinishReason.STOP, "almi", "si")


def test_min_tokens_defers_stop_strings_stop_tokens_and_eos() -> None:
    # vLLM: stop strings from the token after the min_tokens-th, stop tokens and EOS from it
    assert stop("ab", 1, token=2, n=2, min_tokens=3) == (None, "ab")
    assert stop("ab<x>", 2, token=9, n=2, stop_token_ids=[9], min_tokens=3) == (None, "ab<x>")
    assert stop("ab", 1, token=2, n=3, min_tokens=3) == (FinishReason.STOP, "a")
    assert stop("hello wor", 8, n=3, stop=["wor"], min_tokens=3) == (None, "hello wor")
    assert stop("hello wor", 8, n=4, stop=["wor"], min_tokens=3) == (FinishReason.STOP, "hello ")
    assert stop("a", 0, n=3, max_tokens=3, min_tokens=3)[0] is FinishReason.LENGTH


def test_a_stop_string_passed_under_min_tokens_is_not_found_later() -> None:
    """vLLM #21987's kind: "vo" ended in the text while min_tokens held the checks back; one
    window for all stop strings (the longest's) found it again a token later, and the verdict
    hung on an unrelated longer stop string."""
    for stops in (["vo"], ["vo", "zzzzzzzz"]):
        assert stop("suvo ri", 5, n=9, stop=stops, min_tokens=8) == (None, "suvo ri")
    assert find_stop("suvo ri", ["vo", "zzzzzzzz"], old_len=5) is None
    assert find_stop("suvo rizz", ["o rizz", "zz"], old_len=7) == (3, 9)  # each from where it could end new
    assert find_stop("suvo rizz", ["zz", "o rizz"], old_len=7) == (3, 9)  # the earliest, not the first listed


def test_include_stop_str_in_output_keeps_what_ended_the_request() -> None:
    keep = {"include_stop_str_in_output": True}
    assert stop("hello wor", 8, stop=["wor"], **keep) == (FinishReason.STOP, "hello wor")
    assert stop("abXYcd", 3, stop=["XY"], **keep) == (FinishReason.STOP, "abXY")
    assert stop("ab<x>", 2, token=9, stop_token_ids=[9], **keep) == (FinishReason.STOP, "ab<x>")
    assert stop("ab</s>", 2, token=2, **keep) == (FinishReason.STOP, "ab</s>")


def test_length_limits() -> None:
    assert stop("a", 0, n=16, max_tokens=16)[0] is FinishReason.LENGTH
    assert stop("a", 0, n=3, total=100, max_tokens=16)[0] is FinishReason.LENGTH  # the context is full
    assert stop("a", 0, n=3, max_tokens=16)[0] is None


def test_text_that_could_start_a_stop_string_is_held_back() -> None:
    p = SamplingParams(stop=["STOP"])
    assert visible_end("abcST", 0, p, finished=False) == 3  # "ST" might grow into STOP; "cST" cannot
    assert visible_end("abcSTO", 3, p, finished=False) == 3  # still held: "STO" may grow into STOP
    # only the text not shown is looked in: no stop string begins in what was (it would have been held)
    assert visible_end("abcST", 4, p, finished=False) == 5
    assert visible_end("abcST", 0, p, finished=True) == 5
    assert visible_end("abc", 0, SamplingParams(), finished=False) == 3
    assert visible_end("abcSTOx", 0, p, finished=False) == 7  # (a full stop string was looked for already)
    kept = SamplingParams(stop=["STOP"], include_stop_str_in_output=True)
    assert visible_end("abcST", 0, kept, finished=False) == 5  # nothing shown is ever cut
    assert find_stop("xxSTOP", ["STOP"], old_len=5) == (2, 6)


def _partial_stop_by_brute_force(text: str, stops: list[str]) -> int:
    return max((k for s in stops for k in range(1, len(s)) if text.endswith(s[:k])), default=0)


@settings(max_examples=300, deadline=None)
@given(st.text("ab ", max_size=12), st.lists(st.text("ab ", min_size=1, max_size=8), min_size=1, max_size=3))
def test_the_text_held_back_is_the_longest_end_that_begins_a_stop_string(text: str, stops: list[str]) -> None:
    """Exactly what a stop string could still grow from (``partial_stop``) while a stop string's
    first character has few places to begin at in its own length of the text."""
    assert partial_stop(text, stops) == _partial_stop_by_brute_force(text, stops)


def test_a_text_with_many_places_a_stop_string_could_begin_is_held_from_the_first_not_tried() -> None:
    """Past ``_TRIES`` places, what is left is held untried: more than need be, never less (a
    long stop string beginning with a space, over a text of short words)."""
    stop = " a" * 12 + " b"
    assert partial_stop("x" + " a" * 12, [stop]) == 24  # the first place tried is the answer
    # twelve spaces, none the answer: the eight first tried, from the ninth " a a a c" held untried
    assert partial_stop("x" + " a" * 11 + " c", [stop]) == len(" a a a c") > 0
    assert partial_stop("x a a", [" a a a b"]) == 4  # (few places: exact)


ALPHABET = "ab \n日"  # few characters: stop strings that begin alike, overlap, begin one another


@settings(max_examples=300, deadline=None)
@given(
    st.lists(st.text(ALPHABET, max_size=4), max_size=16),
    st.lists(st.text(ALPHABET, min_size=1, max_size=8), max_size=4),
)
def test_a_stream_holds_back_what_could_begin_a_stop_string_at_every_token(pieces: list[str], stops: list[str]) -> None:
    """``visible_end`` token by token (it looks only in the text not shown yet, and where that
    holds no stop string's first character, not further) shows what the whole text's brute force
    allows, at every token up to the one that completes a stop string: stop strings that begin
    alike, overlap themselves, or one a beginning of another, a character outside Latin-1."""
    p, text, emitted = SamplingParams(stop=stops), "", 0
    for piece in pieces:
        old, text = len(text), text + piece
        if find_stop(text, stops, old) is not None:
            break
        emitted = visible_end(text, emitted, p, finished=False)
        assert emitted == len(text) - _partial_stop_by_brute_force(text, stops)


def test_a_token_whose_text_cannot_begin_a_stop_string_is_looked_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """The worker asks ``visible_end`` per token of every request with stop strings. Looking for
    each stop string in each token (``partial_stop``) cost 5-40 % more per token through
    ``advance`` than vLLM's fixed window; a token whose text, and nothing held before it, holds
    no stop string's first character needs no more than that one look."""
    asked: list[str] = []
    monkeypatch.setattr(stopping, "partial_stop", lambda text, *a: asked.append(text) or partial_stop(text, *a))
    p, text, emitted, shown = SamplingParams(stop=["\n\n", "Observation:", "</s>", "User:"]), "", 0, []
    for token in ["Thought", ":", " I", " should", " look", "\n", "Obs", "erv", "ing", " it", "."]:
        text += token
        shown.append(text[emitted : (emitted := visible_end(text, emitted, p, finished=False))])
    assert shown == ["Thought", ":", " I", " should", " look", "", "\n", "", "Observing", " it", "."]
    assert [t[-3:] for t in asked] == ["ok\n", "Obs", "erv", "ing"]
