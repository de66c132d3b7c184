"""The tokenizer's work for arriving requests: on threads beside the engine's steps, and once per
distinct input among the requests lately arrived.

A request with ``n`` choices reaches the worker as ``n`` requests with the same prompt and
parameters; tokenized each in turn in the command loop, 128 choices of a request with 256
``bad_words`` of 1 KB (within the gateway's limits) held every stream on the worker for ~60 s
(a user's trial). Here the choices share one tokenization, waited for by each (one task per
input; the newest ``keep`` inputs kept, and no more than ``keep_chars`` characters of them: a
1 MB prompt's ids are ~9 MB of Python ints), while the loop serves the rest.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Any

from dlora.services.worker.engine.bad_words import bad_words_token_ids


class Tokenized:
    def __init__(self, tokenizer: Any, keep: int = 32, keep_chars: int = 4 << 20) -> None:
        self.tokenizer = tokenizer
        self.keep, self.keep_chars = keep, keep_chars
        self._tasks: OrderedDict[Hashable, tuple[asyncio.Future[Any], int]] = OrderedDict()  # and its chars
        self._chars = 0

    async def prompt(self, text: str) -> list[int]:
        """``text``'s token ids, as the engine encodes a prompt."""
        return await self._once(("prompt", text), len(text), lambda: list(self.tokenizer.encode(text)))

    async def bad_words(self, words: list[str]) -> list[list[int]]:
        """The token sequences ``words`` forbid (``bad_words_token_ids``)."""
        chars = sum(map(len, words))
        return await self._once(("bad_words", tuple(words)), chars, lambda: bad_words_token_ids(self.tokenizer, words))

    async def _once(self, key: Hashable, chars: int, work: Callable[[], Any]) -> Any:
        if key in self._tasks:
            self._tasks.move_to_end(key)
            task = self._tasks[key][0]
        else:
            task = asyncio.ensure_future(asyncio.to_thread(work))
            self._tasks[key] = task, chars
            self._chars += chars
            while len(self._tasks) > 1 and (len(self._tasks) > self.keep or self._chars > self.keep_chars):
                self._chars -= self._tasks.popitem(last=False)[1][1]
        # Shielded: one awaiter cancelled (its client left) does not cancel the others' tokenization.
        return await asyncio.shield(task)
