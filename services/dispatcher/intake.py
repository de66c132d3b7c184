"""The dispatcher's intake: a request taken off the shared subjects (a gateway's, or an
application's) is decoded, checked against its sender (where it may be answered, which adapters it
may use), acknowledged and handed to the dispatch (``main.py``), or refused with the reason. A
mixin of ``Dispatcher``, on ``Recovery``, whose declarations of the state and the sending it shares."""

from __future__ import annotations

import msgspec
from nats.aio.msg import Msg

from dlora.common import bus, subjects
from dlora.common.messages import AdapterEntry, ErrorCode, FinishReason, GenerateRequest, TokenChunk, error_text
from dlora.common.undecodable import refusal
from dlora.services.dispatcher.recovery import Recovery
from dlora.services.dispatcher.tenancy import as_taken, unseen

_decode_request = msgspec.json.Decoder(GenerateRequest)


class _AppRequest(GenerateRequest, forbid_unknown_fields=True, frozen=True, kw_only=True):
    """An application's request, checked for fields a request lacks: a typo (``adaptor``, or
    ``max_tokens`` beside ``params``) was served as if it were not there. A gateway's is not: in
    a rolling upgrade a newer gateway's new field reaches an older dispatcher, which goes on."""


_decode_app_request = msgspec.json.Decoder(_AppRequest)
_encode = msgspec.json.Encoder()


class Intake(Recovery):
    """Taking requests off the bus; ``Dispatcher`` provides ``_dispatch`` and the bound below."""

    _state_bound: bus.StateBound  # a request's Redis work

    async def _on_request(self, msg: Msg) -> None:
        try:  # decoded here, not by bus.subscribe: an unchanged request is forwarded as it came
            req = _decode_request.decode(msg.data)
            if msg.subject != subjects.REQUESTS:
                _decode_app_request.decode(msg.data)
        except msgspec.DecodeError as e:
            bus.reject(
                subjects.REQUESTS if msg.subject == subjects.REQUESTS else subjects.APP_REQUESTS,
                msg.subject,
                GenerateRequest,
                e,
            )
            await self._refuse_undecodable(msg, e)
            return
        owner = subjects.sender(msg.subject)  # only its subject says who sent it
        raw: bytes | None = msg.data
        if (cleaned := as_taken(req, owner)) is not req:
            req, raw = cleaned, None
        # An application's answers go only where it reads: a reply subject it chose elsewhere could
        # be another user's stream or a JetStream subject the dispatcher may write.
        answer = msg.reply if not owner or subjects.replies_to(owner, msg.reply) else ""
        if owner and not subjects.replies_to(owner, req.reply_to):
            reply_to = req.reply_to if len(req.reply_to) <= 200 else req.reply_to[:200] + "…"
            reason = (
                f"reply_to {reply_to!r} is not a subject of {owner!r}'s replies or inboxes NATS can publish to "
                f"(at most {subjects.MAX_SUBJECT_BYTES} bytes)"
            )
            bus.reject(subjects.APP_REQUESTS, msg.subject, GenerateRequest, ValueError(reason))
            self.metrics.refusals.labels("bad-reply-to").inc()
            if answer:
                refused = TokenChunk(
                    request_id=req.request_id,
                    seq=0,
                    error=error_text(reason),
                    error_code=ErrorCode.BAD_REQUEST,
                    finish_reason=FinishReason.ERROR,
                )
                await self.nc.publish(answer, _encode.encode(refused))
            return
        if answer:  # the gateway waits for a dispatcher to take it (NATS request/reply)
            await self.nc.publish(answer, b"")
        # Its abort heard already (a gateway whose hand-over timed out answered its client and
        # aborted): ended as a worker ends it. Sent on, it was recorded on a worker that may have died
        # meanwhile, to wait as an orphan past the abort's memory and run for nobody; with none live it
        # was failed ("no worker is available"). Before the Redis work, as it needs none: a hung Redis
        # is what holds a request past that timeout, and such a one was told "unreachable; try again".
        if await self._ended_if_aborted(req):
            return
        # Requests are taken one at a time (one subscription): with Redis hung each waited out redis-py's
        # tries (20 s), so the third's answer came after its client's timeout. Bounded, and not tried
        # again for a moment once it failed.
        try:
            async with self._state_bound():
                await self._take(req, raw, owner)
        except bus.STATE_OUTAGE as e:  # said at once: its client waited out its chunk timeout (60 s)
            await self._unrecorded(req, type(e).__name__)

    async def _unrecorded(self, req: GenerateRequest, why: str) -> None:
        reason = f"the state store (Redis) is unreachable ({why}); try again"
        await self._fail(req, req.next_seq, reason, "state-unreachable", ErrorCode.UNAVAILABLE)

    async def _take(self, req: GenerateRequest, raw: bytes | None, owner: str) -> None:
        """``req`` dispatched: refused if it names an adapter it may not use (an application's)."""
        allowed: AdapterEntry | None = None  # (the version it may use, not a later one read again)
        if owner and req.adapter is not None:  # another tenant's adapter is, to it, not there (tenancy.py)
            if isinstance(seen := await unseen(self.store, owner, req.adapter, req.adapter_version), str):
                await self._fail(req, req.next_seq, seen, "not-found", ErrorCode.NOT_FOUND)
                return
            allowed = seen
        await self._dispatch(req, raw, allowed=allowed)

    async def _refuse_undecodable(self, msg: Msg, error: msgspec.DecodeError) -> None:
        """Tell the sender of a request that does not decode why (``undecodable.refusal``)."""
        if (refused := refusal(msg.subject, msg.reply, msg.data, error)) is not None:
            for subject in refused[0]:
                await self.nc.publish(subject, _encode.encode(refused[1]))
