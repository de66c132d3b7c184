"""Public reports on what a streamed answer's text is, replayed through the engine's output path
(``advance``: the detokenizer, the stop checks and the text each step may show) over a
Llama-2-style tokenizer: each event is one step's text, and the events joined are the whole
answer's text (the gateway's non-streamed body is that join). Each test names its reports."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dlora.common.messages import SamplingParams
from dlora.services.worker.engine.detokenizer import IncrementalDetokenizer
from dlora.services.worker.engine.outputs import advance
from dlora.services.worker.engine.sequence import Sequence

# The pieces the replays spell their outputs with; anything else is spelt in <0xNN> byte pieces.
PIECES = (
    "▁ABC DEF G HI J ▁Thought : ▁yes \n Ob serv ation ▁Obs cure ▁UNO ▁DUE ▁TRE 1 2 3 <| im _end |> "
    "▁alpha ▁beta ▁gam ma! ma ▁delta ▁Da ener ys ▁is ▁the ▁Kh ale esi"
).split(" ") + [" "]
EOS = 2
IM_END = "<|im_end|>"  # an added special token, as ChatML's


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    """A SentencePiece-style tokenizer (Llama 2's decoder: ▁ as space, <0xNN> byte pieces, the
    leading space of a text stripped) with the pieces above; only decoding is asked of it."""
    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": EOS} | {f"<0x{i:02X}>": 3 + i for i in range(256)}
    for piece in PIECES:
        vocab.setdefault(piece, len(vocab))
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>", byte_fallback=True))
    steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    tok.decoder = decoders.Sequence(steps)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")
    fast.add_special_tokens({"additional_special_tokens": [IM_END]})
    return fast


def ids(tokenizer: Any, *pieces: str) -> list[int]:
    """Each piece's id, or its UTF-8 bytes' pieces where it is none (a character the vocabulary lacks)."""
    vocab = tokenizer.get_vocab()
    out: list[int] = []
    for p in pieces:
        out += [vocab[p]] if p in vocab else [vocab[f"<0x{b:02X}>"] for b in p.encode()]
    return out


def stream(tokenizer: Any, outputs: list[int], **params: Any) -> list[tuple[str, str | None, str | int | None]]:
    """(text, finish_reason, stop_reason) of each step's event of a request after the prompt
    " ABC" that samples ``outputs``, to its last (the one that finishes it)."""
    params.setdefault("max_tokens", 99)
    prompt = [1, *ids(tokenizer, "▁ABC")]
    p = SamplingParams(**params)
    seq = Sequence("r", None, prompt, p, 0, IncrementalDetokenizer(tokenizer, prompt, p.skip_special_tokens))
    events = []
    for token in outputs:
        out = advance(seq, token, {EOS}, 1000, primary_eos=EOS)
        events.append((out.new_text, out.finish_reason and out.finish_reason.value, out.stop_reason))
        if out.finished:
            break
    assert "".join(text for text, _, _ in events) == seq.text  # the stream is the whole answer
    return events


def texts(events: list[tuple[str, str | None, str | int | None]]) -> list[str]:
    return [text for text, _, _ in events]


def test_no_part_of_a_stop_string_over_several_tokens_is_streamed(tokenizer: Any) -> None:
    """vLLM #3574 (stop "DEFGHIJ" after "ABC": the events " DEF", "G", "HI" went out before "J"
    stopped it), vLLM #2577 and SGLang #6997 (ReAct's "Observation" streamed in part), TGI #1254
    (ChatML's "<|im_end|>" written as text, split over two events, shown): nothing of the stop
    string reaches an event, the text before it does, and the last event names it."""
    events = stream(tokenizer, ids(tokenizer, "DEF", "G", "HI", "J", "K"), stop=["DEFGHIJ"])
    assert events == [("", None, None)] * 3 + [("", "stop", "DEFGHIJ")]
    events = stream(tokenizer, ids(tokenizer, "▁Thought", ":", "\n", "Ob", "serv", "ation", ":"), stop=["Observation"])
    assert "".join(texts(events)) == " Thought:\n" and events[-1][1:] == ("stop", "Observation")
    assert not any("Ob" in t for t in texts(events))
    events = stream(tokenizer, ids(tokenizer, "▁yes", "<|", "im", "_end", "|>", "▁yes"), stop=[IM_END])
    assert "".join(texts(events)) == " yes" and events[-1][1:] == ("stop", IM_END)
    assert not any("<" in t or "|" in t for t in texts(events))


def test_text_that_cannot_begin_a_stop_string_goes_out_with_its_token(tokenizer: Any) -> None:
    """vLLM #13087 (with ``stop`` set, the first events came empty): the longest stop string's
    length less one was held back whatever the text, so " Thought" went out as " Th", "o", "ug"
    over the next tokens. Only an end that can still grow into a stop string waits (llama.cpp's
    server and SGLang #11462 hold only that), and goes out once it cannot: SGLang #11446 (a
    partial stop string left in the stream) and FastChat #3467 (stop strings beginning with "\\n"
    ate every newline: the held "\\n" was dropped, not let out)."""
    react = ids(tokenizer, "▁Thought", ":", "▁yes", "\n", "Ob", "serv", "ation", ":")
    events = stream(tokenizer, react, stop=["\nObservation:"])
    assert texts(events) == [" Thought", ":", " yes", "", "", "", "", ""]
    assert events[-1][1:] == ("stop", "\nObservation:")
    events = stream(tokenizer, ids(tokenizer, "▁Obs", "cure", "▁yes"), stop=["Observation"], max_tokens=3)
    assert texts(events) == [" ", "Obscure", " yes"]
    outputs = ids(tokenizer, "1", "\n", "2", "\n", "3") + [EOS]
    events = stream(tokenizer, outputs, stop=["\n<|endoftext|>"])
    assert texts(events) == ["1", "", "\n2", "", "\n3", ""] and events[-1][1:] == ("stop", None)


def test_the_text_held_back_comes_out_with_the_last_event(tokenizer: Any) -> None:
    """llama.cpp #9867 (streamed with a stop string, the end of the text never reached the client
    when the length limit ended it), llama.cpp #15007 (the same at EOS: "UNO DUE" for "UNO DUE
    TRE") and vLLM #8468 (the final output cut with stop strings and streaming): the end held back
    for a stop string that never came is the last event's, with its finish reason."""
    outputs = ids(tokenizer, "▁UNO", "▁DUE", "▁TRE")
    for tail, held, reason in (([EOS], "TRE", "stop"), (ids(tokenizer, "\n"), "TRE\n", "length")):
        events = stream(tokenizer, outputs + tail, stop=["TRE\nAAAAAAAA"], max_tokens=4)
        assert "".join(texts(events)) == " UNO DUE " + held and events[-1][0].endswith(held), events
        assert events[-1][1:] == (reason, None)


def test_what_follows_a_stop_string_in_its_last_token_is_never_streamed(tokenizer: Any) -> None:
    """mlx-knife #68 (a stop string over a token boundary was missed, and one inside a token
    sent with the rest of that token) and vLLM #3672 (stop strings had to align with tokens):
    "beta gamma" ends inside the token "ma!", whose "!" no event holds. With
    ``include_stop_str_in_output`` (vLLM #1973) nothing is held back (no event is ever taken
    back): each token's text as it comes, the stop string in, the "!" still out."""
    outputs = ids(tokenizer, "▁alpha", "▁beta", "▁gam", "ma!", "▁delta")
    events = stream(tokenizer, outputs, stop=["beta gamma"])
    assert "".join(texts(events)) == " alpha " and events[-1][1:] == ("stop", "beta gamma")
    assert not any("!" in t or "beta" in t for t in texts(events))
    events = stream(tokenizer, outputs, stop=["beta gamma"], include_stop_str_in_output=True)
    assert texts(events) == [" alpha", " beta", " gam", "ma"] and events[-1][1:] == ("stop", "beta gamma")


@pytest.mark.parametrize(("character", "after"), [("日", []), ("😀", ["!"])])
def test_a_stop_string_of_a_character_split_over_byte_pieces(tokenizer: Any, character: str, after: list[str]) -> None:
    """vLLM #931 and #937's kind (a character split over byte tokens streamed as U+FFFD) where the
    stop string is that character: no event holds a U+FFFD or a part of the stop string, and the
    stop is found once the character is whole."""
    stop = character + "".join(after)
    events = stream(tokenizer, ids(tokenizer, "▁yes", character, *after, "▁yes"), stop=[stop])
    assert "".join(texts(events)) == " yes" and events[-1][1:] == ("stop", stop)
    assert not any("\ufffd" in t or character in t for t in texts(events))


def test_words_keep_their_leading_space_in_every_event(tokenizer: Any) -> None:
    """transformers #22710, djl-serving #1272 and tensorrtllm_backend #332 (Llama's SentencePiece
    tokens streamed one by one lost their spaces: "DaenerysistheKhaleesi"): each event is its
    token's text with its space, the first output token's too (the prompt is its left context,
    as vLLM's detokenizer reads it); a stop string beginning with a space cuts the space."""
    outputs = ids(tokenizer, "▁Da", "ener", "ys", "▁is", "▁the", "▁Kh", "ale", "esi")
    assert texts(stream(tokenizer, outputs)) == [" Da", "ener", "ys", " is", " the", " Kh", "ale", "esi"]
    events = stream(tokenizer, outputs, stop=[" is"])
    assert "".join(texts(events)) == " Daenerys" and events[-1][1:] == ("stop", " is")


def test_the_last_allowed_token_stops_with_stop_where_it_ends_the_answer(tokenizer: Any) -> None:
    """llama.cpp #7198 (finish_reason was "stop" for every answer cut by max_tokens) and
    llm-d-inference-sim #29 (never "length"): cut by the limit, "length", the last event with the
    text held back; a stop string the last allowed token completes, or EOS as that token, is
    "stop" (vLLM looks for stop strings before the limit; OpenAI: a natural stop point)."""
    outputs = ids(tokenizer, "▁alpha", "▁beta", "▁gam", "ma")
    stopped = stream(tokenizer, outputs, stop=["beta gamma"], max_tokens=4)
    assert "".join(texts(stopped)) == " alpha " and stopped[-1][1:] == ("stop", "beta gamma")
    cut = stream(tokenizer, outputs, stop=["beta gamut"], max_tokens=4)
    assert "".join(texts(cut)) == " alpha beta gamma" and cut[-1][0].endswith("gamma")
    assert cut[-1][1:] == ("length", None)
    assert stream(tokenizer, [*outputs[:2], EOS], max_tokens=3)[-1] == ("", "stop", None)


def test_an_added_token_is_streamed_whole_where_special_tokens_are_kept(tokenizer: Any) -> None:
    """TGI #1254 (ChatML's end streamed in two parts) for a model whose "<|im_end|>" is one added
    token: with ``skip_special_tokens: false`` (vLLM #893's field) it is one event's whole text,
    and as a stop string it ends the request there, cut (vLLM: it stays out unless
    ``include_stop_str_in_output``); skipped (the default), it spells nothing, so it completes no
    stop string and the answer runs on, as in vLLM."""
    im_end = tokenizer.convert_tokens_to_ids(IM_END)
    outputs = [*ids(tokenizer, "▁yes"), im_end, *ids(tokenizer, "▁yes")]
    kept = stream(tokenizer, outputs, skip_special_tokens=False, max_tokens=3)
    assert texts(kept) == [" yes", IM_END, " yes"]
    stopped = stream(tokenizer, outputs, skip_special_tokens=False, stop=[IM_END])
    assert "".join(texts(stopped)) == " yes" and stopped[-1][1:] == ("stop", IM_END)
    skipped = stream(tokenizer, outputs, stop=[IM_END], max_tokens=3)
    assert "".join(texts(skipped)) == " yes yes" and skipped[-1][1:] == ("length", None)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_no_event_is_ever_taken_back_and_the_text_holds_no_stop_string(tokenizer: Any, data: st.DataObject) -> None:
    """All the above at once, over random outputs of the pieces (byte pieces of 日 and 😀 among
    them) and stop strings cut from their text or made up: the events joined are the answer
    (``stream`` checks it: text shown and then cut would break it), which is what the tokens
    spell up to the first stop string and holds none, and a stop string named ends it."""
    pieces = [*PIECES, "日", "😀"]
    outputs = ids(tokenizer, *data.draw(st.lists(st.sampled_from(pieces), min_size=1, max_size=12)))
    whole = IncrementalDetokenizer(tokenizer, [1, *ids(tokenizer, "▁ABC")])
    spelt = "".join(whole.push([t]) for t in outputs) + whole.flush()
    cut = st.tuples(st.integers(0, len(spelt)), st.integers(1, 6)).map(lambda a: spelt[a[0] : a[0] + a[1]])
    stops = data.draw(st.lists(st.one_of(cut, st.text("ab\n :!", min_size=1, max_size=4)).filter(bool), max_size=3))
    include = data.draw(st.booleans())
    events = stream(tokenizer, outputs, stop=stops, include_stop_str_in_output=include, max_tokens=len(outputs))
    text, (_, reason, matched) = "".join(texts(events)), events[-1]
    assert spelt.startswith(text) and reason in ("stop", "length")
    if isinstance(matched, str):
        assert text.endswith(matched) if include else spelt[len(text) :].startswith(matched)
    assert not any(s in (text[: -len(matched)] if include and matched else text) for s in stops)
