"""vLLM's ``bad_words``: words a request never generates. Pure.

Each word is tokenized as vLLM tokenizes it (``SamplingParams._init_bad_words``): alone, and after
a space when that spells it with other tokens of the same count (a word inside a sentence is
another token than at its start); a sequence's last token is masked at a step where the output's
last tokens are the sequence's others (vLLM's ``apply_bad_words``, over the output only).
"""

from __future__ import annotations

from typing import Any


def bad_words_token_ids(tokenizer: Any, words: list[str]) -> list[list[int]]:
    """The token sequences ``words`` forbid (``tokenizer``: a transformers tokenizer)."""
    out: list[list[int]] = []
    for word in words:
        alone = tokenizer.encode(word.lstrip(), add_special_tokens=False)
        spaced = tokenizer.encode(" " + word.lstrip(), add_special_tokens=False)
        if alone:
            out.append(alone)
        if spaced and (not alone or (spaced[0] != alone[0] and len(spaced) == len(alone))):
            out.append(spaced)
    return out


def banned_now(sequences: list[list[int]], output_ids: list[int]) -> list[int]:
    """The tokens ``sequences`` forbid next, after ``output_ids``: each one's last where the output
    ends with the rest of it (a one-token word: always)."""
    banned = []
    for seq in sequences:
        before = len(seq) - 1
        if before <= len(output_ids) and (before == 0 or output_ids[-before:] == seq[:-1]):
            banned.append(seq[-1])
    return banned
