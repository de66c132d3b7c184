"""Which API a generation request speaks: completions and chat as their bodies say, and OpenAI's
Responses API as the chat that serves it (``responses_api``, ``responses_shape``), its responses
stored (``responses_store``). One is made per request (``Gateway.generate``): it reads the body,
makes the shaped job answer in its API, and names a refusal by its own fields."""

from __future__ import annotations

import dataclasses

from dlora.services.gateway import openai, responses_api
from dlora.services.gateway.auth import Principal
from dlora.services.gateway.openai import APIError, Body, ChatBody, CompletionBody
from dlora.services.gateway.responses_shape import ResponsesShape
from dlora.services.gateway.responses_store import Keeping, ResponsesStore, counted_as_sent
from dlora.services.gateway.shaping import Job, response_id


class Dialect:
    """The chat's: its body as it is, its answer and refusals the chat's."""

    kind: type[Body] = ChatBody

    async def decode(self, raw: bytes, who: Principal) -> Body:
        """``raw`` as the body the chat or completion path serves, asked by ``who`` (APIError 400:
        as ``decode_body``)."""
        body: Body = openai.decode_body(raw, self.kind)
        return body

    def response_id(self, chat: bool, base: str) -> str:
        """A request's internal id, made of ``base``: the id its answer is named by (unless its
        client named it), its access line's and the stem of its choices' ids in every service's log."""
        return response_id(chat, base)

    def answer(self, job: Job) -> Job:
        return job

    def background(self) -> Keeping | None:
        """What stores its response where it runs for nobody connected (``background``); None: served
        to its client."""
        return None

    def refused(self, e: APIError) -> APIError:
        return e


class Chat(Dialect):
    pass


class Completions(Dialect):
    kind = CompletionBody


class Responses(Dialect):
    """``POST /v1/responses``: served by the chat path, answered as a response object or its events."""

    def __init__(self, store: ResponsesStore) -> None:
        self.store = store
        self.asked: responses_api.ResponsesBody | None = None
        self.keeping: Keeping | None = None  # None: its response is not stored
        self.drawn: str | None = None  # the response id made of the gateway's own id (``response_id``)

    async def decode(self, raw: bytes, who: Principal) -> Body:
        """As the chat's, after the stored conversation its previous_response_id names is put
        before its input (APIError 404: none such of ``who``'s tenant: ``ResponsesStore.prepared``)."""
        body = openai.decode_body(raw, responses_api.ResponsesBody)
        responses_api.refuse_unserved(body)  # (a refusal before a Redis read)
        self.asked, self.keeping = await self.store.prepared(body, who.tenant or "")
        if body.background and self.keeping is None:  # (store false is refused before: ``refuse_unserved``)
            why = "background needs the response stored: responses are not stored here (responses_ttl_s is 0)"
            if self.store.on:
                why = "background needs the response stored: its conversation is over responses_max_bytes"
            raise APIError(400, why, param="background")
        try:
            return responses_api.to_chat(self.asked)
        except APIError as e:
            raise counted_as_sent(e, self.asked.input, body.input) from None

    def response_id(self, chat: bool, base: str) -> str:
        # the response's id (ResponsesShape.base): a chat's logged what the client never saw
        self.drawn = f"resp_{base}"
        return self.drawn

    def answer(self, job: Job) -> Job:
        assert self.asked is not None
        if (keeping := self.keeping) is not None:
            # Named by its client's request_id or X-Request-Id (shaping names the shape by it, not by
            # the id drawn here): only then can a stored response be under its id
            keeping.named = job.shape.request_id != self.drawn
        shape = ResponsesShape.of(job.shape, self.asked, keep=keeping.keep if keeping else None)

        async def finishing() -> bytes | None:
            # the store failing after a stream's last event said "store": true: that event said again, false
            return None if keeping is None or await keeping.finishing() else shape.again()

        return dataclasses.replace(job, shape=shape, events=shape.events, finishing=finishing if keeping else None)

    def background(self) -> Keeping | None:
        return self.keeping if self.asked is not None and self.asked.background else None

    def refused(self, e: APIError) -> APIError:
        return responses_api.renamed(e)
