"""The worker tokenizes an arriving request's prompt and bad_words on a thread, once for all the
choices of an n > 1 request that arrive together (each its own request at the worker)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
from transformers import AutoTokenizer

from dlora.model.make_tiny import make_tokenizer
from dlora.services.worker.engine.bad_words import bad_words_token_ids
from dlora.services.worker.tokenized import Tokenized


class Counting:
    """The real tokenizer, its encode calls counted."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer, self.calls = tokenizer, 0

    def encode(self, *args: Any, **kwargs: Any) -> list[int]:
        self.calls += 1
        return self.tokenizer.encode(*args, **kwargs)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory) -> Any:
    out: Path = tmp_path_factory.mktemp("tok")
    make_tokenizer(out, vocab_size=400, seed=0)
    return AutoTokenizer.from_pretrained(out)


def test_the_choices_of_one_request_share_one_tokenization(tokenizer: Any) -> None:
    words = ["kalo", " remi", "nevo rida"]
    counting = Counting(tokenizer)

    async def run() -> None:
        tokenized = Tokenized(counting)
        got = await asyncio.gather(*(tokenized.bad_words(list(words)) for _ in range(32)))
        assert all(g == bad_words_token_ids(tokenizer, words) for g in got)
        assert counting.calls == 2 * len(words)  # each word alone and after a space, once
        prompts = await asyncio.gather(*(tokenized.prompt("kalo remi") for _ in range(32)))
        assert prompts == [tokenizer.encode("kalo remi")] * 32
        assert counting.calls == 2 * len(words) + 1

    asyncio.run(run())


def test_the_newest_inputs_are_kept_and_a_client_leaving_stops_nobody_elses(tokenizer: Any) -> None:
    counting = Counting(tokenizer)

    async def run() -> None:
        tokenized = Tokenized(counting, keep=2)
        for text in ("a", "b", "c", "c", "a"):  # "a" was the oldest of three: tokenized again
            await tokenized.prompt(text)
        assert counting.calls == 4
        by_chars = Tokenized(counting, keep_chars=10)
        for text in ("kalo remi", "x", "kalo remi", "nevo rida", "x"):  # 9 + 1 fit; 9 more does not
            await by_chars.prompt(text)
        assert counting.calls == 4 + 4  # "x" went with the 19th character
        left = asyncio.ensure_future(tokenized.prompt("remi kalo"))
        stays = asyncio.ensure_future(tokenized.prompt("remi kalo"))
        await asyncio.sleep(0)
        left.cancel()
        assert await stays == tokenizer.encode("remi kalo")

    asyncio.run(run())
