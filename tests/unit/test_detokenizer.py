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
    """The Rust tokenizer's decode: transformers' text, special tokens skipped or not."""
    ids = tokenizer.encode("naïve café — 日本語 ok  two") + [tokenizer.eos_token_id or 0]
    fast = decoder(tokenizer)
    for skip in (True, False):
        for i in range(len(ids)):
            assert fast(ids[i:], skip) == tokenizer.decode(ids[i:], skip_special_tokens=skip)


def test_generated_text_keeps_its_spaces_where_a_tokenizer_asks_for_clean_up() -> None:
    """``clean_up_tokenization_spaces`` (Llama 3's tokenizer_config sets it; transformers 4.x applies
    it to BPE, 5.x to the others) took the space before punctuation out of generated text: "x != y"
    came out "x!= y". vLLM never cleans generated text; the tokens' own spelling goes out."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = Tokenizer(models.WordLevel({"[UNK]": 0, "x": 1, "!=": 2, "y": 3, ",": 4, "so": 5}, unk_token="[UNK]"))
    words.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=words, clean_up_tokenization_spaces=True)
    assert tokenizer.decode([1, 2, 3, 4]) == "x!= y,"  # (what transformers' clean-up makes of it)
    d = IncrementalDetokenizer(tokenizer, [5])
    assert "".join(d.push([t]) for t in [1, 2, 3, 4]) == " x != y ,"
    assert decoder(tokenizer)([1, 2, 3, 4], True) == "x != y ,"


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


def test_a_stop_string_the_unfinished_character_completes_is_cut() -> None:
    """``stop=["\\ufffd"]`` (a guard against broken characters), cut by max_tokens inside one: the
    text appended at the end completed the stop string after the stops were looked for, and it
    stayed in the text returned (OpenAI: the text holds no stop sequence)."""
    from dlora.common.messages import FinishReason, SamplingParams

    tokenizer = _byte_fallback_tokenizer()
    ids = [tokenizer.convert_tokens_to_ids(t) for t in ("▁kalo", "<0xE4>", "<0xB8>")]
    for keep, text in ((False, " kalo"), (True, " kalo\ufffd")):
        params = SamplingParams(max_tokens=3, stop=["\ufffd"], include_stop_str_in_output=keep)
        got, reason, matched = _generate(tokenizer, ids, params)
        assert (got, reason, matched) == (text, FinishReason.STOP, "\ufffd")
    got, reason, _ = _generate(tokenizer, ids, SamplingParams(max_tokens=3, stop=["\ufffd"], min_tokens=3))
    assert (got, reason) == (" kalo\ufffd\ufffd", FinishReason.LENGTH)  # stop strings held back by min_tokens


def test_byte_fallback_bytes_that_make_no_character_come_out_one_u_fffd_each() -> None:
    """A Llama-2-style tokenizer's decoder writes every byte of an invalid run of <0xNN> tokens
    as U+FFFD, a character already sent with them too: 中中 then 2 bytes of 中 came out as
    '中中' + 4 U+FFFD, and a prompt's 中 before a lone continuation byte as 3 more in the output."""
    tokenizer = _byte_fallback_tokenizer()
    e4, b8, ad = (tokenizer.convert_tokens_to_ids(f"<0x{b:02X}>") for b in "中".encode())
    kalo = tokenizer.convert_tokens_to_ids("▁kalo")

    def text(prompt: list[int], outputs: list[int]) -> str:
        d = IncrementalDetokenizer(tokenizer, prompt)
        return "".join(d.push([t]) for t in outputs) + d.flush()

    assert text([kalo], [e4, b8, ad, e4, b8, ad, e4, b8]) == "中中\ufffd\ufffd"
    assert text([kalo, e4, b8, ad], [b8, kalo]) == "\ufffd kalo"
    assert text([kalo], [e4, b8, ad, kalo, e4, b8, ad]) == "中 kalo中"  # valid runs as before


@pytest.mark.parametrize("pending", [0, 1, 2])
def test_a_prompt_ending_in_byte_pieces_leaves_the_outputs_characters_whole(pending: int) -> None:
    """A Llama-2-style tokenizer spells the CJK characters it lacks in <0xNN> pieces: a prompt
    ending in two of them (six pieces) and an output beginning with a third came out as three
    U+FFFD (a replay of ai-dynamo/dynamo#12688: the left context was the prompt's last five
    pieces, which begin inside a character, and the decoder writes the whole run as U+FFFD).
    Likewise after a resume whose seam split the character (``pending``), and in the text a
    resumed request was sent, where a stop string is looked for."""
    from dlora.common.messages import SamplingParams
    from dlora.services.worker.engine.detokenizer import sent_tail

    tokenizer = _byte_fallback_tokenizer()
    zh = [tokenizer.convert_tokens_to_ids(f"<0x{b:02X}>") for b in "中".encode()]
    kalo = tokenizer.convert_tokens_to_ids("▁kalo")
    prompt = [1, kalo, *zh, *zh]
    d = IncrementalDetokenizer(tokenizer, prompt + zh[:pending], pending=pending)
    assert "".join(d.push([t]) for t in zh[pending:]) + d.flush() == "中"
    outputs = [kalo, *zh * 10]
    assert sent_tail(tokenizer, [1], outputs, SamplingParams(max_tokens=99, stop=["中!"]), 0, "") == "中"


def _byte_fallback_tokenizer():
    """A SentencePiece-style tokenizer (Llama 2's decoder: ▁ as space, <0xNN> byte pieces) with a
    handful of pieces: only decoding is asked of it."""
    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2} | {f"<0x{i:02X}>": 3 + i for i in range(256)}
    vocab |= {piece: 259 + i for i, piece in enumerate(("▁kalo", "▁", "k", "a", "l", "o"))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>", byte_fallback=True))
    steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    tok.decoder = decoders.Sequence(steps)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>", clean_up_tokenization_spaces=False)


def _generate(tokenizer, outputs: list[int], params) -> tuple[str, object, object]:
    """The text, finish reason and stop reason of a request whose outputs are ``outputs``."""
    from dlora.services.worker.engine.outputs import advance
    from dlora.services.worker.engine.sequence import Sequence

    s = Sequence("r", None, [1], params, 0, IncrementalDetokenizer(tokenizer, [1]))
    got = [advance(s, t, {2}, 1000) for t in outputs]
    assert "".join(o.new_text for o in got) == s.text
    return s.text, got[-1].finish_reason, got[-1].stop_reason


@pytest.mark.parametrize("cut", range(1, 14))
def test_the_text_a_resumed_request_was_sent_is_found_in_byte_pieces(cut: int) -> None:
    """``sent_tail`` (where a stop string begun before a move or a preemption is looked for) took a
    window of two tokens a character and sliced by the context's length: over a Llama-2-style
    tokenizer's byte pieces (😀 is four) it found '' or U+FFFD, and the stop string was missed."""
    from dlora.common.messages import SamplingParams
    from dlora.services.worker.engine.detokenizer import sent_tail
    from dlora.services.worker.engine.outputs import advance
    from dlora.services.worker.engine.sequence import Sequence

    tokenizer = _byte_fallback_tokenizer()
    emoji = [tokenizer.convert_tokens_to_ids(f"<0x{b:02X}>") for b in "😀".encode()]
    outputs = [tokenizer.convert_tokens_to_ids("▁kalo"), *emoji * 3]
    params = SamplingParams(max_tokens=99, stop=["😀😀!"])
    s = Sequence("r", None, [1], params, 0, IncrementalDetokenizer(tokenizer, [1]))
    sent = "".join(advance(s, t, {2}, 1000).new_text for t in outputs[:cut])
    tail = sent_tail(tokenizer, [1], outputs[:cut], params, s.detok.pending, s.text[s.emitted :])
    assert tail == sent[-2:]


class _Counting:
    """A tokenizer whose decodes are counted by the ids each was given (the work one push does)."""

    def __init__(self, tokenizer) -> None:  # type: ignore[no-untyped-def]
        self.tokenizer, self.widest = tokenizer, 0

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        self.widest = max(self.widest, len(ids))
        return str(self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens))


@pytest.mark.parametrize("kind", ["continuation bytes", "eos skipped", "byte-fallback bytes", "byte-fallback eos"])
def test_a_long_run_of_tokens_that_spell_nothing_whole_is_let_out_and_decoded_in_a_bounded_window(
    tokenizer, kind: str
) -> None:
    """Tokens whose text ends in U+FFFD (a lone continuation byte: never a character) or is
    empty (EOS under ignore_eos, skipped) were held back for ever: the window decoded every push
    grew with the output, O(n^2) (4,000 such tokens took 0.7 s of the step's thread, 32,000
    ~45 s), and a stream got none of its text until the end (SGLang #34740's kind). What is
    settled goes out after a bounded number of tokens; the text is decode's, and a word after a
    run of skipped EOS keeps its leading space (SentencePiece: the run is no context to it)."""
    if kind.startswith("byte-fallback"):
        tok = _byte_fallback_tokenizer()
        run = tok.convert_tokens_to_ids("<0xA9>") if kind.endswith("bytes") else 2
        word, prompt = tok.convert_tokens_to_ids("▁kalo"), [1, tok.convert_tokens_to_ids("▁kalo")]
    else:
        tok = tokenizer
        run = tok.encode("é")[1] if kind.endswith("bytes") else tok.eos_token_id
        word, prompt = tok.encode(" remi")[0], tok.encode("prompt")
    outputs = [word] + [run] * 300 + [word]
    counting = _Counting(tok)
    d = IncrementalDetokenizer(counting, prompt)
    pieces = [d.push([t]) for t in outputs]
    whole = tok.decode(prompt + outputs, skip_special_tokens=True)[len(tok.decode(prompt, skip_special_tokens=True)) :]
    assert "".join(pieces) + d.flush() == whole
    assert counting.widest <= 40  # the window, not the output
    if kind.endswith("bytes"):  # each U+FFFD out a few tokens after its byte, not at the end
        assert sum(len(p) for p in pieces[:200]) >= 150


@pytest.mark.parametrize("cut", [2, 10, 20, 30, 40, 41])
def test_a_resumed_stream_joins_a_character_split_by_a_run_of_skipped_eos(tokenizer, cut: int) -> None:
    """The tokens a detokenizer dropped from its window (``_settle``: EOS skipped, between a
    character's bytes) still count among those held back (``pending``): a request moved or
    recovered mid-run resumes with the character's first bytes unspelt, not taken as sent."""
    eos, (e6, b8, ad) = tokenizer.eos_token_id, tokenizer.encode("中")
    prompt, outputs = tokenizer.encode("prompt"), [*tokenizer.encode(" kalo"), e6, *[eos] * 36, b8, ad]
    outputs += tokenizer.encode(" remi")
    before = IncrementalDetokenizer(tokenizer, prompt)
    sent = "".join(before.push([t]) for t in outputs[:cut])
    after = IncrementalDetokenizer(tokenizer, prompt + outputs[:cut], pending=before.pending)
    rest = "".join(after.push([t]) for t in outputs[cut:]) + after.flush()
    assert sent + rest == tokenizer.decode(outputs, skip_special_tokens=True) == " kalo中 remi"


@pytest.mark.parametrize("cut", [3, 10, 17, 20, 30, 31])
@pytest.mark.parametrize("held", [0, 1])
def test_a_word_after_a_run_of_skipped_eos_keeps_its_space_across_a_resume(cut: int, held: int) -> None:
    """A run of skipped EOS (ignore_eos) that ``_settle`` dropped from its window counted as no
    token held back (``pending`` 0, or only from a held byte after it): a request moved or
    recovered mid-run resumed with the run's last five EOS as its left context, which spell
    nothing, and a SentencePiece decoder (Llama 2's) strips the space of the word after them:
    " kalo" came out "kalo" on the destination, though it keeps it where it stays."""
    tokenizer = _byte_fallback_tokenizer()
    kalo, e4 = tokenizer.convert_tokens_to_ids("▁kalo"), tokenizer.convert_tokens_to_ids("<0xE4>")
    prompt, outputs = [1, kalo], [kalo, *[e4] * held, *[2] * 30, kalo]
    before = IncrementalDetokenizer(tokenizer, prompt)
    sent = "".join(before.push([t]) for t in outputs[:cut])
    after = IncrementalDetokenizer(tokenizer, prompt + outputs[:cut], pending=before.pending)
    rest = "".join(after.push([t]) for t in outputs[cut:]) + after.flush()
    whole = IncrementalDetokenizer(tokenizer, prompt)
    assert sent + rest == "".join(whole.push([t]) for t in outputs) + whole.flush()
    assert sent + rest == " kalo" + "\ufffd" * held + " kalo"
