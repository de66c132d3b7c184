"""Incremental detokenization: the text a sequence's newest tokens add, emitted only once complete.

A byte-level BPE token can hold part of a UTF-8 character, and some tokenizers change the
spelling of a token by what precedes it (leading spaces), so text is decoded over a short window
of previous tokens and a delta is released only when it does not end in a partial character.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from typing import Any, Protocol

from dlora.common.messages import SamplingParams

# Prompt tokens kept as left context for the first output token's spelling.
_CONTEXT = 5
# Tokens held back at most before what of their text is settled goes out (``_settle``), and how
# many of the last are kept back then: more than an unfinished character's bytes (3) with a few
# tokens that spell nothing between them.
_MAX_HELD = 16
_KEEP = 8
# The longest left context tried where the last ``_CONTEXT`` tokens begin inside a character
# (``context_start``); vLLM's detokenizer looks as far for a clean start.
_LONGEST_CONTEXT = 24


class Tokenizer(Protocol):
    def decode(self, ids: list[int], skip_special_tokens: bool = ...) -> str: ...


def decoder(tokenizer: Tokenizer) -> Callable[[list[int], bool], str]:
    """(ids, skip_special_tokens) -> text, never with transformers' clean-up of the spaces before
    punctuation: generated text is what its tokens spell, as vLLM's detokenizer gives it (a
    tokenizer_config asking for it, Llama 3's under transformers 4.x or any non-BPE one under 5.x,
    made "x != y" "x!= y"). The Rust tokenizer's own decode where there is one: the same text, and
    ~4x cheaper (1 against 4 us here), where a step decodes twice per sequence."""
    backend: Any = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        return lambda ids, skip: str(backend.decode(ids, skip_special_tokens=skip))
    if getattr(tokenizer, "clean_up_tokenization_spaces", False):  # a slow transformers tokenizer asking for it
        hf: Any = tokenizer
        return lambda ids, skip: str(hf.decode(ids, skip_special_tokens=skip, clean_up_tokenization_spaces=False))
    return lambda ids, skip: tokenizer.decode(ids, skip_special_tokens=skip)


def spaces_added_tokens(tokenizer: Any) -> bool:
    """Whether ``decoder(tokenizer)`` writes anything between two added tokens side by side (a
    slow transformers tokenizer's ``spaces_between_special_tokens``, on by default; a Rust one
    without a decoder joins every token with a space). A Rust tokenizer with a byte-level or
    SentencePiece decoder, every Llama-family one, writes them as they are: vLLM's
    ``spaces_between_special_tokens=false`` (its fast detokenizer's, #1347, advised for
    Kimi K2's ``<think>``, #33457) is then what every request gets already. False where the
    tokenizer has no added tokens: nothing to write between."""
    added = list((getattr(tokenizer, "added_tokens_decoder", None) or {}).items())[:2]
    if not added:
        return False
    (first, a), (second, b) = (added * 2)[:2]  # one added token: itself twice
    return decoder(tokenizer)([first, second], False) != getattr(a, "content", a) + getattr(b, "content", b)


class IncrementalDetokenizer:
    """``prompt_ids``: the tokens before the first new one (a resumed request's include the outputs
    produced before); ``pending``: how many of those at the end have had no text emitted yet (a
    character split across tokens held back where the request ran before): their text comes out
    with the next push, so a resumed stream loses no character at the seam."""

    def __init__(
        self, tokenizer: Tokenizer, prompt_ids: list[int], skip_special_tokens: bool = True, pending: int = 0
    ) -> None:
        self.decode = decoder(tokenizer)
        self.skip = skip_special_tokens
        pending = max(0, min(pending, len(prompt_ids)))
        done = len(prompt_ids) - pending
        start = context_start(self.decode, prompt_ids[:done], skip_special_tokens)
        self.ids = list(prompt_ids[start:])
        # ids[prefix:read] is decoded context; ids[read:] is not yet emitted.
        self.prefix = 0
        self.read = done - start
        # Where each of ids lies among the tokens given (``_settle`` drops some from the window)
        self.at, self.given = list(range(len(self.ids))), len(self.ids)

    @property
    def pending(self) -> int:
        """Tokens pushed whose text is held back (they end in part of a character), those dropped
        from the window among them too: the last tokens given after the last one read. A run
        dropped with nothing held after it counts: a resume must not take it as context (its last
        five tokens spell nothing, and a SentencePiece word after them lost its space)."""
        return self.given - (self.at[self.read - 1] + 1 if self.read else 0)

    def held(self, leave: int = 0) -> str:
        """What the tokens held back spell now, an unfinished character's bytes as U+FFFD (as
        decode writes them); the last ``leave`` of them left out (a resumed request's stop token,
        whose text is not the output's: ``ended_on_resume``)."""
        end = len(self.ids) - leave
        return self._unread(end) if self.read < end else ""

    def flush(self) -> str:
        """``held()``, taken as emitted: at a request's end, where nothing can finish the character
        any more (TGI's and transformers' TextStreamer's end; kept back, the text was shorter than
        its tokens' decode, and a stream lost its ending)."""
        text = self.held()
        self.prefix, self.read = self.read, len(self.ids)
        return text

    def push(self, token_ids: list[int]) -> str:
        """Add tokens; return the newly completed text (possibly empty)."""
        self.ids.extend(token_ids)
        self.at.extend(range(self.given, self.given + len(token_ids)))
        self.given += len(token_ids)
        text = self._unread()
        if not text or text.endswith("\ufffd"):
            return self._settle(text) if len(self.ids) - self.read > _MAX_HELD else ""
        self.prefix, self.read = self.read, len(self.ids)
        return text

    def _settle(self, text: str) -> str:
        """Of the tokens held back (their text ``text`` now): those that spell nothing (EOS under
        ignore_eos, skipped) dropped from the window where the text stays the same without them,
        so the text before them stays the context of what follows (a character's bytes on either
        side join, a SentencePiece word after them keeps its space); then, still too many, what
        the first of them spell up to ``_KEEP`` before the last, where later tokens no longer
        change it, out as emitted. Held back for as long as the text ends in U+FFFD or is empty,
        a run of lone continuation bytes or of EOS grew the window decoded each push with the
        output: O(n^2), and a stream got no text of the run until its end (SGLang #34740's kind)."""
        context, held = self.ids[self.prefix : self.read], self.ids[self.read :]
        kept = [i for i, t in enumerate(held, self.read) if self.decode([t], self.skip)]
        spelling = [self.ids[i] for i in kept]
        if len(kept) < len(held) and spelt(self.decode, context, spelling, self.skip) == text:
            self.at[self.read :] = [self.at[i] for i in kept]
            self.ids[self.read :] = spelling
            if len(self.ids) - self.read <= _MAX_HELD:
                return ""
        end = len(self.ids) - _KEEP
        for k in range(end, max(self.read, end - 4), -1):  # a cut inside a character moves back
            done = spelt(self.decode, context, self.ids[self.read : k], self.skip)
            if done and text.startswith(done):
                self.prefix, self.read = self.read, k
                return done
        return ""

    def _unread(self, end: int | None = None) -> str:
        """What the tokens not yet emitted (up to ``end``; None: all) spell after their context (``spelt``)."""
        return spelt(self.decode, self.ids[self.prefix : self.read], self.ids[self.read : end], self.skip)


def context_start(decode: Callable[[list[int], bool], str], ids: list[int], skip: bool) -> int:
    """Where the left context for the tokens after ``ids`` begins: their last ``_CONTEXT`` tokens,
    or, where those begin inside a character, the fewest more (up to ``_LONGEST_CONTEXT``) that
    decode without U+FFFD. A byte-fallback decoder (Llama 2's, Mistral's) writes a whole run of
    <0xNN> pieces as U+FFFD once it is invalid, so a context cut inside a character made the
    output's own bytes after it U+FFFD too: a CJK prompt ending in byte pieces and an output
    beginning with more gave "\ufffd\ufffd" for "ü" (as vLLM, which looks for such a start too)."""
    if len(ids) <= _CONTEXT:
        return 0
    for n in range(_CONTEXT, min(len(ids), _LONGEST_CONTEXT) + 1):
        if "\ufffd" not in decode(ids[-n:], skip):
            return len(ids) - n
    return len(ids) - _CONTEXT


def spelt(decode: Callable[[list[int], bool], str], context: list[int], ids: list[int], skip: bool) -> str:
    """What ``ids`` spell after ``context``: the decode of both past the context's own. Where that
    does not begin with the context's text, decoding them together spelled the context anew (a
    byte-fallback decoder writes every byte of an invalid run of byte tokens as U+FFFD, a
    character already sent from the context with them: its length no longer measured the
    context, and 2 bytes came out as 4 U+FFFD), so the context is shortened from its start until
    it does: its last ``_CONTEXT`` starts are tried, then none (each try two decodes: a long
    context of tokens that spell nothing cost thousands)."""
    # (the whole context first, at no more cost than before: the one try almost every token needs)
    for start in itertools.chain((0,) if context else (), range(max(1, len(context) - _CONTEXT), len(context))):
        before = decode(context[start:], skip)
        after = decode(context[start:] + ids, skip)
        if after.startswith(before):
            return after[len(before) :]
    return decode(ids, skip)


def sent_tail(
    tokenizer: Tokenizer, prompt_ids: list[int], resumed: list[int], params: SamplingParams, pending: int, held: str
) -> str:
    """The text a resumed request's client was already sent, as much of its end as a stop string
    (``params.stop``) can span less a character (none without stop strings): what
    its ``resumed`` outputs spell, the last ``pending`` left out (they spelled nothing yet) and the
    text ``held`` back from the client taken off the end, decoded as ``IncrementalDetokenizer``
    decodes (a few tokens before as left context). A stop string begun before a move, a recovery
    or a preemption is looked for across the seam in it: with ``include_stop_str_in_output``
    nothing is held back for one, so the held text alone does not hold its beginning."""
    done, chars = resumed[: len(resumed) - pending], max(map(len, params.stop), default=1) - 1
    if chars <= 0 or not done:
        return ""
    # a character takes 4 tokens at most (a byte-fallback tokenizer's UTF-8 bytes), but for special ones
    n = min(len(done), 4 * chars + _CONTEXT)
    decode, earlier = decoder(tokenizer), (prompt_ids + done)[:-n]
    before = earlier[context_start(decode, earlier, params.skip_special_tokens) :]
    text = spelt(decode, before, done[-n:], params.skip_special_tokens)
    if held and text.endswith(held):
        text = text[: -len(held)]
    return text[-chars:]
