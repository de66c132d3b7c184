"""The sending side of a move, the I/O the worker shell does for it (``moves`` is the pure part,
``kv_inbox`` the receiving side). A function of the running ``WorkerService``, as ``drain`` is."""

from __future__ import annotations

import asyncio
import functools
import time
from typing import TYPE_CHECKING

from dlora.common import bus, log, subjects
from dlora.common.inflight import Copy
from dlora.services.worker.chunks import Stream
from dlora.services.worker.moves import Move, TooLarge, handoff, too_large
from dlora.services.worker.stepping import deliver

if TYPE_CHECKING:
    from dlora.common.messages import GenerateRequest
    from dlora.services.worker.engine import LLMEngine
    from dlora.services.worker.main import WorkerService

logger = log.get("worker")


def queued(w: WorkerService, stream: Stream, scheduled_at: float | None) -> float:
    """Seconds the request has waited unscheduled, here and where it came from, while its client
    has no token yet: what its first chunk's queue time says wherever that is sent (0 after); a
    move and a stop's hand-over carry it on."""
    if stream.first_sent:
        return 0.0
    since = w.engine.clock() - scheduled_at if scheduled_at is not None else 0.0  # (the engine's clock)
    return waited(stream.request, stream.arrived, since)


def waited(req: GenerateRequest, arrived: float, scheduled_s: float = 0.0) -> float:
    """Seconds ``req`` has waited unscheduled: where it came from (``queued_s``) and here since
    ``arrived`` (monotonic seconds), less the ``scheduled_s`` it has run since its first step."""
    return req.queued_s + max(0.0, time.monotonic() - arrived - scheduled_s)


def exported(engine: LLMEngine, request_id: str) -> bytes | None:
    """The cache of ``request_id`` as it travels (``KVSnapshot.to_bytes``), None when it has none
    to ship (waiting, preempted, mid-prefill: recomputed where it goes). Blocking: a copy of the
    whole cache off the device, then one into bytes (an 8B model's 8k-token cache is ~1 GiB)."""
    kv = engine.export_kv(request_id)
    return None if kv is None else kv.to_bytes()


async def move_out(w: WorkerService, move: Move) -> None:
    """Hand a request to another worker at a step boundary (``moves.handoff``): its KV cache
    goes ahead in chunks when the plan ships it, else the destination recomputes from the
    tokens produced here; either way the client's chunks continue in sequence."""
    # A step in flight (async scheduling) holds its last token: it reaches the client first, so
    # the request moves with every token its client has and nothing else.
    if outputs := await asyncio.to_thread(w.engine.drain):
        await deliver(w, outputs)
    stream = w.streams.get(move.request_id)
    seq = w.engine.seqs.get(move.request_id)
    if stream is None or seq is None:
        return  # finished or gone meanwhile: nothing to move
    if seq.adapter in w.adapters.retired():  # planned from stats before it was (they now pin it here)
        logger.info("request on a replaced or removed adapter version; it stays here", request=move.request_id)
        return
    if w.records.outage:  # its record lacks what Redis refused: a resume from it would lose tokens
        if w.refusals.add(move, time.monotonic(), why="outage"):  # (its stats say so: free for the next plan)
            logger.info("Redis refuses progress writes; the request stays here", request=move.request_id)
        return
    resume = functools.partial(
        handoff,
        stream.request,
        seq.output_ids,
        seq.detok.pending,
        stream.seq,
        text_held=seq.text[seq.emitted :],  # held back while it could begin a stop string
        queued_s=queued(w, stream, seq.scheduled_at),
    )
    resumed, chunks = resume(None, 0.0)
    # Checked before the cache is exported (a copy off the device, thrown away when refused): with
    # the cache, the message has only a chunk count, a transfer id and its export time more.
    if over := too_large(resumed, w.nc.max_payload):  # grown past NATS's payload limit
        # (then pinned here where it only grows: once too large for good, it is planned no more)
        if w.refusals.add(move, time.monotonic(), why=over.value, oversized=over is TooLarge.WHILE_HERE):
            logger.warning("request too large to move; it stays here", request=move.request_id, by=over.value)
        return
    data: bytes | None = None
    start = time.monotonic()
    # On a thread, as ``drain`` above (the loop owns the engine and waits here: no step runs
    # meanwhile): the copy off the device and the bytes made of it are the size of the cache, and
    # on the event loop they held the worker's beats, stats, arrivals, aborts and the chunks of
    # caches coming in as long (the receiving side reads and checks a cache off the loop alike).
    if move.ship_kv and (data := await asyncio.to_thread(exported, w.engine, move.request_id)) is not None:
        resumed, chunks = resume(data, time.monotonic() - start)
    copy = Copy.of(stream.request, w.records.stalled())
    try:
        fenced = await w.store.fenced(w.s.worker_id, {move.request_id: copy})
        if not fenced:  # recorded at the destination first: what it writes then is its own, not fenced
            await w.store.put_inflight(resumed, move.to_worker, marks_taken=move.to_marks_taken)
    except bus.STATE_OUTAGE:  # (it was stopped here first, and lost: nothing recorded it elsewhere)
        if w.refusals.add(move, time.monotonic(), why="unreachable"):
            logger.info("Redis unreachable; the request stays here", request=move.request_id)
        return
    w.engine.abort(move.request_id)
    del w.streams[move.request_id]
    w.refusals.left(move.request_id)  # (back here later, a refusal of it is news however soon)
    if fenced:
        return  # given up here meanwhile (this worker stalled): a later attempt serves it
    w.metrics.moved(len(data) if data is not None else None, move.trigger)
    if seq.adapter is not None:  # its version stays here a while, should the destination hand it back
        w.adapters.moved(seq.adapter)
    for chunk in chunks:
        await bus.publish(w.nc, subjects.kv_transfer(move.to_worker, move.request_id), chunk, msgpack=True)
    await bus.publish(w.nc, subjects.worker_requests(move.to_worker), resumed)
    logger.info(
        "request moved",
        request=move.request_id,
        to=move.to_worker,
        tokens=len(seq.output_ids),
        kv_bytes=len(data or b""),
    )
