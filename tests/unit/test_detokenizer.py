"""Incremental text equals the whole decode, and partial UTF-8 is held back."""

from __future__ import annotations

from pathlib import Path

import pytest
from transformers import AutoTokenizer

from dlora.model.make_tiny import make_tokenizer
from dlora.services.worker.engine.detokenizer import IncrementalDetokenizer, decoder


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory):
    out: Path = tmp_path_factory.mktemp("tok")
    make_tokenizer(out, vocab_size=400, seed=0)
    return AutoTokenizer.from_pretrained(out)


@pytest.mark.parametrize("text", ["kalo remi suta, nevo!", "naïve café — 日本語 ok", "  two  spaces\nand lines"])
def test_streamed_text_equals_full_decode(tokenizer, text: str) -> None:
    prompt = tokenizer.encode("prompt words ")
    ids = tokenizer.encode(text)
    d = IncrementalDetokenizer(tokenizer, prompt)
    pieces = [d.push([t]) for t in ids]
    assert "".join(pieces) == tokenizer.decode(ids)
    assert not any("\ufffd" in p for p in pieces)


def test_multibyte_character_waits_for_its_last_byte(tokenizer) -> None:
    ids = tokenizer.encode("日")
    assert len(ids) > 1  # split over byte tokens by this small vocabulary
    d = IncrementalDetokenizer(tokenizer, [])
    assert [d.push([t]) for t in ids] == [""] * (len(ids) - 1) + ["日"]


@pytest.mark.parametrize("cut", range(1, 12))
def test_a_resumed_stream_loses_no_character_at_the_seam(tokenizer, cut: int) -> None:
    """A request resumed elsewhere after ``cut`` outputs (moved, or its worker died) starts a new
    detokenizer; where the seam splits a character, the text held back before comes out after."""
    prompt = tokenizer.encode("prompt ")
    ids = tokenizer.encode("naïve 日本語 café")
    before = IncrementalDetokenizer(tokenizer, prompt)
    sent = "".join(before.push([t]) for t in ids[:cut])
    after = IncrementalDetokenizer(tokenizer, prompt + ids[:cut], pending=before.pending)
    assert sent + "".join(after.push([t]) for t in ids[cut:]) == tokenizer.decode(ids)


def test_the_direct_decoder_equals_transformers_decode(tokenizer) -> None:
    """The Rust tokenizer's decode, taken where transformers adds nothing: same text, special
    tokens skipped or not."""
    assert tokenizer.clean_up_tokenization_spaces is False  # else decoder() keeps transformers'
    ids = tokenizer.encode("naïve café — 日本語 ok  two") + [tokenizer.eos_token_id or 0]
    fast = decoder(tokenizer)
    for skip in (True, False):
        for i in range(len(ids)):
            assert fast(ids[i:], skip) == tokenizer.decode(ids[i:], skip_special_tokens=skip)


def test_a_request_that_ends_inside_a_character_keeps_its_bytes_as_u_fffd(tokenizer) -> None:
    """Text held back for a character never finished (the request ended, or bytes that can never
    make one: a lead byte twice) comes out at the end as decode writes it; it was lost, so the text
    was shorter than its tokens' decode (SGLang #34740's kind). Ended by a stop token or EOS, that
    token stays out of the text, the bytes before it do not (a stop token that decodes whole
    released them with itself, and they were cut with it)."""
    from dlora.common.messages import FinishReason, SamplingParams
    from dlora.services.worker.engine.outputs import advance
    from dlora.services.worker.engine.sequence import Sequence

    ids = tokenizer.encode("ok 日")[:-1]  # the last character's last byte never comes
    lead = tokenizer.encode("é")[0]
    assert tokenizer.decode([lead]) == "\ufffd"  # a lead byte alone
    eos = tokenizer.eos_token_id
    for outputs, params, text, reason in (
        (ids, SamplingParams(max_tokens=len(ids)), tokenizer.decode(ids), FinishReason.LENGTH),
        ([lead] * 3, SamplingParams(max_tokens=3), "\ufffd" * 3, FinishReason.LENGTH),
        ([*ids, eos], SamplingParams(max_tokens=99), tokenizer.decode(ids), FinishReason.STOP),
        ([lead, lead, 5], SamplingParams(max_tokens=99, stop_token_ids=[5]), "\ufffd" * 2, FinishReason.STOP),
    ):
        s = Sequence("r", None, tokenizer.encode("p"), params, 0, IncrementalDetokenizer(tokenizer, []))
        got = [advance(s, t, {eos}, 1000) for t in outputs]
        assert "".join(o.new_text for o in got) == text and got[-1].finish_reason is reason, outputs
        assert s.text == text and got[-1].finished and not any(o.finished for o in got[:-1])
