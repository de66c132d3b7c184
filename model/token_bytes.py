"""Each token's bytes as its tokenizer's vocabulary holds them, and its text for a logprobs entry.

``tokenizer.decode([id])`` is the wrong view of one token: a byte-level BPE token (GPT-2, Llama 3,
Qwen) or a byte-fallback one (Llama 2, Mistral: ``<0xC3>``) may hold part of a UTF-8 character,
which decodes to U+FFFD, and a SentencePiece piece loses its leading space (the decoder strips it at
the start of a text). Then OpenAI's ``bytes`` cannot rebuild a character split over tokens
(vLLM #27300, ollama #13497), and alternatives that decode alike collide as ``top_logprobs`` keys
(vLLM #44319, SGLang #32290). llguidance, which structured output already uses, reads every
token's bytes from the tokenizer's own definition (``tokenizer.json``).
"""

from __future__ import annotations

from collections.abc import Collection, Iterable
from typing import Any

from llguidance import LLTokenizer


def llg_tokenizer(hf_tokenizer: Any, vocab_size: int, eos_ids: Iterable[int], slices: bool = True) -> LLTokenizer:
    """llguidance's form of ``hf_tokenizer`` (a transformers fast tokenizer: its Rust
    ``backend_tokenizer``) over the model's ``vocab_size`` ids (ids past the tokenizer's own hold
    no bytes). ``slices``: build the slicer that speeds up grammar masks (about a second for a
    large vocabulary; not needed for bytes alone)."""
    return LLTokenizer(
        hf_tokenizer.backend_tokenizer.to_str(),
        n_vocab=vocab_size,
        eos_token=sorted(eos_ids) or None,
        slices=None if slices else [],
    )


class TokenText:
    """One token's bytes and its text as a logprobs entry shows it. ``special_ids``: the tokens the
    tokenizer holds special (its added tokens marked so)."""

    def __init__(self, tokenizer: LLTokenizer, special_ids: Collection[int]) -> None:
        self._tokenizer, self._special = tokenizer, frozenset(special_ids)

    @classmethod
    def of(cls, hf_tokenizer: Any, vocab_size: int) -> TokenText:
        added = hf_tokenizer.backend_tokenizer.get_added_tokens_decoder()
        return cls(
            llg_tokenizer(hf_tokenizer, vocab_size, [], slices=False), [i for i, t in added.items() if t.special]
        )

    def bytes(self, token_id: int) -> bytes:
        """The token's bytes: UTF-8, possibly part of a character; a special token's is its text."""
        data = self._tokenizer.decode_bytes([token_id])
        # llguidance marks its special tokens by a first byte 0xFF (never in UTF-8) and leaves the
        # mark out here, so a byte-level token of that byte came back empty.
        if token_id not in self._special and self._tokenizer.is_special_token(token_id):
            data = b"\xff" + data
        return data

    def text(self, token_id: int) -> str:
        """The token's bytes as text, a byte that is not (part of) a whole character written as
        ``\\xNN`` (as DeepSeek's API shows one; vLLM's U+FFFD would make every such token alike)."""
        return self.bytes(token_id).decode("utf-8", "backslashreplace")
