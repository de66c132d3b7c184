"""vLLM's bad_words: tokenized as vLLM tokenizes them, and what they forbid after an output."""

from __future__ import annotations

from pathlib import Path

import pytest
from transformers import AutoTokenizer

from dlora.model.make_tiny import make_tokenizer
from dlora.services.worker.engine.bad_words import bad_words_token_ids, banned_now


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory):
    out: Path = tmp_path_factory.mktemp("tok")
    make_tokenizer(out, vocab_size=400, seed=0)
    return AutoTokenizer.from_pretrained(out)


def test_a_word_is_forbidden_alone_and_after_a_space_as_vllm_tokenizes_it(tokenizer) -> None:
    """vLLM's _init_bad_words: the word alone, and after a space when that spells it with other
    tokens of the same count; leading spaces of the word itself are dropped first."""
    for word in ("kalo", " remi", "nevo rida"):
        alone = tokenizer.encode(word.lstrip(), add_special_tokens=False)
        spaced = tokenizer.encode(" " + word.lstrip(), add_special_tokens=False)
        expected = [alone] + ([spaced] if spaced[0] != alone[0] and len(spaced) == len(alone) else [])
        assert bad_words_token_ids(tokenizer, [word]) == expected


def test_a_word_s_last_token_is_banned_only_after_the_rest_of_it() -> None:
    words = [[7], [1, 2, 3], [4, 5]]
    assert banned_now(words, []) == [7]
    assert banned_now(words, [9, 1, 2]) == [7, 3]
    assert banned_now(words, [1, 2, 9]) == [7]
    assert banned_now(words, [4]) == [7, 5]
    assert banned_now(words, [2]) == [7]  # the output too short for the three-token word's rest
