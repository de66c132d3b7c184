"""The receiving side of a move that ships the KV cache: chunks of moved requests' caches as they
arrive, and the requests waiting for them. No engine, no bus: the worker feeds chunks in and asks
for a request's cache when the request itself comes."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

from dlora.common.messages import KVChunk
from dlora.services.worker.engine.kv_transfer import KVSnapshot


@dataclass
class _Box:
    opened: float  # monotonic time of its first chunk
    parts: dict[int, bytes] = field(default_factory=dict)  # chunk index -> bytes


class KVInbox:
    """Moved caches by request id. A request waits ``wait_s`` for the rest of its cache, then
    recomputes instead; caches nobody claims for ``stale_s`` (their request never came, was refused,
    or came too late) go when the next cache starts to arrive."""

    def __init__(self, wait_s: float = 5.0, stale_s: float = 20.0) -> None:
        self.wait_s, self.stale_s = wait_s, stale_s
        self._boxes: dict[str, _Box] = {}
        self._ready: dict[str, asyncio.Event] = {}

    def __len__(self) -> int:
        return len(self._boxes)

    def put(self, chunk: KVChunk) -> None:
        box = self._boxes.get(chunk.request_id)
        if box is None:
            now = time.monotonic()
            for rid in [rid for rid, b in self._boxes.items() if now - b.opened > self.stale_s]:
                self._drop(rid)
            box = self._boxes[chunk.request_id] = _Box(now)
        box.parts[chunk.index] = chunk.data
        if len(box.parts) == chunk.total:
            self._ready.setdefault(chunk.request_id, asyncio.Event()).set()

    async def take(self, request_id: str) -> KVSnapshot | None:
        """The request's cache once all its chunks are here; None if they do not come in time."""
        ready = self._ready.setdefault(request_id, asyncio.Event())
        try:
            async with asyncio.timeout(self.wait_s):
                await ready.wait()
        except TimeoutError:
            return None
        finally:
            box = self._drop(request_id)
        if box is None:  # swept as stale between its last chunk and this take
            return None
        return KVSnapshot.from_bytes(b"".join(box.parts[i] for i in range(len(box.parts))))

    def _drop(self, request_id: str) -> _Box | None:
        self._ready.pop(request_id, None)
        return self._boxes.pop(request_id, None)
