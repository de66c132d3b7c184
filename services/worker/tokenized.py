"""The tokenizer's work for arriving requests (and their grammars' compiles): on threads beside the
engine's steps, and once per distinct input among the requests lately arrived.

A request with ``n`` choices reaches the worker as ``n`` requests with the same prompt and
parameters; tokenized each in turn in the command loop, 128 choices of a request with 256
``bad_words`` of 1 KB (within the gateway's limits) held every stream on the worker for ~60 s
(a user's trial). Here the choices share one tokenization, waited for by each (one task per
input; the newest ``keep`` inputs kept, and no more than ``keep_chars`` characters of them: a
1 MB prompt's ids are ~9 MB of Python ints), while the loop serves the rest.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import os
from collections import OrderedDict
from collections.abc import Callable, Hashable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from dlora.common.sampling import SamplingParams
from dlora.services.worker.engine.bad_words import bad_words_token_ids
from dlora.services.worker.engine.structured import Grammars

# Threads of their own for grammar compiles, as vLLM's StructuredOutputManager keeps: on asyncio's
# default pool (the engine's steps' too: ``asyncio.to_thread``) a few distinct schemas compiling at
# once (its 6 threads on 2 cores) held every step until one ended, minutes for some schemas.
_COMPILE_THREADS = max(1, min((os.cpu_count() or 2) // 2, 8))


class Tokenized:
    def __init__(self, tokenizer: Any, keep: int = 32, keep_chars: int = 4 << 20) -> None:
        self.tokenizer = tokenizer
        self.keep, self.keep_chars = keep, keep_chars
        self._tasks: OrderedDict[Hashable, tuple[asyncio.Future[Any], int]] = OrderedDict()  # and its chars
        self._chars = 0
        self._compiles: ThreadPoolExecutor | None = None  # made on the first compile

    async def prompt(self, text: str) -> list[int]:
        """``text``'s token ids, as the engine encodes a prompt."""
        return await self._once(("prompt", text), len(text), lambda: list(self.tokenizer.encode(text)))

    async def bad_words(self, words: list[str]) -> list[list[int]]:
        """The token sequences ``words`` forbid (``bad_words_token_ids``)."""
        chars = sum(map(len, words))
        return await self._once(("bad_words", tuple(words)), chars, lambda: bad_words_token_ids(self.tokenizer, words))

    async def grammar(self, grammars: Grammars, params: SamplingParams) -> None:
        """The grammar of the structured output ``params`` asks for compiled (``Grammars.prepare``:
        0.3-0.5 s for a 400 KB schema), once for the choices of a request and those like it."""
        asked = (params.json_schema, params.regex, tuple(params.choice), params.grammar)
        chars = sum(len(a) for a in (params.json_schema, params.regex, params.grammar, *params.choice) if a)
        if self._compiles is None:
            self._compiles = ThreadPoolExecutor(_COMPILE_THREADS, thread_name_prefix="grammar")
        await self._once(("grammar", *asked), chars, lambda: grammars.prepare(params), self._compiles)

    async def _once(
        self, key: Hashable, chars: int, work: Callable[[], Any], pool: ThreadPoolExecutor | None = None
    ) -> Any:
        """``work``'s result, on a thread (of ``pool``; None: asyncio's default), once per ``key``."""
        if key in self._tasks:
            self._tasks.move_to_end(key)
            task = self._tasks[key][0]
        else:
            in_context = functools.partial(contextvars.copy_context().run, work)  # (the log's, as to_thread)
            task = asyncio.get_running_loop().run_in_executor(pool, in_context)
            self._tasks[key] = task, chars
            self._chars += chars
            while len(self._tasks) > 1 and (len(self._tasks) > self.keep or self._chars > self.keep_chars):
                self._chars -= self._tasks.popitem(last=False)[1][1]
        # Shielded: one awaiter cancelled (its client left) does not cancel the others' tokenization.
        return await asyncio.shield(task)
