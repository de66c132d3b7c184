"""One request's chunks as they come back to the gateway. Pure: no aiohttp, no NATS.

Chunks are numbered from the request's first; after a move or a recovery a worker may send
numbers the gateway already has (the resumed request starts where its record says, which can lag
what was delivered), so anything below the next expected number is a duplicate and dropped.
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

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    def accept(self, chunk: TokenChunk) -> bool:
        """Take ``chunk``; False (and nothing changes) for a duplicate or anything after the end.

        An error ends the stream whatever its number: it carries no tokens to de-duplicate, and its
        sender (a dispatcher failing a recovered request) numbers it from the in-flight record,
        which can lag what the client already has; dropped as a duplicate, the client would hang."""
        if self.done:
            return False
        if chunk.error is not None:
            self.next_seq = max(self.next_seq, chunk.seq + 1)
            self.error, self.error_code, self.finish_reason = chunk.error, chunk.error_code, FinishReason.ERROR
            return True
        if chunk.seq < self.next_seq:
            return False
        self.next_seq = chunk.seq + 1
        self.tokens += len(chunk.token_ids)
        self.text += chunk.text
        self.finish_reason = chunk.finish_reason
        return True
