"""A step of the engine, run off the worker's loop, and what it produced: each request's chunk
sent to its client, then its progress recorded (and the copies fenced meanwhile dropped). Functions
of the running ``WorkerService``, as ``admit``'s are."""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import TYPE_CHECKING

from dlora.common import log
from dlora.common.inflight import Copy, Sent
from dlora.common.messages import FinishReason
from dlora.services.worker.chunks import chunk_for
from dlora.services.worker.engine.faults import raise_if_lost
from dlora.services.worker.engine.outputs import RequestOutput

if TYPE_CHECKING:
    from dlora.services.worker.main import WorkerService

logger = log.get("worker")


async def step(w: WorkerService) -> None:
    """One step of the engine, on a thread; what it produced (or, where it failed, each request
    it held, failed saying why) to the clients (``deliver``). ``DeviceLost`` raised."""
    st = w.engine.stats
    started, steps, before = time.monotonic(), st.steps, (st.step_seconds, st.switch_and_load_seconds())
    try:
        outputs = await asyncio.to_thread(w.engine.step)
        if st.steps == steps:  # nothing could run: no step to time
            w.cycles.idle()
        else:
            switched = st.switch_and_load_seconds() != before[1]
            w.cycles.stepped(started, st.last_batch, st.last_prefill, st.step_seconds - before[0], switched)
    except Exception as e:
        raise_if_lost(e)  # the device is gone for good: out of the loop (``run_loop``)
        # engine cannot say whose it is, so its requests fail with the reason and the worker serves on
        logger.exception("step failed", error=str(e))
        w.cycles.idle()
        outputs = w.engine.fail_all(f"the worker's step failed: {type(e).__name__}: {e}")
    await deliver(w, outputs)


async def deliver(w: WorkerService, outputs: list[RequestOutput]) -> None:
    """Send what the engine produced to the clients (each request's chunk), then record it."""
    now = time.monotonic()
    chunks = [  # of the requests not aborted while the step ran
        (out, s, chunk_for(out, s, w.s.worker_id, now)) for out in outputs if (s := w.streams.get(out.request_id))
    ]
    # Asked as late as can be (for every request held, waiting ones too): the chunks go to NATS
    # right after, written at the flush below with no other wait between. A stall (SIGSTOP) after
    # it puts out chunks of a copy given up on meanwhile (readers drop them by attempt).
    if w.records.stalled():
        await _drop_fenced(w)
    sent: dict[str, Sent] = {}
    for out, stream, chunk in chunks:
        if out.request_id not in w.streams:  # fenced just now
            continue
        # Recorded only if handed to NATS: the record says what a resume need not send again.
        if await w.delivery.publish(stream.reply_to, chunk, stream.request.client):
            seq = w.engine.seqs.get(out.request_id)
            held = (seq.detok.pending, seq.text[seq.emitted :]) if seq else (0, "")
            sent[out.request_id] = Sent(stream.request.recoveries, chunk.seq, out.new_token_ids, *held)
        if out.finished:
            del w.streams[out.request_id]
            if out.error is None:
                w.lengths.observe(out.num_output_tokens, cut_off=out.finish_reason == FinishReason.LENGTH)
    # Flush before the Redis bookkeeping: nats-py's flusher sends them ~1 ms later (p50 2.9 ms, not 1.9).
    # One round trip, not bus.flush's two: this one is for latency, and its flusher has written the
    # chunks to the socket before the PONG can come.
    with contextlib.suppress(Exception):  # NATS down: they go out on reconnect (and are re-sent)
        await w.nc.flush(timeout=1)
    running = {rid: v for rid, v in sent.items() if rid in w.streams}
    # Finished requests' records go with this write (or a later one): left, they would run again.
    w.records.unrecorded_ends |= {rid: s.attempt for rid, s in sent.items() if rid not in w.streams}
    # Fenced: given up here and re-dispatched, another attempt serves it.
    for rid in await w.records.write_step(running) & running.keys():
        logger.warning("request fenced: a later attempt serves it", request=rid)
        await w.drop(rid, record=False, attempt=running[rid].attempt)


async def _drop_fenced(w: WorkerService) -> None:
    """Drop the copies held here that are fenced (a recorded one's record gone too), after a stall."""
    copies = {rid: Copy.of(s.request, stalled=True) for rid, s in w.streams.items()}
    for rid in await w.records.fenced_after_stall(copies):
        logger.warning("request fenced after a stall: a later attempt serves it", request=rid)
        await w.drop(rid, record=False, attempt=copies[rid].attempt)
