"""What the worker's bus handlers hand to the task that owns the engine, applied between steps."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from dlora.common.messages import GenerateRequest
from dlora.services.worker.adapters import AdapterRead
from dlora.services.worker.engine.kv_transfer import KVSnapshot
from dlora.services.worker.moves import Move


@dataclass(frozen=True)
class Add:
    req: GenerateRequest
    # The token sequences of its ``bad_words``, tokenized on arrival (None: the engine tokenizes them).
    bad_words_ids: list[list[int]] | None = None
    # A moved request's shipped cache, taken from the inbox on arrival (None: none, or not in
    # time: recomputed), and the seconds it waited for it.
    kv: KVSnapshot | None = None
    kv_wait_s: float = 0.0
    text_prompt: bool = False  # its prompt came as text, tokenized on arrival: errors name ``prompt``
    # When it came (monotonic seconds; None: now): its queue time runs from there, its wait on arrival
    # (its grammar's compile, its prompt's tokenizing) in it, as vLLM's counts a wait for its grammar
    arrived: float | None = None
    # Why its grammar could not be had when compiled on arrival (None: it was, or none is needed):
    # answered so at admission, not compiled again on the loop (``Grammars.prepare``)
    grammar_unavailable: str | None = None


@dataclass(frozen=True)
class Abort:
    request_id: str
    # The application user that sent it (subjects.aborts_of): only its own requests stop. None: a
    # gateway's (subjects.ABORT), for any request.
    sender: str | None = None


@dataclass(frozen=True)
class AdapterChanged:
    name: str
    version: str | None  # registered now; None: removed


@dataclass(frozen=True)
class Prefetch:
    adapters: list[str]  # the placement's adapters for this worker


@dataclass(frozen=True)
class ResetPrefixCache:
    reply: str  # the subject to answer on with a PrefixCacheResetDone


Command = Add | Abort | AdapterChanged | Prefetch | Move | ResetPrefixCache | AdapterRead  # a read's end


class Commands(asyncio.Queue[Command]):
    """The commands for the task that owns the engine, with the requests of the ``Add``s among them
    (``queued``): taken in and prepared, not yet in the engine, so in no count the engine has. The
    stats count them waiting, with their work and KV (``snapshot.worker_stats``'s ``preparing``):
    those that came while a step ran were in no figure when the stats were read right after it
    (left by the last session)."""

    def __init__(self) -> None:
        super().__init__()
        self.queued: dict[str, GenerateRequest] = {}  # request id -> the request its latest Add brings

    def _put(self, item: Command) -> None:
        super()._put(item)
        if isinstance(item, Add):
            self.queued[item.req.request_id] = item.req

    def _get(self) -> Command:
        item = super()._get()
        # (a copy delivered twice is queued twice: the first taken leaves the later one counted)
        if isinstance(item, Add) and self.queued.get(item.req.request_id) is item.req:
            del self.queued[item.req.request_id]
        return item
