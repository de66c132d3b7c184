"""Per-request bookkeeping of the worker shell: where chunks go and what number comes next. Pure."""

from __future__ import annotations

import re
from collections import deque
from collections.abc import Collection
from dataclasses import dataclass

from dlora.common import subjects
from dlora.common.messages import ErrorCode, FinishReason, GenerateRequest, TokenChunk, Usage, error_text
from dlora.common.undecodable import RequestHead
from dlora.services.worker.engine import RequestOutput


@dataclass
class Stream:
    request: GenerateRequest  # as received: a move resumes from it
    reply_to: str
    seq: int  # number of the next chunk
    arrived: float  # monotonic seconds at the worker
    first_sent: bool = False


def open_stream(req: GenerateRequest, now: float) -> Stream:
    return Stream(request=req, reply_to=req.reply_to, seq=req.next_seq, arrived=now)


def chunk_for(out: RequestOutput, stream: Stream, worker: str, now: float) -> TokenChunk:
    """The chunk for one step's output; advances the stream's sequence number. A failed request's
    output becomes its error chunk, with the reason: the request's own fault (BAD_REQUEST) as it
    is, with the field at fault, as a refusal at admission reads; the server's naming the worker."""
    if out.error is not None:
        own = out.error_code is ErrorCode.BAD_REQUEST
        reason = out.error if own else f"the request failed on worker {worker}: {out.error}"
        code = out.error_code or ErrorCode.INTERNAL
        return error_chunk(stream.request, code, reason, worker, seq=stream.seq, param=out.error_param)
    queue_seconds = prompt_cached = prefill_seconds = None
    if not stream.first_sent:
        stream.first_sent = True
        prefill_seconds = out.scheduled_s
        # until its first step was scheduled, not its prefill after (vLLM's queue time; a helper
        # found a 29-step chunked prefill counted as 96 % of the time to first token)
        waited = max(0.0, now - stream.arrived - (out.scheduled_s or 0.0))
        queue_seconds = stream.request.queued_s + waited  # (with its wait where it was moved from)
        if not stream.request.continued:  # a moved or recovered request's prompt was prefilled before
            prompt_cached = out.num_cached_tokens
    chunk = TokenChunk(
        request_id=out.request_id,
        seq=stream.seq,
        token_ids=out.new_token_ids,
        text=out.new_text,
        finish_reason=out.finish_reason,
        stop_reason=out.stop_reason,
        usage=Usage(
            prompt_tokens=out.num_prompt_tokens,
            completion_tokens=out.num_output_tokens,
            cached_tokens=out.num_cached_tokens,
        )
        if out.finished
        else None,
        worker=worker,
        queue_seconds=queue_seconds,
        prefill_seconds=prefill_seconds,
        prompt_cached_tokens=prompt_cached,
        logprobs=out.logprobs or [],
        prompt_logprobs=out.prompt_logprobs or [],
        recoveries=stream.request.recoveries,
    )
    stream.seq += 1
    return chunk


def error_chunk(
    req: GenerateRequest, code: ErrorCode, reason: str, worker: str, seq: int | None = None, param: str | None = None
) -> TokenChunk:
    """A failed request's last chunk: numbered ``seq`` (default: the request's next), ``param`` the
    request's field at fault (a BAD_REQUEST's, where it is one)."""
    return TokenChunk(
        request_id=req.request_id,
        seq=req.next_seq if seq is None else seq,
        error=error_text(reason),
        error_code=code,
        param=param,
        worker=worker,
        finish_reason=FinishReason.ERROR,
        recoveries=req.recoveries,
    )


# An absolute path in an error's text: from a slash not inside a word up to a quote, space,
# bracket or comma. Adapter paths are stored resolved and absolute, so a usual one goes whole; one
# with a space, quote or comma in a directory's name leaves its tail.
_PATH = re.compile(r"(?<![\w.~])/[^\s'\"(),]+")


def adapter_failure_chunk(req: GenerateRequest, error: str, worker: str, over_limit: bool = False) -> TokenChunk:
    """The answer to a request whose adapter could not be loaded here (its files unreadable, not
    what was registered, or invalid): the server's fault, not the request's (500, as OpenAI's
    ``server_error``), and the files' paths left out (the worker logs them): a tenant may not see
    where adapters live, as ``/v1/models`` shows paths to admin callers only. ``over_limit``: the
    adapter's own rank or scaling is past this worker's limit (and no other took it), which is the
    request's adapter against the serving limit: a 400 naming it, as vLLM answers a LoRA above
    ``--max-lora-rank``, its ``param`` the request's field that named the adapter (``model``, as
    OpenAI's errors name the field at fault)."""
    reason = f"adapter {req.adapter!r} could not be loaded on worker {worker}: {_PATH.sub('<path>', error)}"
    if over_limit:
        return error_chunk(req, ErrorCode.BAD_REQUEST, reason, worker, param="model")
    return error_chunk(req, ErrorCode.INTERNAL, reason, worker)


def unreadable_chunk(head: RequestHead, error: str, worker: str) -> TokenChunk:
    """The answer to a request this worker cannot read though it came through a dispatcher, and
    that came back after it was handed back: in a rolling upgrade a newer dispatcher or gateway
    sends fields older workers lack. 503: the request may be fine, and a worker upgraded may take it."""
    return TokenChunk(
        request_id=head.request_id,
        seq=head.next_seq,
        error=error_text(
            f"worker {worker} cannot read this request ({error}); it may run an older dlora than the "
            "service that sent it (a rolling upgrade): try again"
        ),
        error_code=ErrorCode.UNAVAILABLE,
        worker=worker,
        finish_reason=FinishReason.ERROR,
        recoveries=head.recoveries,
    )


class Resend:
    """The chunks published in the last ``window_s`` seconds, to publish again after the worker's
    NATS connection came back: what it sent while the server was restarting, or just before,
    may never have reached a reader (nats-py buffers while reconnecting, but a reader that has not
    re-subscribed yet misses it). Readers drop what they already have by ``seq``. Pure."""

    def __init__(self, window_s: float) -> None:
        self.window_s = window_s
        self._sent: deque[tuple[float, str, TokenChunk, str]] = deque()

    def add(self, now: float, subject: str, chunk: TokenChunk, client: str = "") -> None:
        """``chunk`` published ``now`` on ``subject``, for a request of ``client`` ("": none)."""
        self._sent.append((now, subject, chunk, client))
        while self._sent and now - self._sent[0][0] > self.window_s:
            self._sent.popleft()

    def recent(self, now: float, client: str | None = None) -> list[tuple[str, TokenChunk]]:
        """The chunks kept, or those to ``client``: its requests' (whatever their reply subject: an
        application's are under its user's, ``subjects.reply_inbox(id, user)``, not its name's, and
        none was sent again to one named ``<user>.<name>``: a helper's finding) and any on its
        ``subjects.replies_of`` subjects."""
        prefix = subjects.replies_prefix(client) if client is not None else ""
        return [
            (subject, chunk)
            for at, subject, chunk, of in self._sent
            if now - at <= self.window_s and (client is None or of == client or subject.startswith(prefix))
        ]

    def unclaimed(self, now: float, claimed: Collection[str] | None) -> list[tuple[str, TokenChunk]]:
        """The chunks kept that the worker's own reconnect sends again: those of readers that name
        no ``client`` ("": they cannot ask), and, where ``claimed`` is given, those of named readers
        not in it. A named reader whose connection came back too (a NATS restart drops every one)
        says so in its next ``ClientAlive`` and is sent its own then (``recent(now, client)``): sent
        them by every worker again at the reconnect as well, and once more two seconds later, a
        large cluster's restart was a burst of two or three copies of every recent chunk."""
        return [
            (subject, chunk)
            for at, subject, chunk, of in self._sent
            if now - at <= self.window_s and (not of or (claimed is not None and of not in claimed))
        ]

    def forget(self, request_id: str) -> None:
        """Keep nothing more of ``request_id``'s chunks sent so far: another attempt serves it now,
        and a re-send of this attempt's chunks after that attempt's first would be two copies
        streaming at once."""
        self._sent = deque(entry for entry in self._sent if entry[2].request_id != request_id)


def silent_client_chunk(req: GenerateRequest) -> TokenChunk:
    """The refusal of a request whose client was not heard from when it came: told, not left to
    its chunk timeout (the client may only have been cut off a while). From no worker, as the
    dispatcher fails a recovered request: its number comes from the in-flight record and may lag
    what the client has, which a worker's may not."""
    reason = "the request's client was not heard from when it arrived; try again"
    return error_chunk(req, ErrorCode.UNAVAILABLE, reason, worker="")


def past_deadline(req: GenerateRequest, now: float) -> str | None:
    """Why ``req`` is not run on (its ``deadline``, Unix seconds, is ``now`` or earlier), or None."""
    if req.deadline is None or req.deadline > now:
        return None
    return f"the request's deadline passed {now - req.deadline:.3f} s ago; stopped"


def aborted_chunk(req: GenerateRequest, seq: int, worker: str) -> TokenChunk:
    """The last chunk of a request stopped by an abort (finish_reason "abort", numbered ``seq``):
    its sender learns the abort took, and a request that comes after an abort of its id is
    answered, not dropped without a word."""
    return TokenChunk(
        request_id=req.request_id,
        seq=seq,
        finish_reason=FinishReason.ABORT,
        worker=worker,
        recoveries=req.recoveries,
    )
