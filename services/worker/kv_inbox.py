"""The receiving side of a move that ships the KV cache: chunks of moved requests' caches as they
arrive, and the requests waiting for them. No engine, no bus: the worker feeds chunks in and asks
for a request's cache when the request itself comes."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

import torch

from dlora.common import log
from dlora.common.messages import KVChunk
from dlora.services.worker.engine.kv_transfer import KVSnapshot, checked_in
from dlora.services.worker.engine.outputs import RequestError

logger = log.get("worker")

# One shipment: the request it belongs to and the move's transfer id (``KVChunk.transfer``).
_Key = tuple[str, str]


@dataclass
class _Box:
    opened: float  # monotonic time of its first chunk
    parts: dict[int, bytes] = field(default_factory=dict)  # chunk index -> bytes


class KVInbox:
    """Moved caches by request id and shipment. A request waits ``wait_s`` for the rest of its
    cache, then recomputes instead; caches nobody claims for ``stale_s`` (their request never came,
    came too late, or gave up on them and their chunks kept coming) go at the next ``sweep``, or
    when the next cache starts to arrive; a refused request's go at once (``drop``). A request
    takes only its own move's shipment: the chunks of an earlier move of the same request, come
    late, are never read as its cache."""

    def __init__(self, wait_s: float = 5.0, stale_s: float = 20.0) -> None:
        self.wait_s, self.stale_s = wait_s, stale_s
        self._boxes: dict[_Key, _Box] = {}
        self._ready: dict[_Key, asyncio.Event] = {}

    def __len__(self) -> int:
        return len(self._boxes)

    def put(self, chunk: KVChunk) -> None:
        key = (chunk.request_id, chunk.transfer)
        box = self._boxes.get(key)
        if box is None:
            self.sweep()
            box = self._boxes[key] = _Box(time.monotonic())
        box.parts[chunk.index] = chunk.data
        if len(box.parts) == chunk.total:
            self._ready.setdefault(key, asyncio.Event()).set()

    async def take(self, request_id: str, transfer: str = "", dtype: torch.dtype | None = None) -> KVSnapshot | None:
        """The cache of ``request_id``'s shipment ``transfer`` once all its chunks are here, in
        ``dtype`` (``checked_in``) when one is given; None if they do not come in time, or their
        bytes are not a cache, or not finite in ``dtype`` (then it is recomputed). Read and
        checked on a thread: a cache can be a gigabyte."""
        key = (request_id, transfer)
        ready = self._ready.setdefault(key, asyncio.Event())
        try:
            async with asyncio.timeout(self.wait_s):
                await ready.wait()
        except TimeoutError:
            return None
        finally:
            box = self.drop(key)
        if box is None:  # swept as stale between its last chunk and this take
            return None
        try:
            return await asyncio.to_thread(_read, box, dtype)
        except RequestError as e:  # fine bytes, not in this worker's precision
            logger.info("moved KV not taken; recomputed", request=request_id, reason=str(e))
        except Exception as e:  # noqa: BLE001 - the sender's bytes, whatever they hold
            logger.warning("moved KV unreadable; recomputing", request=request_id, error=f"{type(e).__name__}: {e}")
        return None

    def sweep(self) -> None:
        """Drop the caches nobody claimed for ``stale_s``. The worker calls it between steps too:
        swept only when the next cache came, one whose request never came (its source died after
        sending it, or its chunks came after its refused request) stayed while no move came."""
        now = time.monotonic()
        for old in [k for k, b in self._boxes.items() if now - b.opened > self.stale_s]:
            self.drop(old)

    def drop(self, key: _Key) -> _Box | None:
        self._ready.pop(key, None)
        return self._boxes.pop(key, None)


def _read(box: _Box, dtype: torch.dtype | None) -> KVSnapshot:
    snapshot = KVSnapshot.from_bytes(b"".join(box.parts[i] for i in range(len(box.parts))))
    return snapshot if dtype is None else checked_in(snapshot, dtype)
