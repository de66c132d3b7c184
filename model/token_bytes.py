"""Each token's bytes as its tokenizer's vocabulary holds them, and its text for a logprobs entry.

``tokenizer.decode([id])`` is the wrong view of one token: a byte-level BPE token (GPT-2, Llama 3,
Qwen) or a byte-fallback one (Llama 2, Mistral: ``<0xC3>``) may hold part of a UTF-8 character,
which decodes to U+FFFD, and a SentencePiece piece loses its leading space (the decoder strips it at
the start of a text). Then OpenAI's ``bytes`` cannot rebuild a character split over tokens
(vLLM #27300, ollama #13497), and alternatives that decode alike collide as ``top_logprobs`` keys
(vLLM #44319, SGLang #32290). llguidance, which structured output already uses, reads every
token's bytes from the tokenizer's own definition (``tokenizer.json``). A token's text is vLLM's
(``token_string``): one that ends inside a character is "" until a token completes it, so such
alternatives share the key "" in a completion's ``top_logprobs`` (the likelier kept), as at vLLM;
``return_tokens_as_token_ids`` names each apart.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Sequence
from functools import cached_property
from typing import Any

from llguidance import LLTokenizer

from dlora.common import log

logger = log.get("tokens")

_BYTE_PIECE = re.compile(r"<0x[0-9A-Fa-f]{2}>")


def llg_tokenizer_args(hf_tokenizer: Any, vocab_size: int, eos_ids: Iterable[int]) -> tuple[str, int, list[int]]:
    """What ``llg_tokenizer`` builds its LLTokenizer from: the tokenizer's definition (JSON), its
    ids, its EOS ids (another process builds the same one from them: ``compile_bound``)."""
    return hf_tokenizer.backend_tokenizer.to_str(), max(vocab_size, len(hf_tokenizer)), sorted(eos_ids)


def llg_tokenizer(hf_tokenizer: Any, vocab_size: int, eos_ids: Iterable[int], slices: bool = True) -> LLTokenizer:
    """llguidance's form of ``hf_tokenizer`` (a transformers fast tokenizer: its Rust
    ``backend_tokenizer``) over the model's ``vocab_size`` ids (ids past the tokenizer's own hold
    no bytes; a tokenizer with more tokens than the model has ids keeps them all, as llguidance
    requires). ``slices``: build the slicer that speeds up grammar masks (about a second for a
    large vocabulary; not needed for bytes alone).

    Raises:
        AttributeError: a slow tokenizer (no ``backend_tokenizer``).
        ValueError: a tokenizer llguidance cannot read (e.g. a WordPiece decoder)."""
    text, n_vocab, eos = llg_tokenizer_args(hf_tokenizer, vocab_size, eos_ids)
    return LLTokenizer(text, n_vocab=n_vocab, eos_token=eos or None, slices=None if slices else [])


# The sampled tokens a token's text is read after: a UTF-8 character is at most 4 bytes (RFC 3629),
# so at most 4 tokens hold it (vLLM's ``LogprobsProcessor._get_sampled_context_ids``).
CONTEXT_TOKENS = 4


def token_string(data: bytes, before: Sequence[bytes] = ()) -> str:
    """A token's text in a logprobs entry as vLLM writes it (``LogprobsProcessor._verify_tokens``
    and ``_correct_decoded_token``, vllm/v1/engine/logprobs.py; vLLM #28874, #34875): ``data``, its
    bytes, as UTF-8 text, unless that ends with U+FFFD (the token ends inside a character). Then,
    after the bytes of the sampled tokens ``before`` it (oldest first), the characters it completes,
    from where the first token of the unfinished ones began (``<0xF0> <0x9F> <0x98> <0x80>``:
    "", "", "", "😀"), or "" where it completes none. OpenAI writes such a token as
    ``bytes:\\xf0``; a client rebuilds the text from each entry's ``bytes`` (the chat's), which
    stay the token's own. Top alternatives read after the same sampled tokens."""
    own = data.decode("utf-8", "replace")
    if not own.endswith("\ufffd"):
        return own
    for k in range(1, min(len(before), CONTEXT_TOKENS) + 1):
        context = before[-k:]
        whole = b"".join([*context, data]).decode("utf-8", "replace")
        if whole.endswith("\ufffd"):
            continue
        # The context's last tokens that end inside a character had "" for their text: the
        # characters they began are this token's; the text before them is theirs.
        clean = k
        while clean and context[clean - 1].decode("utf-8", "replace").endswith("\ufffd"):
            clean -= 1
        prefix = b"".join(context[:clean]).decode("utf-8", "replace")
        return whole[len(os.path.commonprefix([prefix, whole])) :]
    return ""


class TokenText:
    """One token's bytes and its text as a logprobs entry shows it, for ``hf_tokenizer`` (a
    transformers tokenizer) over the model's ``vocab_size`` ids. llguidance's reading is built on
    first use; a tokenizer it cannot read (a slow one, a decoder it does not know) falls back to
    ``decode([id])``, as before it (logged once)."""

    def __init__(self, hf_tokenizer: Any, vocab_size: int) -> None:
        self._hf, self._vocab_size = hf_tokenizer, vocab_size
        added = getattr(hf_tokenizer, "added_tokens_decoder", {})
        self.special_ids = frozenset(i for i, t in added.items() if t.special)

    def prepare(self) -> TokenText:
        """Build what ``bytes_of`` and ``byte_piece`` read now: about 2 s for a 256k vocabulary,
        which the first logprobs request otherwise spent on the gateway's event loop, every
        stream there held meanwhile."""
        _ = self._tokenizer, self._byte_pieces
        return self

    @cached_property
    def _tokenizer(self) -> LLTokenizer | None:
        try:
            return llg_tokenizer(self._hf, self._vocab_size, [], slices=False)
        except Exception as e:  # noqa: BLE001 - llguidance's errors are plain ValueErrors and more
            logger.warning("logprobs show tokens as decode([id]) gives them", reason=str(e).splitlines()[0])
            return None

    def bytes_of(self, token_id: int) -> bytes:
        """The token's bytes: UTF-8, possibly part of a character; a special or added token's are
        its text; an id past the tokenizer's holds none."""
        if (tokenizer := self._tokenizer) is None:
            return str(self._hf.decode([token_id])).encode()
        if token_id >= len(self._hf):
            return b""
        data = tokenizer.decode_bytes([token_id])
        # llguidance marks its special tokens by a first byte 0xFF (never in UTF-8) and leaves the
        # mark out here, so a byte-level token of that byte alone came back empty.
        return data or (b"\xff" if tokenizer.is_special_token(token_id) else b"")

    def shown(self, token_id: int, skip_special_tokens: bool) -> bytes:
        """The bytes the token adds to the output text (none for a special token the text skips)."""
        return b"" if skip_special_tokens and token_id in self.special_ids else self.bytes_of(token_id)

    @cached_property
    def _byte_pieces(self) -> frozenset[int]:
        backend = getattr(self._hf, "backend_tokenizer", None)
        decoder = getattr(backend, "decoder", None)
        if decoder is None or b'"type":"ByteFallback"' not in decoder.__getstate__():  # its JSON
            return frozenset()
        return frozenset(i for piece, i in self._hf.get_vocab().items() if _BYTE_PIECE.fullmatch(piece))

    def byte_piece(self, token_id: int) -> bool:
        """Whether the token is a byte-fallback piece (Llama 2's, Mistral's ``<0xC3>``) its decoder
        joins with the byte pieces beside it: a run of them that is not UTF-8 is written one U+FFFD
        a byte, not one a maximal run as a byte-level BPE decoder (and Python) writes it."""
        return token_id in self._byte_pieces

    def offsets_in(self, text: str, ids: list[int]) -> list[int] | None:
        """Where each of ``ids`` begins in ``text`` (characters), by the tokenizer's own offset
        mapping, where ``text`` encodes to exactly ``ids`` (with or without the special tokens it
        adds around a text; one it adds takes no width, where the token before it ends); None
        where it does not, or the tokenizer keeps no offsets (a slow one)."""
        if not getattr(self._hf, "is_fast", False):
            return None
        for add_special_tokens in (True, False):
            encoded = self._hf(text, add_special_tokens=add_special_tokens, return_offsets_mapping=True)
            if encoded["input_ids"] == ids:
                out, end = [], 0
                for start, stop in encoded["offset_mapping"]:
                    out.append(start if stop > start else end)
                    end = max(end, stop)
                return out
        return None

    def text_of(self, token_id: int, before: Sequence[int] = ()) -> str:
        """The token's text in a logprobs entry after the sampled tokens ``before`` (a choice's
        output, or a prompt, so far; its last ``CONTEXT_TOKENS`` read only where the token ends
        inside a character, almost none does: each is a decode, for every top alternative too):
        ``token_string``."""
        data = self.bytes_of(token_id)
        if not data.decode("utf-8", "replace").endswith("\ufffd"):
            return token_string(data)
        return token_string(data, [self.bytes_of(t) for t in before[-CONTEXT_TOKENS:]])


class TokenIdText:
    """``tokens`` with each token written as vLLM's ``return_tokens_as_token_ids`` writes it in a
    logprobs entry, ``token_id:N`` (clients that read ids back need no tokenizer, and two tokens
    that spell the same never look alike); its bytes and what it shows in the text stay the token's."""

    def __init__(self, tokens: TokenText) -> None:
        self._tokens = tokens
        self.special_ids = tokens.special_ids

    def bytes_of(self, token_id: int) -> bytes:
        return self._tokens.bytes_of(token_id)

    def shown(self, token_id: int, skip_special_tokens: bool) -> bytes:
        return self._tokens.shown(token_id, skip_special_tokens)

    def byte_piece(self, token_id: int) -> bool:
        return self._tokens.byte_piece(token_id)

    def offsets_in(self, text: str, ids: list[int]) -> list[int] | None:
        return self._tokens.offsets_in(text, ids)

    def text_of(self, token_id: int, before: Sequence[int] = ()) -> str:
        return f"token_id:{token_id}"
