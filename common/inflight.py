"""What a request in flight is, as its Redis record holds it (``StateStore``'s in-flight
operations, ``state.py``, read and write it): the record read back (``Inflight``), a chunk written
to it (``Sent``), and which copy of the request a worker holds when fencing asks (``Copy``)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import NamedTuple

import msgspec

from dlora.common.messages import GenerateRequest


@dataclass(frozen=True)
class Inflight:
    worker: str
    request: GenerateRequest
    next_seq: int  # the sequence number of the next chunk: a resume continues the numbering here
    tokens: list[int]  # tokens delivered so far: a resume continues after them
    recoveries: int = 0  # times it was re-dispatched (its worker lost, stalled, restarted): the attempt
    text_pending: int = 0  # of the tokens delivered, how many at the end have had no text sent
    text_held: str = ""  # text those tokens made that was not sent (it could have begun a stop string)
    deaths: int = 0  # times it was re-dispatched because the worker running it died or hung
    incarnation: str = ""  # the start of ``worker`` it was sent to ("" where unknown)
    # ``worker`` took this attempt up (``StateStore.mark_taken``, or a progress write): only then
    # is its loss a death of the request. A dispatcher re-dispatched to a worker already dead, not
    # yet declared lost, and the poison guard failed requests that never ran there (a trial: two
    # workers killed together, or 2 s apart, or a dispatcher restarted meanwhile, or a move).
    taken: bool = False
    # ``worker`` marks what it takes up (``WorkerStats.marks_taken``, recorded by the put naming it):
    # an older worker never does, and its loss counts as a death as before (a rolling upgrade).
    marks_taken: bool = False
    # Worker -> when it handed this request back (Unix seconds, the dispatcher's clock), refusing
    # it (``LostRequests.never_arrived``): any dispatcher re-dispatching it avoids them while
    # another can take it (``services/dispatcher/hand_backs.py``); at most ``MAX_HANDED_BACK_BY``.
    handed_back: Mapping[str, float] = field(default_factory=dict)


class Sent(NamedTuple):
    """One step's chunk of a running request, as its in-flight record takes it."""

    attempt: int  # GenerateRequest.recoveries of the copy that sent it (the fencing token)
    seq: int  # its sequence number: a write retried after its reply was lost is not counted twice
    token_ids: list[int]
    held: int  # how many of all the request's tokens so far have had their text held back
    held_text: str = ""  # the text they made that was held back unsent (it could begin a stop string)
    # Each chunk's token count, in order, where kept chunks were joined (consecutive chunks of one
    # attempt: ``seq`` is the first's, ``token_ids`` all of theirs); none: itself alone.
    counts: tuple[int, ...] = ()

    @property
    def chunk_counts(self) -> tuple[int, ...]:
        return self.counts or (len(self.token_ids),)

    @property
    def last(self) -> int:
        """The sequence number of the last chunk it stands for (its chunks are consecutive)."""
        return self.seq + len(self.chunk_counts) - 1

    @property
    def spans(self) -> tuple[int, str]:
        """The last chunk's number and each chunk's token count ("2,1,3"), as the progress script reads them."""
        return self.last, ",".join(map(str, self.chunk_counts))

    def then(self, later: Sent) -> Sent | None:
        """This chunk and ``later`` as one, if ``later`` is the next chunk of the same attempt
        (``later`` may be joined already: a failed retry's run, put back after this)."""
        if later.attempt != self.attempt or later.seq != self.last + 1:
            return None
        tokens = [*self.token_ids, *later.token_ids]
        return later._replace(seq=self.seq, token_ids=tokens, counts=self.chunk_counts + later.chunk_counts)


class Copy(NamedTuple):
    """Which copy of a request a worker holds, as fencing asks it: its attempt
    (``GenerateRequest.recoveries``, the fencing token), and whether a missing record means the
    request is over (it was recorded before it was sent, and the worker asks after a stall: a
    record can also go missing because Redis lost its data, and a running request must not be
    dropped for that)."""

    attempt: int
    recorded: bool

    @staticmethod
    def of(request: GenerateRequest, stalled: bool) -> Copy:
        return Copy(request.recoveries, stalled and request.recorded)


def sent_again(held: GenerateRequest, new: GenerateRequest) -> bool:
    """Whether ``new`` (as it came), under the id of ``held`` (in flight), is that request sent again
    (a retry) rather than another one: equal but for what the services set on the way (a seed drawn
    for it and the adapter version, where ``new`` names none; the record flag; a resume's tokens,
    sequence numbers, attempt and the wait a move carries) and the sender's clock (``created``, a
    ``deadline`` set anew).
    A different request under an id still in flight was taken for a retry when its reply subject
    matched, and its reader got the other request's tokens, with no error (a helper's finding: an
    app restarted its id counter)."""
    drawn = msgspec.structs.replace(held.params, seed=None) if new.params.seed is None else held.params
    version = None if new.adapter_version is None else held.adapter_version
    return _as_sent(msgspec.structs.replace(held, params=drawn, adapter_version=version)) == _as_sent(new)


def _as_sent(req: GenerateRequest) -> GenerateRequest:
    return msgspec.structs.replace(
        req,
        recorded=False,
        resume_token_ids=[],
        resume_text_pending=0,
        resume_text_held="",
        next_seq=0,
        kv_chunks=0,
        kv_transfer="",
        kv_export_s=0.0,
        queued_s=0.0,
        recoveries=0,
        continued=False,
        created=0.0,
        deadline=None,
    )
