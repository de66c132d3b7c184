"""Public reports of KV caches left behind by a request aborted while its cache was on the way,
replayed against the receiving side of a move alone (``KVInbox``; its engine side, the blocks an
aborted moved request took, is ``tests/engine/test_migration_replays.py``'s)."""

from __future__ import annotations

import asyncio
import contextlib
import types

import pytest

from dlora.services.worker import kv_inbox
from dlora.services.worker.kv_inbox import KVInbox
from tests.unit.test_kv_inbox import shipment


async def test_a_cache_whose_request_is_aborted_on_the_way_is_dropped_and_its_late_chunks_swept(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """vllm-project/vllm #46283 (a decode-side request aborted in WAITING_FOR_REMOTE_KVS kept its
    blocks until a completion that never came), vllm-project/vllm-ascend #16662 (the completion of
    an aborted load filtered out: its blocks leaked for good) and ai-dynamo/dynamo PR #7489 (a
    client gone during the NIXL transfer leaked blocks until the prefill worker stopped answering).
    A moved request waits on arrival for its cache; its abort cancels that wait (``admit.abort``):
    what came of the cache goes at once, and the chunks still on the way, complete but claimed by
    nobody, go once stale, on a clock moved by hand (no chunk holds memory for longer)."""
    now = [0.0]
    monkeypatch.setattr(kv_inbox, "time", types.SimpleNamespace(monotonic=lambda: now[0]))
    inbox = KVInbox(wait_s=60.0, stale_s=20.0)
    _, parts = shipment("r", "move-1", tokens=4)
    inbox.put(parts[0])
    waiting = asyncio.create_task(inbox.take("r", "move-1"))
    await asyncio.sleep(0)  # it waits for the rest
    waiting.cancel()  # the abort
    with contextlib.suppress(asyncio.CancelledError):
        await waiting
    assert len(inbox) == 0
    for c in parts[1:]:  # the rest, come after the abort
        inbox.put(c)
    assert len(inbox) == 1
    now[0] = 19.0
    inbox.sweep()
    assert len(inbox) == 1  # not stale yet: a request that is slow to come looks no different
    now[0] = 21.0
    inbox.sweep()
    assert len(inbox) == 0
