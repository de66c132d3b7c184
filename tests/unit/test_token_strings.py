"""A logprobs token's text where it holds part of a UTF-8 character: vLLM's (``LogprobsProcessor``,
vLLM #28874 and #34875), "" until a token completes the character, which reads it whole; it read
``\\xf0`` here before, a string neither vLLM nor OpenAI (``bytes:\\xf0``) writes. ``bytes`` stay
the token's own."""

from __future__ import annotations

import pytest

from dlora.common.messages import TokenLogprob
from dlora.model.token_bytes import TokenText, token_string
from dlora.services.gateway import logprobs
from tests.unit.test_token_bytes import byte_level

EMOJI = "😀".encode()  # F0 9F 98 80


@pytest.mark.parametrize(
    "data, before, text",
    [
        (b" hello", [], " hello"),
        (EMOJI[:1], [b"a"], ""),  # the character begun, not ended
        (EMOJI[1:2], [b"a", EMOJI[:1]], ""),
        (EMOJI[3:], [b"a", EMOJI[:1], EMOJI[1:2], EMOJI[2:3]], "😀"),  # all four bytes read back
        (EMOJI[3:], [EMOJI[:1], EMOJI[1:2], EMOJI[2:3]], "😀"),
        ("é".encode()[1:], [b"x", b"caf", "é".encode()[:1]], "é"),  # the text before stays its tokens'
        (" é".encode()[:2], [b"hello"], ""),  # a byte-level token holding a space and a lead byte
        # a token that does not end inside a character reads alone (vLLM's rule: only a U+FFFD at the end)
        (b"\xa9b", ["é".encode()[:1]], "\ufffdb"),
        (EMOJI[3:], [], ""),  # nothing before it: no character completed
        (b"", [b"a"], ""),
        # more than the four tokens a character can span are not read
        (EMOJI[3:], [b"x", EMOJI[:1], b"", b"", EMOJI[1:2], EMOJI[2:3]], ""),
    ],
)
def test_a_tokens_text_is_vllms(data: bytes, before: list[bytes], text: str) -> None:
    assert token_string(data, before) == text


class _Bytes:
    """Token ids as the bytes of a table, for the logprobs objects (``TokenText``'s role)."""

    special_ids: frozenset[int] = frozenset()

    def __init__(self, table: list[bytes]) -> None:
        self.table = table

    def bytes_of(self, t: int) -> bytes:
        return self.table[t]

    def text_of(self, t: int, before: list[int] | tuple[()] = ()) -> str:
        return token_string(self.table[t], [self.table[b] for b in before[-4:]])

    def shown(self, t: int, skip_special_tokens: bool) -> bytes:
        return self.table[t]

    def byte_piece(self, t: int) -> bool:
        return False

    def offsets_in(self, text: str, ids: list[int]) -> list[int] | None:
        return None


def test_a_character_split_over_chunks_reads_whole_where_it_ends() -> None:
    """A stream's chunks carry a character's bytes apart: the token that completes it reads it
    whole, its alternatives after the same sampled tokens; ``bytes`` rebuild the text."""
    table = [b"a", EMOJI[:2], EMOJI[2:], EMOJI[:1], EMOJI[3:]]
    tokens = _Bytes(table)
    entries = [TokenLogprob(0, -1.0, []), TokenLogprob(1, -1.0, [(3, -2.0)]), TokenLogprob(2, -1.0, [(4, -3.0)])]
    sampled: list[int] = []
    chat = [logprobs.chat_logprobs(entries[:2], tokens, sampled), logprobs.chat_logprobs(entries[2:], tokens, sampled)]  # type: ignore[arg-type]
    content = [c for part in chat for c in part["content"]]
    assert [c["token"] for c in content] == ["a", "", "😀"]
    assert b"".join(bytes(c["bytes"]) for c in content).decode() == "a😀"
    assert [t["token"] for t in content[2]["top_logprobs"]] == [""]  # F0 9F then 80: no character yet
    sampled = []
    offset = logprobs.TextOffset(0)
    first = logprobs.completion_logprobs(entries[:2], tokens, offset, True, sampled)  # type: ignore[arg-type]
    second = logprobs.completion_logprobs(entries[2:], tokens, offset, True, sampled)  # type: ignore[arg-type]
    assert first["tokens"] + second["tokens"] == ["a", "", "😀"]
    assert first["text_offset"] + second["text_offset"] == [0, 1, 1]
    # a prompt's tokens read after the prompt's own
    prompt = logprobs.prompt_logprobs([0, 1, 2], [TokenLogprob(1, -1.0, []), TokenLogprob(2, -1.0, [])], tokens, "a😀")  # type: ignore[arg-type]
    assert prompt["tokens"] == ["a", "", "😀"]
    named = logprobs.vllm_prompt_logprobs([0, 1, 2], [TokenLogprob(1, -1.0, []), TokenLogprob(2, -1.0, [])], 0, tokens)  # type: ignore[arg-type]
    assert [next(iter(p.values()))["decoded_token"] for p in named[1:] if p] == ["", "😀"]


def test_the_tokens_before_are_read_only_for_a_token_ending_inside_a_character() -> None:
    """Every logprobs entry, each top alternative too, read its four tokens before (a decode each)
    though almost no token ends inside a character (the first reread's finding)."""
    hf = byte_level()
    tokens = TokenText(hf, len(hf))
    read: list[int] = []
    bytes_of = tokens.bytes_of
    tokens.bytes_of = lambda t: read.append(t) or bytes_of(t)  # type: ignore[method-assign]
    a, lead = hf.convert_tokens_to_ids(["a", "ð"])  # "ð": byte-level BPE's piece for the byte F0
    assert tokens.text_of(a, [a] * 4) == "a" and read == [a]
    read.clear()
    assert tokens.text_of(lead, [a] * 4) == "" and len(read) == 5
