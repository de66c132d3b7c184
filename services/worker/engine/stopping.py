"""When a request stops, and how much of its text may be shown yet. Pure.

Order: a stop token or EOS whose text stays out of the output ends the request by itself, its
text never completing a stop string (vLLM v1: the engine core stops on the token, and the
detokenizer leaves the token out before it looks for stop strings); else a stop string in the new
text (cut from the text), a stop token or EOS (kept in the tokens), a structured document
complete, then the length limits (a model that ends on its last allowed token stops, as vLLM v0
and OpenAI say; v1 would call it "length"). Under ``min_tokens``, stop strings count from the
output token after the ``min_tokens``-th, stop tokens and EOS from that token itself (vLLM's
rules).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

from dlora.common.messages import FinishReason, SamplingParams


class Stop(NamedTuple):  # a tuple, not a frozen dataclass: made for every token of every request
    reason: FinishReason | None  # None: go on
    text: str  # the output text, less what ended it (a stop string, a stop token's or EOS's text)
    # vLLM's stop_reason: the stop string or stop token id that ended it; None for EOS and the rest
    matched: str | int | None = None
    dropped: bool = False  # the token that ended it is left out of the text (a stop token, EOS)


def check_stop(
    text: str,
    old_len: int,
    token: int,
    params: SamplingParams,
    eos_ids: set[int],
    num_output: int,
    total_len: int,
    max_model_len: int,
    document_complete: bool = False,
    primary_eos: int | None = None,
) -> Stop:
    """Whether the request stops after ``token``, its text now ``text`` (``old_len`` characters
    before this step); ``num_output`` tokens generated, ``total_len`` in its context. What ended
    it, a stop string or a stop token's (or EOS's) text, is cut from the text unless
    ``include_stop_str_in_output`` (vLLM's rule: the ending token is left out of detokenization);
    the last token of a complete structured document is part of it. ``stop_reason`` (``matched``)
    is None for ``primary_eos``, the tokenizer's EOS; the model's other end-of-sequence ids
    (generation_config.json's) are named, as vLLM makes them stop_token_ids (None: every EOS
    unnamed)."""
    keep = params.include_stop_str_in_output
    # vLLM's bounds: stop strings from the token after the min_tokens-th, stop tokens and EOS from
    # that token itself (masked before it, so the same in effect); EOS first (no stop_reason).
    by_token: Stop | None = None
    if num_output >= params.min_tokens:
        if token in eos_ids and not params.ignore_eos:
            named = None if primary_eos in (None, token) else token  # the tokenizer's own EOS: no stop_reason
            by_token = Stop(FinishReason.STOP, text if keep else text[:old_len], named, not keep)
        elif token in params.stop_token_ids:
            by_token = Stop(FinishReason.STOP, text if keep else text[:old_len], token, not keep)
    if by_token is not None and not keep:  # its text is not the output's: it completes no stop string
        return by_token
    if (by_string := stop_string_in(text, old_len, params, num_output)) is not None:
        return by_string
    if by_token is not None:
        return by_token
    if document_complete:
        return Stop(FinishReason.STOP, text)
    if num_output >= params.max_tokens or total_len >= max_model_len:
        return Stop(FinishReason.LENGTH, text)
    return Stop(None, text)


def ends_by_token(output_ids: list[int], params: SamplingParams, eos_ids: set[int]) -> bool:
    """Whether the last of ``output_ids`` (a resumed request's whole output so far) ends it by
    itself, whatever its text or grammar: a stop token or EOS that ``min_tokens`` and
    ``ignore_eos`` let stop it (``check_stop``'s first rule, asked of ``check_stop`` itself). The
    engine ends such a resume as it is added, before its grammar is compiled, and the worker
    compiles none for it on arrival; at its length, whether its document is complete picks its
    reason ("stop" or "length"), so its grammar is needed."""
    # No text (no stop string ends in it), no complete document, a context never full: what
    # ends it "stop" here is its last token alone.
    return bool(output_ids) and (
        check_stop("", 0, output_ids[-1], params, eos_ids, len(output_ids), 0, 1).reason is FinishReason.STOP
    )


def grammar_needed(output_ids: list[int], params: SamplingParams, eos_ids: set[int]) -> bool:
    """Whether a request's grammar is compiled: it asks for one and is not a resume its output's
    last token ends (``ends_by_token``). The engine's ``add_request`` and the worker's arrival
    (which compiles ahead, off the loop) ask this one rule."""
    return bool(params.structured_outputs()) and not ends_by_token(output_ids, params, eos_ids)


def stop_string_in(text: str, old_len: int, params: SamplingParams, num_output: int) -> Stop | None:
    """The stop a stop string ending in ``text``'s new part (after ``old_len`` characters) makes,
    the text cut before it (after it with ``include_stop_str_in_output``); None: none does, or
    ``min_tokens`` (of ``num_output`` tokens so far) holds stop strings back. Also for the text a
    request's end appends (a character its last tokens left unfinished, as U+FFFD): a stop string
    it completed stayed in the text returned (``stop=["\ufffd"]``, cut by max_tokens)."""
    if not params.stop or num_output <= params.min_tokens or (found := find_stop(text, params.stop, old_len)) is None:
        return None
    end = found[1] if params.include_stop_str_in_output else found[0]
    return Stop(FinishReason.STOP, text[:end], text[found[0] : found[1]])


def visible_end(text: str, emitted: int, params: SamplingParams, finished: bool) -> int:
    """How far the text may be shown: all of it once finished, else all but its end where that
    begins a stop string (``partial_stop``: held back until the text shows whether it is one),
    unless a stop string stays in the text anyway (``include_stop_str_in_output``: what is shown
    is never taken back, as vLLM). Never less than ``emitted``, the characters already shown; no
    stop string begins before them (what could begin one was held), so only the text after them
    is looked in: for most tokens, one look for a stop string's first character in their text.
    Per token through ``advance`` (1-4 short stop strings) that costs what vLLM's fixed window
    cost, where trying each stop string cost 5-40 % more; a token whose text holds a first
    character (a stop string beginning with a space, in prose) costs about 0.6 us more."""
    if finished or not params.stop or params.include_stop_str_in_output:
        return max(emitted, len(text))
    if _firsts(tuple(params.stop)).isdisjoint(text[emitted:]):
        return len(text)
    return max(emitted, len(text) - partial_stop(text, params.stop, emitted))


def partial_stop(text: str, stops: list[str], start: int = 0) -> int:
    """The length of the longest end of ``text`` that is a proper beginning of one of
    ``stops`` (0: none), beginning at ``start`` or after: what a stop string could still grow
    from. Only that is held back, as llama.cpp's server and SGLang (#11462) hold it; vLLM holds
    the longest stop string's length less one whatever the text, so a stream with
    ``stop=["Observation:"]`` got its first 11 characters only with its twelfth, each token's text
    cut up across events (vLLM #13087: the first chunks were empty where ``stop`` was set). Of
    each stop string, the places its first character takes are tried, ``_TRIES`` at most; past
    them, the text from the first not tried on counts as held (more than need be, never less: 256
    stop strings of 1,024 characters over a text full of their first character took 0.3 s a
    token all tried, 4 ms so)."""
    n, longest = len(text), 0
    for s in stops:
        if (at := text.find(s[0], max(start, n - len(s) + 1))) == -1:  # (s whole: found already)
            continue
        for _ in range(_TRIES):
            if at == -1 or n - at <= longest:
                break
            if s.startswith(text[at:]):
                longest = n - at
                break
            at = text.find(s[0], at + 1)
        else:
            longest = max(longest, n - at if at != -1 else 0)
    return longest


# (a key holds 256 stop strings of 1,024 characters at most: 64 keys, 16 M characters at worst;
# a server sees a few stop lists, its chat templates' and its clients')
@functools.lru_cache(maxsize=64)
def _firsts(stops: tuple[str, ...]) -> frozenset[str]:
    """The first characters of ``stops`` (each non-empty: ``SamplingParams`` refuses an empty
    one), asked per token of every request with stop strings."""
    return frozenset(s[0] for s in stops)


# Places a stop string could begin at tried in ``partial_stop`` before the rest is held unlooked:
# more than a stop string of a few words beginning with a space finds in its own length of text.
_TRIES = 8


def find_stop(text: str, stops: list[str], old_len: int) -> tuple[int, int] | None:
    """(start, end) in ``text`` of the earliest stop string that ends in its new part (after
    ``old_len`` characters), or None. Each is looked for from where it could end there, as vLLM
    looks (one window for all, the longest's, found a short one lying wholly in text already
    checked, passed while ``min_tokens`` held the checks back). Of two that end there the earliest
    wins, not the first listed as in vLLM: the text returned holds no stop string (OpenAI's promise)."""
    hits = [(i, i + len(s)) for s in stops if (i := text.find(s, max(0, old_len - len(s) + 1))) != -1]
    return min(hits) if hits else None
