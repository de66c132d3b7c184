"""One request's chunks as they come back to the gateway. Pure: no aiohttp, no NATS.

Chunks are numbered from the request's first; after a move or a recovery a worker may send
numbers the gateway already has (the resumed request starts where its record says, which can lag
what was delivered), so anything below the next expected number is a duplicate and dropped. Each
chunk also names its attempt (the request's ``recoveries``): once a later attempt is heard from,
an earlier one's chunks are dropped.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from dlora.common.messages import ErrorCode, FinishReason, TokenChunk

# Seconds a gap in the chunk numbers may stay open before the stream fails: longer than a NATS
# server restart plus the worker's second re-send of its recent chunks (worker/main.py).
GAP_WAIT_S = 10.0


@dataclass
class ReplyStream:
    """De-duplicates one request's chunks, accumulates its text and token count (its usage) and
    says when it is over."""

    request_id: str
    next_seq: int = 0  # the number the next new chunk carries
    # Prompt tokens its prefill found in the prefix cache: its first run's (the first chunk's
    # prompt_cached_tokens) where that was heard, else its last chunk's usage (a trial: after a
    # move or recovery the usage reported the recompute's hit, up to the whole prompt).
    cached_tokens: int = 0
    _first_cached: int | None = None
    keep_ids: bool = False  # keep the tokens' ids (return_token_ids), not only their count
    token_ids: list[int] = field(default_factory=list)  # completion tokens so far, when kept
    tokens: int = 0  # completion tokens so far
    # The completion text so far, in pieces (``text``): a str grown at every chunk copied all the
    # text before it each time (128k tokens: 38 us a chunk at the end, 5 s of the loop in all)
    _pieces: list[str] = field(default_factory=list)
    finish_reason: FinishReason | None = None
    error: str | None = None
    error_code: ErrorCode | None = None
    error_param: str | None = None  # the SamplingParams field at fault (``TokenChunk.param``)
    # The worker serving the request now: that of the last chunk taken, or of the latest attempt
    # heard from (its first chunk can be one the client has, or its error: access log's ``workers``)
    worker: str = ""
    attempt: int = 0  # the latest attempt (``recoveries``) heard from: earlier ones are fenced
    _ahead: dict[int, TokenChunk] = field(default_factory=dict)  # chunks after a gap, by seq
    _gap_since: float | None = None  # when the open gap opened (monotonic seconds)

    @property
    def text(self) -> str:
        """The completion text so far."""
        if len(self._pieces) > 1:  # joined once however often it is read
            self._pieces[:] = ["".join(self._pieces)]
        return self._pieces[0] if self._pieces else ""

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    @property
    def gap_open(self) -> bool:
        """Chunks wait for an earlier one that has not come (yet)."""
        return bool(self._ahead) and not self.done

    def take(self, chunk: TokenChunk, now: float = 0.0) -> list[TokenChunk]:
        """Take ``chunk`` (arrived at ``now``, monotonic seconds); returns the chunks to deliver now,
        in order: none for a duplicate or anything after the end, several when it fills a gap.

        Chunks after a gap wait (a chunk lost in transit around a NATS restart comes again: the
        worker re-sends its recent chunks once reconnected); a gap still open ``GAP_WAIT_S``
        after it opened fails the stream instead of delivering text with a hole in it.

        An error numbered behind what arrived still ends the stream when it comes from the
        dispatcher (``worker`` empty: it fails a recovered request numbered from the in-flight
        record, which can lag what the client has; dropped, the client would hang) or from the
        worker serving the request now; from another worker it is a stale one's and is dropped.
        A worker that speaks first for a later attempt serves it now (its record lagged the client:
        its error came numbered behind, was dropped as a stale one's, and the client waited out
        its timeout for no answer). A worker's chunk from an attempt before the latest heard from
        is dropped whatever it says (that worker stalled, was given up and resumed; the request
        was re-dispatched)."""
        if self.done or (chunk.worker and chunk.recoveries < self.attempt):
            return []
        if chunk.recoveries > self.attempt:  # held chunks of an earlier attempt are fenced too
            self.attempt = chunk.recoveries
            self._ahead = {seq: c for seq, c in self._ahead.items() if not c.worker or c.recoveries >= self.attempt}
            self.worker = chunk.worker or self.worker  # (a dispatcher's chunk names none)
        if chunk.error is not None:
            if chunk.seq < self.next_seq and chunk.worker not in ("", self.worker):
                return []
            self.worker = chunk.worker or self.worker
            self._end(chunk.error, chunk.error_code)
            self.error_param = chunk.param
            return [chunk]
        if chunk.seq < self.next_seq:
            return []
        self._ahead.setdefault(chunk.seq, chunk)
        ready = []
        while (nxt := self._ahead.pop(self.next_seq, None)) is not None and not self.done:
            self.next_seq, self.worker = nxt.seq + 1, nxt.worker
            self.tokens += len(nxt.token_ids)
            if self.keep_ids:
                self.token_ids += nxt.token_ids
            if nxt.prompt_cached_tokens is not None and self._first_cached is None:
                self._first_cached = nxt.prompt_cached_tokens
            if nxt.usage is not None:
                self.cached_tokens = nxt.usage.cached_tokens if self._first_cached is None else self._first_cached
            self._pieces.append(nxt.text)
            self.finish_reason = nxt.finish_reason
            ready.append(nxt)
        if not self._ahead:
            self._gap_since = None
        elif self._gap_since is None:
            self._gap_since = now
        elif now - self._gap_since > GAP_WAIT_S:
            self._end(f"chunks {self.next_seq}..{min(self._ahead) - 1} were lost in transit", ErrorCode.UNAVAILABLE)
        return ready

    def accept(self, chunk: TokenChunk, now: float = 0.0) -> bool:
        """``take``, for a reader that only needs to know whether anything was delivered."""
        return bool(self.take(chunk, now))

    def _end(self, error: str, code: ErrorCode | None) -> None:
        self.error, self.error_code, self.finish_reason = error, code, FinishReason.ERROR
        self._ahead.clear()
