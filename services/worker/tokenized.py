"""The tokenizer's work for arriving requests: on threads beside the engine's steps, and once per
distinct input among the requests lately arrived.

A request with ``n`` choices reaches the worker as ``n`` requests with the same prompt and
parameters; tokenized each in turn in the command loop, 128 choices of a request with 256
``bad_words`` of 1 KB (within the gateway's limits) held every stream on the worker for ~60 s
(a user's trial). Here the choices share one tokenization, waited for by each (one task per
input, the newest ``keep`` inputs kept), while the loop serves the rest.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Any

from dlora.services.worker.engine.bad_words import bad_words_token_ids


class Tokenized:
    def __init__(self, tokenizer: Any, keep: int = 32) -> None:
        self.tokenizer = tokenizer
        self.keep = keep
        self._tasks: OrderedDict[Hashable, asyncio.Future[Any]] = OrderedDict()

    async def prompt(self, text: str) -> list[int]:
        """``text``'s token ids, as the engine encodes a prompt."""
        return await self._once(("prompt", text), lambda: list(self.tokenizer.encode(text)))

    async def bad_words(self, words: list[str]) -> list[list[int]]:
        """The token sequences ``words`` forbid (``bad_words_token_ids``)."""
        return await self._once(("bad_words", tuple(words)), lambda: bad_words_token_ids(self.tokenizer, words))

    async def _once(self, key: Hashable, work: Callable[[], Any]) -> Any:
        task = self._tasks.get(key)
        if task is None:
            task = self._tasks[key] = asyncio.ensure_future(asyncio.to_thread(work))
            while len(self._tasks) > self.keep:
                self._tasks.popitem(last=False)
        else:
            self._tasks.move_to_end(key)
        # Shielded: one awaiter cancelled (its client left) does not cancel the others' tokenization.
        return await asyncio.shield(task)
