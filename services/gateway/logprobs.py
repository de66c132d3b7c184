"""The logprobs objects of the OpenAI API (completions' and chat's) and vLLM's prompt_logprobs,
made from the workers' ``TokenLogprob`` entries. Pure."""

from __future__ import annotations

import codecs
from typing import Any

from dlora.common.messages import TokenLogprob
from dlora.model.token_bytes import CONTEXT_TOKENS, TokenIdText, TokenText


class TextOffset:
    """Where a choice's next token begins in its text, in characters (completions' ``text_offset``):
    what the bytes its tokens add to the text have made so far. A character split over tokens
    begins where its first byte's token does; bytes left short of one by the next token's are one
    U+FFFD before it, as a byte-level BPE tokenizer's decode replaces them. A byte-fallback
    tokenizer's (Llama 2's) decoder writes a run of ``<0xNN>`` pieces that is not UTF-8 one U+FFFD
    a byte, so those pieces are counted apart (``advance``'s ``byte_piece``): one that leaves the
    run unable to be a character begins at its own U+FFFD (counted one a run, every offset after
    such bytes fell short of the text by the difference)."""

    def __init__(self, start: int) -> None:
        self.at = start
        self._utf8 = codecs.getincrementaldecoder("utf-8")("replace")
        self._run = b""  # byte-fallback pieces' bytes since the text last made characters of them
        self._broken = False  # they can no longer: each is one U+FFFD

    def advance(self, data: bytes, byte_piece: bool = False) -> int:
        """The offset where ``data`` (a token's bytes) begins; moves past it. ``byte_piece``: the
        token is a byte-fallback piece (``TokenText.byte_piece``)."""
        if byte_piece:
            return self._piece(data)
        if not data:  # a token that spells nothing (a skipped special one) leaves a run whole
            return self.at + (len(self._run) if self._broken else 0)
        self.at += len(self._run)  # a run ended short of a character: a U+FFFD each byte
        self._run, self._broken = b"", False
        at, pending = self.at, self._utf8.getstate()[0]
        if pending and data and not _continues(pending, data[:1]):
            at += len(pending.decode("utf-8", "replace"))
        self.at += len(self._utf8.decode(data))
        return at

    def _piece(self, data: bytes) -> int:
        at = self.at + (len(self._run) if self._broken else 0)
        self._run += data
        if not self._broken:
            decoder = codecs.getincrementaldecoder("utf-8")("strict")
            try:
                text = decoder.decode(self._run)
            except UnicodeDecodeError:
                self._broken, at = True, self.at + len(self._run) - len(data)
            else:
                if not decoder.getstate()[0]:  # whole characters: the text has them
                    self.at += len(text)
                    self._run = b""
        return at


def _continues(pending: bytes, byte: bytes) -> bool:
    """Whether ``byte`` goes on with the character ``pending`` (its first bytes) begins."""
    try:
        codecs.getincrementaldecoder("utf-8")("strict").decode(pending + byte)
    except UnicodeDecodeError:
        return False
    return True


def sampled_before(entries: list[TokenLogprob], sampled: list[int]) -> list[list[int]]:
    """Each entry's sampled tokens before it (what its text is read after, ``TokenText.text_of``):
    ``sampled``, the choice's so far, then the entries' own; ``sampled`` is left holding the last
    ``CONTEXT_TOKENS`` of them, for the choice's next chunk."""
    out = []
    for e in entries:
        out.append(sampled[-CONTEXT_TOKENS:])
        sampled.append(e.token_id)
        del sampled[:-CONTEXT_TOKENS]
    return out


def _tail(ids: list[int], end: int) -> list[int]:
    """The tokens a prompt's token ``end`` is read after (its last ``CONTEXT_TOKENS`` before it)."""
    return ids[max(0, end - CONTEXT_TOKENS) : end]


def completion_logprobs(
    entries: list[TokenLogprob],
    tokens: TokenText | TokenIdText,
    offset: TextOffset,
    skip_special_tokens: bool,
    sampled: list[int] | None = None,
) -> dict[str, Any]:
    """The completions endpoint's logprobs object for these tokens, ``offset`` at the first,
    ``sampled`` the choice's sampled tokens before them (``sampled_before``). The chosen token is
    always in its position's ``top_logprobs``, so there may be one more than asked (as in vLLM)."""
    before = sampled_before(entries, [] if sampled is None else sampled)
    texts = [tokens.text_of(e.token_id, b) for e, b in zip(entries, before)]
    tops = [_top_logprobs(tokens, e.top, text, e.logprob, b) for e, text, b in zip(entries, texts, before)]
    return {
        "tokens": texts,
        "token_logprobs": [e.logprob for e in entries],
        "top_logprobs": tops,
        "text_offset": [
            offset.advance(tokens.shown(e.token_id, skip_special_tokens), tokens.byte_piece(e.token_id))
            for e in entries
        ],
    }


def prompt_logprobs(
    prompt_ids: list[int], entries: list[TokenLogprob], tokens: TokenText | TokenIdText, echo: str
) -> dict[str, Any]:
    """The completions endpoint's logprobs object for an echoed prompt (``prompt_ids``, entry i
    the log-probability of token i + 1, the prompt echoed as ``echo``): its first token has none
    (null), as vLLM answers. Offsets from the tokenizer's own offset mapping where ``echo``
    encodes to ``prompt_ids`` (a client's text, as a rule: exact through normalisers and added
    tokens that strip the spaces beside them), else as ``echo_offsets`` finds them."""
    texts = [tokens.text_of(t, _tail(prompt_ids, i)) for i, t in enumerate(prompt_ids)]
    tops = [
        _top_logprobs(tokens, e.top, texts[i + 1], e.logprob, _tail(prompt_ids, i + 1)) for i, e in enumerate(entries)
    ]
    return {
        "tokens": texts,
        "token_logprobs": [None] + [e.logprob for e in entries],
        "top_logprobs": [None, *tops],
        "text_offset": tokens.offsets_in(echo, prompt_ids) or echo_offsets(prompt_ids, tokens, echo),
    }


def _top_logprobs(
    tokens: TokenText | TokenIdText, top: list[tuple[int, float]], text: str, logprob: float, before: list[int]
) -> dict[str, float]:
    """A position's ``top_logprobs`` (keyed by text, as the API has it, each read after the sampled
    tokens ``before``) with its chosen token's ``text`` and ``logprob``. Tokens that spell alike (a
    byte-fallback ``<0x61>`` and ``a``, the model's padding ids past the tokenizer's, tokens that
    end inside a character: "") share a key, which holds the likelier of them: a
    dict built in order kept the last, so a less likely alternative, or the chosen token itself,
    overwrote a likelier one (vLLM #44319's, SGLang #32290's kind)."""
    out: dict[str, float] = {}
    for key, lp in [*((tokens.text_of(t, before), lp) for t, lp in top), (text, logprob)]:
        if key not in out or lp > out[key]:
            out[key] = lp
    return out


_REPLACED = "\ufffd".encode()
_AHEAD = 16  # bytes a token's piece is looked for past where the last one ended


def echo_offsets(prompt_ids: list[int], tokens: TokenText | TokenIdText, echo: str) -> list[int]:
    """Where each of ``prompt_ids`` begins in ``echo``, the prompt's text as echoed (characters;
    a token inside a character begins where the character does, as ``TextOffset`` counts), in
    one pass over both.

    Each token's bytes are found in the echo's in turn, so an offset always indexes the text
    returned, however it was written. The echo may differ from the tokens' bytes joined: a client's
    text holds special tokens written out ("</s>", tokenized as one) where a decode skipping them
    shows none; a tokenizer adds BOS the text does not hold; a SentencePiece token spells a leading
    space ("▁re") that the start of a text or a special token's end leaves out; bytes that make no
    character are one U+FFFD a maximal run, or one a byte-fallback piece (its decoder's rule:
    taken as one a run, every offset after it fell short); a decode may add or drop a space. A
    piece not found where the last ended is looked for a few bytes on, and else takes no width
    (the next token finds its place again). (Counted from the tokens' shown bytes alone, a literal "</s>" moved
    every offset of "kalo</s> remi" by its length: vLLM #5334's kind.)"""
    text, n = echo.encode(), len(prompt_ids)
    run = [1] * n  # equal ids from each on (a run of one special token is taken as one)
    for i in range(n - 2, -1, -1):
        if prompt_ids[i] == prompt_ids[i + 1]:
            run[i] = run[i + 1] + 1
    at, starts, unwritten, replaced = 0, [], 0, -1
    for i, t in enumerate(prompt_ids):
        piece = tokens.bytes_of(t)
        starts.append(at)
        if t in tokens.special_ids:
            # Written out in the text, or not: in a run, those the text lacks come first (BOS
            # added before a text that begins with "<s>" itself).
            if i == 0 or prompt_ids[i - 1] != t:
                held = 0
                while piece and held < run[i] and text.startswith(piece, at + held * len(piece)):
                    held += 1
                unwritten = run[i] - held
            if unwritten:
                unwritten -= 1
            else:
                at += len(piece)
            continue
        if text.startswith(piece, at):
            at += len(piece)
        elif piece[:1] == b" " and text.startswith(piece[1:], at):
            at += len(piece) - 1
        elif replaced >= 0 and piece and piece[0] & 0xC0 == 0x80 and not tokens.byte_piece(t):
            starts[-1] = replaced  # more of the bytes a U+FFFD stands for (a byte-fallback piece has its own)
            continue
        elif text.startswith(_REPLACED, at):
            replaced, at = at, at + len(_REPLACED)
            continue
        elif piece and (found := text.find(piece, at, at + _AHEAD + len(piece))) >= 0:
            starts[-1], at = found, found + len(piece)
        replaced = -1
    # A byte's character: the characters begun before it, less one where it continues one.
    offsets, chars, last = [], 0, 0
    for b in starts:
        chars += sum(1 for c in text[last:b] if c & 0xC0 != 0x80)
        last = b
        offsets.append(chars - (b < len(text) and text[b] & 0xC0 == 0x80))
    return offsets


def vllm_prompt_logprobs(
    prompt_ids: list[int], entries: list[TokenLogprob], top: int, tokens: TokenText | TokenIdText
) -> list[dict[str, Any] | None]:
    """vLLM's ``prompt_logprobs``: per prompt token, null for the first, then {token id: {logprob,
    rank, decoded_token}} of the token (its rank in the vocabulary, as the worker counted it) and
    its ``top`` most likely alternatives (ranks 1..top). A worker that counted no rank (an older
    one) leaves the token's place among the alternatives, null where it is not one of them."""

    def entry(token_id: int, logprob: float, rank: int | None, before: list[int]) -> dict[str, Any]:
        return {"logprob": logprob, "rank": rank, "decoded_token": tokens.text_of(token_id, before)}

    out: list[dict[str, Any] | None] = [None]
    for i, (token, e) in enumerate(zip(prompt_ids[1:], entries), 1):
        alternatives, before = e.top[:top], _tail(prompt_ids, i)
        rank = e.rank or next((r for r, (t, _) in enumerate(alternatives, 1) if t == token), None)
        out.append(
            {str(token): entry(token, e.logprob, rank, before)}
            | {str(t): entry(t, lp, r, before) for r, (t, lp) in enumerate(alternatives, 1)}
        )
    return out


def chat_logprobs(
    entries: list[TokenLogprob], tokens: TokenText | TokenIdText, sampled: list[int] | None = None
) -> dict[str, Any]:
    """The chat endpoint's logprobs object: per token its text (after the choice's ``sampled``
    tokens before them: ``sampled_before``), log-probability, bytes (UTF-8 as the vocabulary holds
    them: a character split over tokens is rebuilt by joining them) and the ``top_logprobs``
    alternatives."""

    def item(token_id: int, logprob: float, before: list[int]) -> dict[str, Any]:
        text = tokens.text_of(token_id, before)
        return {"token": text, "logprob": logprob, "bytes": list(tokens.bytes_of(token_id))}

    before = sampled_before(entries, [] if sampled is None else sampled)
    return {
        "content": [
            item(e.token_id, e.logprob, b) | {"top_logprobs": [item(t, lp, b) for t, lp in e.top]}
            for e, b in zip(entries, before)
        ],
        "refusal": None,
    }


def merge_logprobs(chat: bool, parts: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The logprobs objects of a choice's chunks as one (non-streamed responses)."""
    if not parts:
        return None
    if chat:
        return {"content": [c for p in parts for c in p["content"]], "refusal": None}
    return {k: [v for p in parts for v in p[k]] for k in ("tokens", "token_logprobs", "top_logprobs", "text_offset")}
