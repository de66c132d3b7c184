"""Incremental detokenization: the text a sequence's newest tokens add, emitted only once complete.

A byte-level BPE token can hold part of a UTF-8 character, and some tokenizers change the
spelling of a token by what precedes it (leading spaces), so text is decoded over a short window
of previous tokens and a delta is released only when it does not end in a partial character.
"""

from __future__ import annotations

from typing import Protocol

# Prompt tokens kept as left context for the first output token's spelling.
_CONTEXT = 5


class Tokenizer(Protocol):
    def decode(self, ids: list[int], skip_special_tokens: bool = ...) -> str: ...


class IncrementalDetokenizer:
    def __init__(self, tokenizer: Tokenizer, prompt_ids: list[int], skip_special_tokens: bool = True) -> None:
        self.tokenizer = tokenizer
        self.skip = skip_special_tokens
        self.ids = list(prompt_ids[-_CONTEXT:])
        # ids[prefix:read] is decoded context; ids[read:] is not yet emitted.
        self.prefix = 0
        self.read = len(self.ids)

    def push(self, token_ids: list[int]) -> str:
        """Add tokens; return the newly completed text (possibly empty)."""
        self.ids.extend(token_ids)
        before = self.tokenizer.decode(self.ids[self.prefix : self.read], skip_special_tokens=self.skip)
        after = self.tokenizer.decode(self.ids[self.prefix :], skip_special_tokens=self.skip)
        if len(after) <= len(before) or after.endswith("\ufffd"):
            return ""
        self.prefix, self.read = self.read, len(self.ids)
        return after[len(before) :]
