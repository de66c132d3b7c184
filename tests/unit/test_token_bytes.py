"""A token's bytes and text in logprobs, read from the tokenizer's definition: characters split
over byte-level BPE or byte-fallback tokens rebuilt from ``bytes``, SentencePiece's leading space
kept, no two tokens alike, and completions' ``text_offset`` counting characters of the text."""

from __future__ import annotations

import random
from typing import Any

import pytest
from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from dlora.common.messages import SamplingParams, TokenLogprob
from dlora.model.token_bytes import TokenText
from dlora.services.gateway import logprobs


def _fast(tok: Tokenizer) -> Any:
    tok.add_special_tokens([AddedToken("</s>", special=True)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>")  # type: ignore[no-untyped-call]


def byte_level() -> Any:
    """GPT-2 / Llama 3 style: every byte a token of its own (no merges)."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tok = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return _fast(tok)


def sentencepiece() -> Any:
    """Llama 2 / Mistral style: pieces with ``▁`` for a space, bytes as ``<0xNN>`` pieces."""
    vocab = {"<unk>": 0} | {f"<0x{i:02X}>": 1 + i for i in range(256)}
    for piece in ["▁", "h", "e", "l", "o", "▁h", "▁he", "▁hel", "▁hell", "▁hello"]:
        vocab[piece] = len(vocab)
    merges = [("▁", "h"), ("▁h", "e"), ("▁he", "l"), ("▁hel", "l"), ("▁hell", "o")]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    return _fast(tok)


@pytest.mark.parametrize("make", [byte_level, sentencepiece])
def test_bytes_rebuild_characters_split_over_tokens(make) -> None:  # type: ignore[no-untyped-def]
    hf = make()
    tokens = TokenText(hf, len(hf))
    text = "hello Ñé 😀"
    ids = hf.encode(text, add_special_tokens=False)
    whole = b"".join(tokens.bytes_of(i) for i in ids)
    assert whole.decode().strip() == text  # SentencePiece adds a space in front of the text
    assert any(hf.decode([i]) == "\ufffd" for i in ids)  # what one token decoded alone gave
    # each token's text after those before it (vLLM's): "" inside a character, which its last byte reads whole
    texts = [tokens.text_of(i, ids[:k]) for k, i in enumerate(ids)]
    assert "".join(texts).strip() == text and texts.count("") == 1 + 1 + 3  # Ñ, é, 😀 byte by byte
    assert tokens.bytes_of(hf.eos_token_id) == b"</s>"


def test_sentencepiece_pieces_keep_their_leading_space() -> None:
    hf = sentencepiece()
    tokens = TokenText(hf, len(hf))
    (hello,) = hf.encode("hello", add_special_tokens=False)
    assert hf.decode([hello]) == "hello" and tokens.text_of(hello) == " hello"


def test_text_offsets_count_a_split_character_once_where_it_begins() -> None:
    hf = byte_level()
    tokens = TokenText(hf, len(hf))
    ids = hf.encode("aÑb", add_special_tokens=False)  # a, 0xC3, 0x91, b
    entries = [TokenLogprob(i, -1.0, []) for i in ids]
    offset = logprobs.TextOffset(3)  # after an echoed prompt of three characters
    sampled: list[int] = []  # the choice's tokens so far, across its chunks
    first = logprobs.completion_logprobs(entries[:2], tokens, offset, True, sampled)  # the character ends in the next
    second = logprobs.completion_logprobs(entries[2:], tokens, offset, True, sampled)
    assert first["text_offset"] + second["text_offset"] == [3, 4, 4, 5]
    # A character left unfinished by the next token: its U+FFFD comes before that token.
    cut = [hf.encode("Ñ", add_special_tokens=False)[0], *hf.encode("zy", add_special_tokens=False)]
    offsets = logprobs.completion_logprobs(
        [TokenLogprob(i, -1.0, []) for i in cut], tokens, logprobs.TextOffset(0), True
    )
    assert offsets["text_offset"] == [0, 1, 2] and hf.decode(cut) == "\ufffdzy"
    assert first["tokens"] + second["tokens"] == ["a", "", "Ñ", "b"]  # vLLM's: Ñ where it ends
    chat = logprobs.chat_logprobs(entries, tokens)
    assert bytes(b for c in chat["content"] for b in c["bytes"]).decode() == "aÑb"


def test_text_offsets_follow_a_byte_fallback_decoders_u_fffd_for_each_byte() -> None:
    """A byte-fallback decoder (Llama 2's, Mistral's) writes a run of <0xNN> pieces that makes no
    character one U+FFFD a byte, where the offsets counted one a maximal run (as Python and a
    byte-level decoder do): every offset after such bytes fell short of the text. Offsets are
    checked against the text the worker's detokenizer makes of the same tokens."""
    from dlora.services.worker.engine.detokenizer import IncrementalDetokenizer

    hf = sentencepiece()
    tokens = TokenText(hf, len(hf))
    hello, h, eos = (hf.convert_tokens_to_ids(p) for p in ("▁hello", "h", "</s>"))
    pieces = [hf.convert_tokens_to_ids(f"<0x{b:02X}>") for b in sorted({*"中Ñ😀\n".encode()})]
    (e4,) = (t for t in pieces if tokens.bytes_of(t) == b"\xe4")
    rng = random.Random(3)
    cases = [[hello, e4, hello]] + [
        [rng.choice([hello, h, eos, *pieces]) for _ in range(rng.randint(1, 24))] for _ in range(300)
    ]
    for ids in cases:
        detokenizer = IncrementalDetokenizer(hf, hf.encode("hello", add_special_tokens=False))
        text = "".join(detokenizer.push([t]) for t in ids) + detokenizer.flush()
        offset = logprobs.TextOffset(0)
        entries = [TokenLogprob(i, -1.0, []) for i in ids]
        cut = len(ids) // 2  # over two chunks, as a stream sends them
        parts = [logprobs.completion_logprobs(p, tokens, offset, True) for p in (entries[:cut], entries[cut:])]
        offsets = [at for part in parts for at in part["text_offset"]]
        assert offsets == sorted(offsets) and offsets[-1] <= len(text), (text, ids)
        for t, at in zip(ids, offsets):
            if t in (hello, h):
                shown = tokens.text_of(t)
                assert text[at : at + len(shown)] == shown, (text, [tokens.text_of(i) for i in ids], offsets)
    assert not tokens.byte_piece(hello) and tokens.byte_piece(e4)
    assert not TokenText(byte_level(), 256).byte_piece(0xE4)  # a byte-level token is no piece apart


def test_an_echoed_prompts_offsets_count_a_byte_fallback_run_one_u_fffd_a_byte() -> None:
    """The echo of a token-id prompt is its decode, where a byte-fallback decoder writes a run of
    <0xNN> pieces that is not UTF-8 one U+FFFD a byte: the offsets took a continuation piece as
    more of the U+FFFD before it, and the word after ("kalo" + <0xE4><0xB8> + "kalo") found the
    second U+FFFD in its place, one character short."""
    hf = sentencepiece()
    tokens = TokenText(hf, len(hf))
    hello, h, eos = (hf.convert_tokens_to_ids(p) for p in ("▁hello", "h", "</s>"))
    pieces = [hf.convert_tokens_to_ids(f"<0x{b:02X}>") for b in sorted({*"中Ñ😀\n".encode()})]
    e4, b8 = (hf.convert_tokens_to_ids(p) for p in ("<0xE4>", "<0xB8>"))
    rng = random.Random(4)
    cases = [[hello, e4, b8, hello]] + [
        [rng.choice([hello, h, eos, *pieces]) for _ in range(rng.randint(1, 24))] for _ in range(300)
    ]
    for ids in cases:
        for skip in (True, False):
            echo = hf.decode(ids, skip_special_tokens=skip)
            offsets = logprobs.echo_offsets(ids, tokens, echo)
            assert offsets == sorted(offsets) and offsets[-1] <= len(echo), (echo, ids)
            for t, at in zip(ids, offsets):
                if t in (hello, h):
                    shown = tokens.text_of(t)
                    assert echo.startswith(shown, at) or echo.startswith(shown.lstrip(), at), (echo, ids, offsets)


def test_every_byte_is_its_own_token_and_sequences_decode_as_the_tokenizer_decodes() -> None:
    hf = byte_level()
    tokens = TokenText(hf, len(hf))
    assert sorted(tokens.bytes_of(i) for i in range(256)) == [bytes([b]) for b in range(256)]  # 0xFF too
    rng = random.Random(0)
    for _ in range(200):  # invalid sequences are replaced as the tokenizer's own decode replaces them
        ids = [rng.randrange(256) for _ in range(rng.randint(1, 12))]
        assert b"".join(map(tokens.bytes_of, ids)).decode("utf-8", "replace") == hf.decode(ids)


def test_added_padding_and_special_tokens() -> None:
    """Qwen2.5's <tool_call> is an added token that is not special; ids past the tokenizer's are
    the model's padding; a special token the text skips adds nothing to text_offset."""
    hf = byte_level()
    hf.add_tokens(["<tool_call>"])
    tokens = TokenText(hf, len(hf) + 10)
    call = hf.convert_tokens_to_ids("<tool_call>")
    assert tokens.bytes_of(call) == b"<tool_call>" and tokens.bytes_of(len(hf) + 3) == b""
    eos, a = hf.eos_token_id, hf.convert_tokens_to_ids("a")
    entries = [TokenLogprob(i, -1.0, []) for i in (a, eos, a)]
    skipped = logprobs.completion_logprobs(entries, tokens, logprobs.TextOffset(0), True)
    shown = logprobs.completion_logprobs(entries, tokens, logprobs.TextOffset(0), False)
    assert (skipped["text_offset"], shown["text_offset"]) == ([0, 1, 1], [0, 1, 5])
    assert hf.decode([a, eos, a], skip_special_tokens=True) == "aa"


@pytest.mark.parametrize("make", [byte_level, sentencepiece])
def test_an_echoed_prompts_offsets_index_the_echo_however_it_was_written(make) -> None:  # type: ignore[no-untyped-def]
    """vLLM #5334's kind: the offsets were counted from the tokens' shown bytes and moved to end
    where the echo does, so a special token written out in a client's text ("kalo</s> remi",
    skipped in the count) moved every offset before it by its length. Each token is now found in
    the echo, text prompts and token-id prompts (decoded skipping special tokens or not) alike."""
    hf = make()
    tokens = TokenText(hf, len(hf))
    eos = hf.eos_token_id
    rng = random.Random(5)
    words = ["hello", "he", "lo", " ", "  ", "</s>", "Ñé", "😀", "o h"]
    for _ in range(60):
        text = "".join(rng.choice(words) for _ in range(rng.randint(1, 9)))
        ids = hf.encode(text, add_special_tokens=False)
        echoes = [text, hf.decode(ids, skip_special_tokens=True), hf.decode(ids, skip_special_tokens=False)]
        mapped = tokens.offsets_in(text, ids)  # the tokenizer's own offsets, for the client's text
        assert mapped is not None
        for echo, offsets in [(e, logprobs.echo_offsets(ids, tokens, e)) for e in echoes] + [(text, mapped)]:
            assert offsets == sorted(offsets) and offsets[-1] <= len(echo), (text, echo)
            for i, (t, at) in enumerate(zip(ids, offsets)):
                piece = tokens.bytes_of(t)
                if t == eos and "</s>" not in echo[at : at + 4]:  # skipped: no width
                    assert offsets[i + 1 :][:1] in ([at], []), (text, echo, offsets)
                elif len(piece) > 1 or piece < b"\x80":  # a whole character or more: it is there
                    shown = piece.decode()
                    assert echo.startswith(shown, at) or echo.startswith(shown[1:], at), (text, echo, i, offsets)
                else:  # a byte of a character: where the character begins
                    assert echo[at].encode()[0] & 0xC0 == 0xC0, (text, echo, i, offsets)
    # the helper's reproduction, and BOS added before a text that begins with it written out
    ids = hf.encode("he</s> lo", add_special_tokens=False)  # SentencePiece: "▁he", "</s>", "▁", "▁", "l", "o"
    expected = [0, 1, 2, 6, 7, 8] if make is byte_level else [0, 2, 6, 7, 7, 8]
    assert logprobs.echo_offsets(ids, tokens, "he</s> lo") == expected
    assert logprobs.echo_offsets([eos, *hf.encode("</s>a", add_special_tokens=False)], tokens, "</s>a")[:3] == [0, 0, 4]
    # a review's: a long run of one special token (each looked ahead along the run: 15 s at 30k)
    assert logprobs.echo_offsets([eos] * 20_000, tokens, "</s>" * 5) == [0] * 19_995 + [0, 4, 8, 12, 16]


def test_echo_offsets_find_their_place_again_after_a_token_the_echo_spells_otherwise() -> None:
    """A review's cases: bytes that make no character are one U+FFFD for the run (not one per
    token); an added token that strips the space after it (Phi-3's chat tokens) left every later
    offset one off; the tokenizer's own offsets read a client's text exactly, through a
    normaliser (NFC) the text was not written in."""
    hf = byte_level()
    hf.add_special_tokens({"additional_special_tokens": [AddedToken("<|user|>", rstrip=True, special=True)]})
    tokens = TokenText(hf, len(hf))
    cut = [*hf.encode("\u20ac", add_special_tokens=False)[:2], *hf.encode("ab", add_special_tokens=False)]
    assert hf.decode(cut) == "\ufffdab" and logprobs.echo_offsets(cut, tokens, "\ufffdab") == [0, 0, 1, 2]
    text = "<|user|> hello there"
    ids = hf.encode(text, add_special_tokens=False)
    expected = [0, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19]  # "<|user|>" then " " swallowed
    assert len(ids) == len(expected) and tokens.offsets_in(text, ids) == expected
    assert logprobs.echo_offsets(ids, tokens, text) == expected
    hf.backend_tokenizer.normalizer = normalizers.NFC()
    nfd = "cafe\u0301 au"
    ids = hf.encode(nfd, add_special_tokens=False)  # c a f é(2 bytes) space a u
    assert tokens.offsets_in(nfd, ids) == [0, 1, 2, 3, 3, 5, 6, 7]
    aligned = logprobs.echo_offsets(ids, tokens, nfd)  # without the mapping: found again after the é
    assert aligned[:3] == [0, 1, 2] and aligned[6:] == [6, 7]


def test_a_tokenizer_llguidance_cannot_read_falls_back_to_decoding_each_token() -> None:
    hf = byte_level()
    hf.backend_tokenizer.decoder = decoders.WordPiece()  # a decoder llguidance does not know
    tokens = TokenText(hf, len(hf))
    a = hf.convert_tokens_to_ids("a")
    assert tokens.bytes_of(a) == hf.decode([a]).encode()


def test_structured_output_with_a_tokenizer_llguidance_cannot_read_is_a_refusal() -> None:
    from dlora.services.worker.engine.structured import JSON_OBJECT_SCHEMA, GrammarError, Grammars

    hf = byte_level()
    hf.backend_tokenizer.decoder = decoders.WordPiece()
    with pytest.raises(GrammarError, match="not available with this model's tokenizer"):
        Grammars(hf, len(hf), {hf.eos_token_id}).matcher(SamplingParams(json_schema=JSON_OBJECT_SCHEMA), [])
    fewer = byte_level()  # a model with fewer ids than its tokenizer has tokens still gets a matcher
    assert (
        Grammars(fewer, len(fewer) - 5, {fewer.eos_token_id}).matcher(
            SamplingParams(json_schema=JSON_OBJECT_SCHEMA), []
        )
        is not None
    )


def test_tokens_that_spell_alike_keep_the_likelier_logprob_under_their_key() -> None:
    """vLLM #44319's and SGLang #32290's kind: ``top_logprobs`` is keyed by text, and a dict built
    in order kept the last of tokens that spell alike (a byte-fallback ``<0x68>`` and ``h``, the
    model's padding ids past the tokenizer's), so a less likely alternative, or the chosen token
    itself, overwrote a likelier one. The key now holds the likelier, in completions and echoes."""
    hf = sentencepiece()
    tokens = TokenText(hf, len(hf) + 4)
    h, byte_h, hello = (hf.convert_tokens_to_ids(p) for p in ("h", "<0x68>", "▁hello"))
    assert tokens.text_of(h) == tokens.text_of(byte_h) == "h"
    pad, pad2 = len(hf) + 1, len(hf) + 2
    entries = [
        TokenLogprob(hello, -0.1, [(hello, -0.1), (byte_h, -1.0), (h, -2.0), (pad, -3.0), (pad2, -4.0)]),
        TokenLogprob(h, -2.5, [(byte_h, -0.2), (hello, -1.5), (h, -2.5)]),  # the chosen one spells as the first
    ]
    comp = logprobs.completion_logprobs(entries, tokens, logprobs.TextOffset(0), True)
    assert comp["top_logprobs"] == [{" hello": -0.1, "h": -1.0, "": -3.0}, {"h": -0.2, " hello": -1.5}]
    assert comp["token_logprobs"] == [-0.1, -2.5]  # the chosen token's own, whatever its key holds
    echoed = logprobs.prompt_logprobs([hello, hello, h], entries, tokens, " hello hello h")
    assert echoed["top_logprobs"] == [None, *comp["top_logprobs"]]
