"""A request arriving at the worker, the I/O the shell does for it: refused (aborted, fenced, its
client silent, its adapter missing, or unreadable here) with an answer, added to the engine with
the cache a move shipped, or handed back for another worker (and, at the reconcile, the records
of requests not held here). Functions of the running ``WorkerService``, as ``drain``'s are."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import msgspec
from nats.aio.msg import Msg

from dlora.common import bus, log, subjects
from dlora.common.lograte import RateLimiter
from dlora.common.messages import ErrorCode, GenerateRequest, LostRequests, TokenChunk
from dlora.common.seeds import with_seed
from dlora.common.undecodable import RequestHead, request_head
from dlora.common.versions import engine_key
from dlora.model.adapter_files import AdapterOverLimit
from dlora.model.config import same_model
from dlora.services.worker.adapters import AdapterChanged, AdapterNotFound, AdapterRead, AdapterRefused
from dlora.services.worker.chunks import (
    aborted_chunk,
    adapter_failure_chunk,
    error_chunk,
    open_stream,
    past_deadline,
    silent_client_chunk,
    unreadable_chunk,
)
from dlora.services.worker.commands import Add
from dlora.services.worker.engine import RequestError
from dlora.services.worker.engine.admission import OverContext
from dlora.services.worker.engine.kv_transfer import KVSnapshot
from dlora.services.worker.engine.lora import AdapterError
from dlora.services.worker.engine.structured import GrammarUnavailable
from dlora.services.worker.one_id import give_up, successor

if TYPE_CHECKING:
    from dlora.services.worker.main import WorkerService

logger = log.get("worker")
_adapter_failures = RateLimiter(burst=10, interval_s=10.0)  # (kind: message and adapter)


async def admit(w: WorkerService, add: Add) -> None:
    """Take the request ``add`` brings, prepared on arrival (``arrival``), into the engine (waiting
    there while its adapter is read: ``adapter_read`` ends it if the read fails), or answer why not
    (each answer ends its record)."""
    req = add.req
    if w.aborted_lately(req):  # its client left before it came, or aborted its id lately
        await w.records.end({req.request_id: req.recoveries})
        await w.delivery.publish(req.reply_to, aborted_chunk(req, req.next_seq, w.s.worker_id), req.client)
        return
    held = w.streams.get(req.request_id)
    if held is not None:
        if req.recoveries <= held.request.recoveries:
            logger.warning("request delivered twice; the copy is ignored", request=req.request_id)
            return
        # A later attempt of a request this worker still runs: it was given up here while the
        # worker stalled, and re-dispatched back to it. The later attempt replaces the copy.
        await w.drop(req.request_id, record=False)
    if await w.records.fenced_on_arrival(req):
        logger.warning("request sent before a stall came after it was given up; dropped", request=req.request_id)
        return
    # A resumed one (recovered or moved) past twice the TTL, as the dispatcher judged it: its
    # client may have been cut off by the fault that lost its worker, and reconnecting.
    silent_s = 2 * w.s.heartbeat_ttl_s if req.recoveries else None
    if req.client and w.clients.gone(req.client, time.monotonic(), silent_s):
        logger.warning("request of a silent client refused", request=req.request_id, client=req.client)
        await _answer(w, req, silent_client_chunk(req))
        return
    if (late := past_deadline(req, time.time())) is not None:
        await _answer(w, req, error_chunk(req, ErrorCode.UNAVAILABLE, late, w.s.worker_id))
        return
    if not same_model(req.model_digest, w.engine.model_digest):  # its token ids mean other text here
        reason = (
            f"worker {w.s.worker_id} serves another base model (digest {w.engine.model_digest}) than the one "
            f"this request was tokenized for ({req.model_digest}): the deployment mixes models"
        )
        await _answer(w, req, error_chunk(req, ErrorCode.INTERNAL, reason, w.s.worker_id))
        return
    req = with_seed(req)  # sent here directly, not through a dispatcher: moves still draw the same
    code, reason, param = ErrorCode.BAD_REQUEST, "", None
    try:
        req = await w.adapters.versioned(req)  # (their registry reads bounded: WorkerAdapters.bound)
        if req.adapter is not None:
            await w.adapters.ensure(req.adapter, req.adapter_version or "", registered=req.fresh_from_app)
        try:
            start = time.monotonic()
            _add_to_engine(w, req, add, add.kv)
            if add.kv is not None:  # what shipping this cache cost: the source's export, its wait and read
                # here (on arrival), and its import into the KV cache (a copy of all of it, in add_request)
                w.kv_seconds += req.kv_export_s + add.kv_wait_s + time.monotonic() - start
                w.kv_tokens += add.kv.tokens
        except RequestError as e:
            if add.kv is None:
                raise
            # the cache does not fit here, or not in this worker's precision: recompute instead
            logger.info("moved KV not taken; recomputed", request=req.request_id, reason=str(e))
            _add_to_engine(w, req, add, None)
        w.streams[req.request_id] = open_stream(req, time.monotonic() if add.arrived is None else add.arrived)
        return
    except AdapterNotFound as e:
        code, reason = ErrorCode.NOT_FOUND, str(e)
    except bus.STATE_OUTAGE as e:
        code, reason = ErrorCode.UNAVAILABLE, f"the state store (Redis) is unreachable ({type(e).__name__}); try again"
    except OverContext as e:
        # A text prompt is counted as one token by the dispatcher: one too long for this context
        # may fit a larger worker's, as the same prompt as ids would have been sent there (a review)
        if req.recorded and await _hand_back_once(w, req.request_id, req.recoveries):
            return
        reason, param = str(e), e.param
    except RequestError as e:
        reason, param = str(e), e.param
    except GrammarUnavailable as e:  # its compile could not be had here now (no thread, starved, killed): a 503
        # A resume that goes on (moved or recovered, its client reading its tokens so far): this
        # worker's state, not the request's, and another worker (or this one later) may compile it.
        # A 503 ended a stream already under way; once, as for OverContext: back again, it is answered.
        if req.resume_token_ids and req.recorded and await _hand_back_once(w, req.request_id, req.recoveries):
            return
        code, reason = ErrorCode.UNAVAILABLE, str(e)
    except AdapterError as e:
        await _adapter_failed(w, req, e)
        return
    await _answer(w, req, error_chunk(req, code, reason, w.s.worker_id, param=param))


async def abort(w: WorkerService, request_id: str, sender: str | None) -> None:
    """Stop a request held here, told so (``Abort``); remembered: an abort can overtake its request
    (not via a dispatcher)."""
    w.aborted.add(request_id, sender, time.monotonic())
    if (preparing := w.preparing.get(request_id)) is not None and w.aborted_lately(preparing.req):
        # still waiting on arrival (its cache, its grammar: minutes for some schemas): its wait
        # ends now, and admission answers it as any request its abort came before (the compile
        # goes on for any other request that shares it)
        w.preparing.pop(request_id).task.cancel()
        await w.commands.put(Add(preparing.req))
    stream = w.streams.get(request_id)
    if stream is not None and w.aborted_lately(stream.request):
        await w.drop(request_id)
        last = aborted_chunk(stream.request, stream.seq, w.s.worker_id)
        await w.delivery.publish(stream.reply_to, last, stream.request.client)


async def adapter_read(w: WorkerService, read: AdapterRead) -> None:
    """An adapter's read ended (between steps): installed, or the requests that waited for it out
    of the engine, each answered or handed back as a request refused for it on arrival."""
    if (e := w.adapters.settle(read)) is None:
        return
    waited = []
    for rid in [rid for rid, seq in w.engine.seqs.items() if seq.adapter == read.key]:
        # every one out before any is answered: an answer that fails (Redis down) left the rest
        # on an adapter neither held nor read, and the next step failed every request here (a review)
        w.engine.abort(rid)
        if (stream := w.streams.pop(rid, None)) is not None:
            waited.append(stream.request)
    for req in waited:
        try:
            await _adapter_failed(w, req, e)
        except Exception as x:  # noqa: BLE001 - its record outlives it: handed back at the next sweep
            logger.warning("request of a failed adapter read not answered", request=req.request_id, error=str(x))


async def _adapter_failed(w: WorkerService, req: GenerateRequest, e: AdapterError) -> None:
    # A version's files rewritten since (a trainer's, before it loads them again): a worker that
    # holds the version in memory serves it, as vLLM's one engine goes on with the old weights.
    # Files only this worker's limits refuse (a fleet of mixed settings): another may take them.
    # A resume (moved or recovered, its client reading its tokens so far) failed by this worker's
    # own read (an I/O error, its copy of the files damaged, an install that failed): another may
    # read them, where a 500 ended a stream under way. Once, as for GrammarUnavailable: back again
    # (none other took it), it is answered.
    changed = isinstance(e, AdapterChanged)
    handed = (
        (changed or isinstance(e, AdapterRefused) or bool(req.resume_token_ids))
        and req.recorded
        and await _hand_back_once(w, req.request_id, req.recoveries, elsewhere=changed)
    )
    what = "adapter version not loadable here; handed back" if handed else "adapter could not be loaded"
    # A line a request, and any client may ask again and again: bounded, with the count held back
    # (a helper's finding: 200 requests for a damaged adapter wrote 114 KB of log in 12 s).
    allowed, held_back = _adapter_failures.allow((what, req.adapter))
    if allowed:
        logger.warning(what, request=req.request_id, adapter=req.adapter, error=str(e), like_this_not_logged=held_back)
    if not handed:
        await _answer(w, req, adapter_failure_chunk(req, str(e), w.s.worker_id, isinstance(e, AdapterOverLimit)))


async def _answer(w: WorkerService, to: GenerateRequest | RequestHead, last: TokenChunk) -> None:
    """Refuse the request ``to`` (what it says of itself) with its ``last`` chunk, and end its
    record (if it names this attempt)."""
    await w.delivery.publish(to.reply_to, last, to.client)
    await w.records.end({last.request_id: last.recoveries})


def _add_to_engine(w: WorkerService, req: GenerateRequest, add: Add, kv: KVSnapshot | None) -> None:
    """``req`` (``add``'s, its seed and adapter version settled) into the engine with ``kv``."""
    adapter = engine_key(req.adapter, req.adapter_version or "") if req.adapter is not None else None
    w.engine.add_request(
        req.request_id,
        prompt=req.prompt,
        prompt_token_ids=req.prompt_token_ids,
        params=req.params,
        adapter=adapter,
        resume_token_ids=req.resume_token_ids,
        resume_text_pending=req.resume_text_pending,
        resume_text_held=req.resume_text_held,
        kv=kv,
        priority=req.priority,
        arrival_time=req.created or None,  # (a moved one is queued by it: ``fcfs_arrival``)
        cache_salt=req.cache_salt,
        bad_words_ids=add.bad_words_ids,
        whole=True,  # as the dispatcher checks token ids: a text prompt's length is first known here
        decoded=True,  # (its types checked as it was decoded)
        prompt_field="prompt" if add.text_prompt else None,
        grammar_unavailable=add.grammar_unavailable,  # (not compiled again here, on the loop)
    )


async def refuse_unreadable(w: WorkerService, msg: Msg, error: msgspec.DecodeError) -> None:
    """A request that does not decode here (in a rolling upgrade, a newer dispatcher's request
    with a field this worker lacks). The first time it is handed back at once, for a dispatcher
    to send to another worker, which may read it (waiting for the sweep cost 2 s); back again
    within ``HANDED_BACK_MEMORY_S`` (no other worker took it), its sender is told why (503) and its
    record ended, instead of being left to wait for its timeout."""
    if (head := request_head(msg.data)) is None or not subjects.publishable(head.reply_to):
        return
    if not await _hand_back_once(w, head.request_id, head.recoveries):
        await _answer(w, head, unreadable_chunk(head, str(error), w.s.worker_id))


async def _hand_back_once(w: WorkerService, request_id: str, recoveries: int, elsewhere: bool = False) -> bool:
    """Hand a request recorded as sent here back to the dispatchers, for another worker (only one
    holding its adapter's version, ``elsewhere``); False, doing nothing, when it was handed back
    within ``HANDED_BACK_MEMORY_S`` and came back anyway (it is to be answered)."""
    now = time.monotonic()
    if w.handed_back.get(request_id, now) is not None:
        return False
    w.handed_back.put(request_id, elsewhere, now)
    lost = LostRequests(
        worker=w.s.worker_id,
        requests={request_id: recoveries},
        never_arrived=[request_id],
        elsewhere=[request_id] if elsewhere else [],
    )
    await bus.publish(w.nc, subjects.LOST, lost)
    return True


async def hand_back_unheld(w: WorkerService, grace_s: float) -> None:
    """Hand back what the in-flight records say is here but is not (a previous incarnation's
    requests, or ones whose message never came, recorded ``grace_s`` ago at least) for a
    dispatcher to re-dispatch; a gateway's aborted one's record is ended instead."""
    lost, never_arrived = await w.store.sweep_inflight(
        w.s.worker_id, w.incarnation, set(w.streams) | w.pending, grace_s
    )
    # A gateway's abort only: the record does not say whose request it is, and an application
    # must not stop another's recovery.
    now = time.monotonic()
    if aborted := {rid: a for rid, a in lost.items() if w.aborted.lately(rid, None, now)}:
        await w.records.end(aborted)  # its record outlived it
    if lost := {rid: a for rid, a in lost.items() if rid not in aborted}:
        # Silent long enough to be replaced under its id, a process finds its successor's records
        # here (a helper's partition trial): they are the successor's, not a predecessor's.
        if (later := await successor(w.store, w.stats, w.s.heartbeat_ttl_s)) is not None:
            give_up(w, later, "nothing handed back")
            return
        logger.warning("in-flight records not held here; handed back", requests=len(lost))
        # One handed back lately for a worker holding its version, and not taken yet (the
        # dispatcher waits for the workers' next stats before it says none holds it), still needs one.
        now = time.monotonic()
        elsewhere = [rid for rid in lost if w.handed_back.get(rid, now)]
        handed = LostRequests(
            worker=w.s.worker_id, requests=lost, never_arrived=sorted(never_arrived & set(lost)), elsewhere=elsewhere
        )
        await bus.publish(w.nc, subjects.LOST, handed)
