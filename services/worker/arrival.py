"""A request arriving at the worker: what it needs before the task that owns the engine takes it
up, prepared beside the steps. Its prompt tokenized and its ``bad_words`` (``Tokenized``), the
cache a move shipped ahead of it (``KVInbox``), its structured output's grammar compiled.

Awaited in the command loop, a moved request whose cache came late (chunks NATS dropped, a slow
link) held every stream on the worker for the inbox's wait (5 s), and a new 400 KB schema's
compile every stream for ~0.4 s; tokenized in the bus handler, a 1 MB text prompt (~1 s) held the
requests arriving after it. A request that must wait for any of these waits in a task of its own
(``WorkerService.preparing``): neither the steps nor the requests arriving after it wait with it.
A function of the running ``WorkerService``, as ``admit``'s are."""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import TYPE_CHECKING, NamedTuple

import msgspec

from dlora.common import log
from dlora.common.messages import GenerateRequest
from dlora.services.worker.commands import Add
from dlora.services.worker.engine.stopping import grammar_needed

if TYPE_CHECKING:
    from dlora.services.worker.main import WorkerService

logger = log.get("worker")

LONG_PROMPT = 65_536  # characters: a text prompt this long (~10 ms+ to tokenize) is tokenized beside the bus


class Preparing(NamedTuple):
    """A request waiting on arrival (``WorkerService.preparing``): its task, itself as it came,
    and when it came (monotonic seconds)."""

    task: asyncio.Task[None]
    req: GenerateRequest
    arrived: float


async def arrive(w: WorkerService, req: GenerateRequest) -> None:
    """Take ``req`` in from the bus: tokenized on threads (in the command loop a 1 MB prompt, ~1 s,
    held every stream), then handed to the loop (``Add``), at once or once what it waits for is
    here. An input the tokenizer refuses is left to the engine to refuse."""
    w.clients.noted(arrived := time.monotonic())  # a dispatcher reached us: not cut off (Clients.gone)
    if (earlier := w.preparing.get(req.request_id)) is not None:  # a copy of it waits on arrival
        if req.recoveries <= earlier.req.recoveries:  # as admission would: not run twice, nor an older attempt
            logger.warning("request delivered twice; the copy is ignored", request=req.request_id)
            if req.kv_chunks and req.kv_transfer != earlier.req.kv_transfer:
                w.kv_inbox.drop((req.request_id, req.kv_transfer))  # what came of its own cache
            return
        earlier.task.cancel()  # a later attempt replaces it, as admission would (left, a stop did not see it)
    w.pending.add(req.request_id)
    if req.recorded and not w.device_failed:  # after a device loss none is taken up (a trial)
        # marked before the loop works on it (``_take``); a stale copy does not unmark a later attempt's
        w.records.taken[req.request_id] = max(req.recoveries, w.records.taken.get(req.request_id, -1))
    text = req.prompt is not None and req.prompt_token_ids is None
    # A long prompt is tokenized beside the bus (~1 s for 1 MB: the requests arriving after it
    # waited for it, the handler taking them in order), once its record is marked taken (``_prepared``):
    # one that kills the process as it is tokenized is its death.
    long = text and len(req.prompt) >= LONG_PROMPT
    req, bad_words_ids = (req, None) if long else await _tokenized(w, req, text)
    if w.aborted_lately(req):  # its abort came first: answered now (admit), with nothing awaited for it
        if req.kv_chunks:
            w.kv_inbox.drop((req.request_id, req.kv_transfer))  # what came of its cache
    elif long or req.kv_chunks or _compiles(w, req):
        task = asyncio.create_task(_prepared(w, req, text, long, arrived))
        w.preparing[req.request_id] = Preparing(task, req, arrived)  # (its wait timed in the metrics)
        return
    await w.commands.put(Add(req, bad_words_ids, text_prompt=text, arrived=arrived))


async def _tokenized(
    w: WorkerService, req: GenerateRequest, text: bool
) -> tuple[GenerateRequest, list[list[int]] | None]:
    """``req`` with its text prompt's token ids, and its ``bad_words``' (None: the engine's to
    tokenize, and to refuse an input the tokenizer refuses)."""
    if text:
        with contextlib.suppress(Exception):
            tokens = await w.tokenized.prompt(req.prompt)
            req = msgspec.structs.replace(req, prompt=None, prompt_token_ids=tokens)
    bad_words_ids = None
    if req.params.bad_words:
        with contextlib.suppress(Exception):
            bad_words_ids = await w.tokenized.bad_words(req.params.bad_words)
    return req, bad_words_ids


async def _prepared(w: WorkerService, req: GenerateRequest, text: bool, tokenize: bool, arrived: float) -> None:
    """``req`` to the loop once tokenized (``tokenize``: a long text prompt), its shipped cache here
    (or not in time: then it is recomputed) and its grammar compiled (one that fails is refused at
    admission, saying why; one not to be had here now, without a second compile there); it
    ``arrived`` then (monotonic seconds)."""
    kv, waited, bad_words_ids, unavailable = None, 0.0, None, None
    # Its deadline bounds the wait, as ``upkeep.expire`` bounds one the loop holds: past it, the request
    # is refused at admission, saying so (a compile can take minutes, vLLM #54003).
    until = None if req.deadline is None else max(0.0, req.deadline - time.time())
    try:
        async with asyncio.timeout(until):
            # Marked taken first, as the loop marks what it received before it works on any: a compile,
            # a tokenization or a cache's read that kills the process is this request's death (on an
            # idle worker no command came to mark it, and a poison schema went round every worker uncounted).
            if not w.device_failed:  # (after a device loss none is taken up: see ``arrive``)
                await w.records.mark_taken()
            if tokenize:
                req, bad_words_ids = await _tokenized(w, req, text)
            if req.kv_chunks:
                start = time.monotonic()
                kv = await w.kv_inbox.take(req.request_id, req.kv_transfer, w.engine.model.kv.k.dtype)
                waited = time.monotonic() - start
                if kv is None:
                    logger.warning(
                        "moved KV not taken (late, unreadable or not finite here); recomputing", request=req.request_id
                    )
            if _compiles(w, req):
                refused = await w.engine.grammars.off_loop(w.engine.grammars.prepare, req.params)
                unavailable = None if refused is None else str(refused)
    except TimeoutError:
        logger.info("request's deadline passed while it was prepared", request=req.request_id)
    except Exception as e:  # noqa: BLE001 - the request goes on all the same: recomputed, or refused saying why
        logger.warning("request not prepared", request=req.request_id, error=f"{type(e).__name__}: {e}")
    finally:
        if (mine := w.preparing.get(req.request_id)) is not None and mine.task is asyncio.current_task():
            del w.preparing[req.request_id]
    add = Add(
        req, bad_words_ids, kv=kv, kv_wait_s=waited, text_prompt=text, arrived=arrived, grammar_unavailable=unavailable
    )
    await w.commands.put(add)


def _compiles(w: WorkerService, req: GenerateRequest) -> bool:
    """Whether ``req``'s grammar is compiled on arrival: by the engine's own rule
    (``grammar_needed``); a resume its last token ends gets none (a compile of seconds for no token)."""
    return grammar_needed(req.resume_token_ids, req.params, w.engine.eos_ids)


def stop_preparing(w: WorkerService) -> list[Preparing]:
    """The requests still being prepared, stopped: a stopping worker hands them back unrun (with
    when each came: their wait here is queue time)."""
    stopped = list(w.preparing.values())
    for preparing in stopped:
        preparing.task.cancel()  # (its cache's wait ends: the inbox drops what came of it)
    w.preparing.clear()
    return stopped
