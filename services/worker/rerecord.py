"""The in-flight records of the requests a worker holds, written again after Redis lost its data
(a restart without persistence, a flush): progress writes update records that exist only, so
without this a later death of the worker, or its drain, handed back requests no record named
and they were lost; and a gateway could no longer tell their worker stepping from one gone. A
function of the running ``WorkerService``, as ``drain`` and ``move_out`` are."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

from dlora.common import log
from dlora.services.worker.moves import handoff
from dlora.services.worker.stepping import deliver

if TYPE_CHECKING:
    from dlora.services.worker.main import WorkerService

logger = log.get("worker")


async def record_again_if_lost(w: WorkerService, timeout_s: float) -> None:
    """Between steps, now and then: when Redis holds other data than at the last look (its
    ``data_epoch`` token, read within ``timeout_s``, made anew), write the records of the requests
    held here again (not bounded: cut off, a step's chunks it delivers would go unrecorded).

    Raises:
        What Redis raises, TimeoutError (an outage: looked at again next time).
    """
    async with asyncio.timeout(timeout_s):
        epoch = await w.store.data_epoch()
    if w.data_epoch is not None and epoch != w.data_epoch:
        await record_again(w)
    w.data_epoch = epoch


async def record_again(w: WorkerService) -> None:
    """Each running request's record as a move writes it at its destination (``handoff``): the
    request resumed after the tokens its client has, its next chunk's number, the text held back;
    a record written meanwhile (another attempt's) is left as it is."""
    # A step in flight (async scheduling) holds its last token: to the client first, as a move does.
    if outputs := await asyncio.to_thread(w.engine.drain):
        await deliver(w, outputs)
    written = 0
    for rid, stream in list(w.streams.items()):
        if (seq := w.engine.seqs.get(rid)) is None:
            continue
        held = seq.text[seq.emitted :]
        resumed, _ = handoff(stream.request, seq.output_ids, seq.detok.pending, stream.seq, None, 0.0, held)
        written += await w.store.put_inflight(
            resumed, w.s.worker_id, new=True, incarnation=w.incarnation, marks_taken=True
        )
    logger.warning("Redis lost its data: the in-flight records of the requests here written again", requests=written)
