"""A request resumed (its worker stopped, its client reading its tokens so far) on a worker whose
read of its adapter fails there (an I/O error, its copy of the files damaged: neither files changed
since registration nor this worker's limits) is handed back once for another, as a resume whose
grammar cannot be had there is (admit.py), against a real dispatcher, NATS and Redis."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from dlora.model.config import ModelConfig
from dlora.services.gateway.admin import check_adapter
from dlora.services.gateway.replies import ReplyStream
from dlora.services.worker.main import WorkerService
from tests.integration import fencing_cluster
from tests.integration.fencing_cluster import PROMPT, SHORT, Cluster, resume_faulted
from tests.integration.test_gateway import offline

cluster = fencing_cluster.cluster  # the fixture, for pytest to find here

ADAPTER = "lora-0"


def _unreadable(workers: list[WorkerService], failed: list[str], times: int) -> None:
    """Fault injection: the first ``times`` adapter reads any of ``workers`` begins fail with an
    I/O error (as a disk's or a network file system's); each noted in ``failed`` with its worker."""
    for w in workers:
        read = w.engine.read_adapter

        def failing(key: str, path: str, w: WorkerService = w, read: Any = read) -> Any:
            if len(failed) < times:
                failed.append(w.s.worker_id)
                raise OSError(5, "Input/output error", path)
            return read(key, path)

        w.engine.read_adapter = failing  # type: ignore[method-assign]


async def _running(
    c: Cluster, others: tuple[str, ...]
) -> tuple[ReplyStream, asyncio.Queue[Any], Callable[[], None], list[WorkerService]]:
    """A request on ``ADAPTER`` (registered) running on w-a, handed over at its stop
    (``fencing_cluster.resumed``)."""
    path = str(c.tiny.adapters[ADAPTER])
    entry = check_adapter(ADAPTER, path, [str(c.tiny.adapters_dir)], "model", ModelConfig.from_dir(c.tiny.model))
    assert await c.store.put_adapter(entry)
    return await fencing_cluster.resumed(c, others, max_tokens=SHORT, adapter=ADAPTER)


async def test_a_resume_whose_adapter_one_worker_cannot_read_goes_on_on_another(cluster) -> None:  # type: ignore[no-untyped-def]
    """The worker the resume went to answered 500 for an I/O error of its own reading the adapter,
    ending a stream its client had been reading, while another worker could read the files.
    Handed back once, it goes on there, exactly as it would have run on: no token lost or repeated."""
    c: Cluster = await cluster(ttl_s=5.0)
    stream, failed = await resume_faulted(_running(c, ("w-b", "w-c")), _unreadable, times=1)
    assert stream.error is None, stream.error
    assert (stream.finish_reason, stream.tokens, len(failed)) == ("length", SHORT, 1)
    assert stream.attempt == 2  # w-a's hand-over, then the failing worker's hand-back
    request = {"id": "x", "prompt_token_ids": PROMPT, "max_tokens": SHORT, "ignore_eos": True, "adapter": ADAPTER}
    assert stream.text == offline(c.tiny, [request])[0]["text"]


async def test_a_resume_whose_adapter_no_worker_can_read_is_answered_after_one_hand_back(cluster) -> None:  # type: ignore[no-untyped-def]
    """Handed back once and sent to the same worker again (none other to take it), the resume is
    answered 500 with the reason, after the tokens its client had: not handed back for ever (and
    the files not read again: the failure is remembered there)."""
    c: Cluster = await cluster(ttl_s=5.0)
    stream, failed = await resume_faulted(_running(c, ("w-b",)), _unreadable, times=10)
    assert (stream.error_code, failed) == ("internal", ["w-b"])
    assert "Input/output error" in (stream.error or "") and 5 <= stream.tokens < SHORT
    assert stream.attempt == 2
