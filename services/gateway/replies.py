"""One request's chunks as they come back to the gateway. Pure: no aiohttp, no NATS.

Chunks are numbered from the request's first; after a move or a recovery a worker may send
numbers the gateway already has (the resumed request starts where its record says, which can lag
what was delivered), so anything below the next expected number is a duplicate and dropped. Each
chunk also names its attempt (the request's ``recoveries``): once a later attempt is heard from,
an earlier one's chunks are dropped.
"""

from __future__ import annotations

from dataclasses import dataclass

from dlora.common.messages import ErrorCode, FinishReason, TokenChunk


@dataclass
class ReplyStream:
    """De-duplicates one request's chunks, accumulates its text and token count (its usage) and
    says when it is over."""

    request_id: str
    next_seq: int = 0  # the number the next new chunk carries
    tokens: int = 0  # completion tokens so far
    text: str = ""  # completion text so far
    finish_reason: FinishReason | None = None
    error: str | None = None
    error_code: ErrorCode | None = None
    worker: str = ""  # the worker of the last chunk taken: the one serving the request now
    attempt: int = 0  # the latest attempt (``recoveries``) heard from: earlier ones are fenced

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    def accept(self, chunk: TokenChunk) -> bool:
        """Take ``chunk``; False (and nothing changes) for a duplicate or anything after the end.

        An error numbered behind what arrived still ends the stream when it comes from the
        dispatcher (``worker`` empty: it fails a recovered request numbered from the in-flight
        record, which can lag what the client has; dropped, the client would hang) or from the
        worker serving the request now; from another worker it is a stale one's and is dropped.
        A worker's chunk from an attempt before the latest heard from is dropped whatever it says
        (that worker stalled, was given up and resumed; the request was re-dispatched)."""
        if self.done or (chunk.worker and chunk.recoveries < self.attempt):
            return False
        self.attempt = max(self.attempt, chunk.recoveries)
        if chunk.error is not None:
            if chunk.seq < self.next_seq and chunk.worker not in ("", self.worker):
                return False
            self.next_seq = max(self.next_seq, chunk.seq + 1)
            self.error, self.error_code, self.finish_reason = chunk.error, chunk.error_code, FinishReason.ERROR
            return True
        if chunk.seq < self.next_seq:
            return False
        self.next_seq, self.worker = chunk.seq + 1, chunk.worker
        self.tokens += len(chunk.token_ids)
        self.text += chunk.text
        self.finish_reason = chunk.finish_reason
        return True
