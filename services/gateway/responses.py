"""One response as its chunks come back: each choice's state (``RunningChoice``) and the writer that
turns chunks into server-sent events or, not streamed, one JSON body (``ResponseWriter``)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from dataclasses import dataclass, field
from typing import Any, cast

import msgspec
from aiohttp import web

from dlora.common.messages import ErrorCode, GenerateRequest, TokenChunk
from dlora.model.token_bytes import TokenIdText, TokenText
from dlora.services.gateway import completion_shape, logprobs
from dlora.services.gateway.openai import APIError
from dlora.services.gateway.reasoning import ReasoningTokens
from dlora.services.gateway.replies import ReplyStream
from dlora.services.gateway.sampling import said_as
from dlora.services.gateway.shaping import ChoicePlan, Job

# The SamplingParams fields of a structured output (``TokenChunk.param`` names one at fault).
STRUCTURED_PARAMS = frozenset({"json_schema", "regex", "choice", "grammar"})
# The fields of every body a chunk's ``param`` names as the body does: ``model``, the adapter a
# worker refuses (its rank above the serving limit).
BODY_PARAMS = frozenset({"model"})
# Events a response holds at most before writing them while its request's chunks keep coming
# faster than the gateway relays them (``ResponseWriter.flush``): ~30 KB, a few steps of a stream.
MAX_HELD_EVENTS = 64
# An error chunk's code as the HTTP status of a response not yet begun.
STATUS = {ErrorCode.BAD_REQUEST: 400, ErrorCode.NOT_FOUND: 404, ErrorCode.UNAVAILABLE: 503, ErrorCode.INTERNAL: 500}


def refusal(code: ErrorCode | None, message: str, param: str | None = None) -> APIError:
    """A worker's or dispatcher's error chunk as the response's error, ``param`` the body's field
    at fault; NOT_FOUND is an adapter gone since the gateway looked it up (removed, or another
    tenant's): OpenAI's ``model_not_found``."""
    code = code or ErrorCode.INTERNAL
    not_found = code is ErrorCode.NOT_FOUND
    return APIError(STATUS.get(code, 500), message, param=param, code="model_not_found" if not_found else None)


@dataclass
class RunningChoice:
    """One choice as its response is written: its request to the workers and what came back so far."""

    out: completion_shape.Choice
    request: GenerateRequest | None  # None: nothing to generate (max_tokens 0)
    replies: ReplyStream | None  # its chunks, with the request
    offset: logprobs.TextOffset  # where its next token begins in its text (completions' text_offset)
    sampled: list[int] = field(default_factory=list)  # its last sampled tokens (``logprobs.sampled_before``)
    parts: list[dict[str, Any]] = field(default_factory=list)  # logprobs objects, non-streamed
    prompt_only: bool = False  # its request runs for the prompt's logprobs: its token is not shown
    prompt_ids: list[int] = field(default_factory=list)  # its own prompt's
    prompt: int = 0  # which of the request's prompts
    prompt_ids_sent: bool = False  # its prompt's token ids went out with an event (return_token_ids)
    # Its tokens written so far (``ResponseWriter.add``), what an event's continuous usage says: the
    # reply stream counts every chunk a filled gap releases before the first of them is written
    said: int = 0

    @classmethod
    def of(cls, plan: ChoicePlan, keep_ids: bool = False) -> RunningChoice:
        """``keep_ids``: its reply stream keeps the tokens' ids (return_token_ids)."""
        r = plan.request
        return cls(
            completion_shape.Choice(plan.index, text=plan.echo, finish_reason=None if r else "length"),
            r,
            ReplyStream(r.request_id, keep_ids=keep_ids) if r else None,
            offset=logprobs.TextOffset(len(plan.echo)),
            prompt_only=plan.prompt_only,
            prompt_ids=plan.prompt_ids,
            prompt=plan.prompt,
        )

    def unanswered(self, reason: str) -> TokenChunk:
        """The UNAVAILABLE error the gateway makes for this choice when no worker will answer it."""
        assert self.request is not None and self.replies is not None
        return TokenChunk(
            request_id=self.request.request_id,
            seq=self.replies.next_seq,
            error=reason,
            error_code=ErrorCode.UNAVAILABLE,
        )

    @property
    def completion_tokens(self) -> int:
        return self.replies.tokens if self.replies and not self.prompt_only else 0

    @property
    def echoes_logprobs(self) -> bool:
        """Its echoed prompt has logprobs, which come with its first chunk."""
        return self.request is not None and self.request.params.prompt_logprobs is not None


class ResponseWriter:
    """One request's HTTP response as its chunks come: server-sent events (opened at the first
    chunk, so an error before it still gets a status) or, not streamed, one JSON body at the end.

    Events are held until ``flush``, which the relay calls when no more of the request's chunks
    are waiting, so chunks that queued together while the gateway was behind go out in one write
    (a trial at 200 streams: 252 of the loop's 851 busy samples in the socket's write). Still one
    event per worker chunk. With CPU workers it changed nothing measurable (95 % of flushes held
    one event: BENCHMARKS.md); it pays where the gateway falls more than a step behind."""

    def __init__(
        self,
        request: web.Request,
        job: Job,
        choices: list[RunningChoice],
        tokens: TokenText | TokenIdText,
        send_timeout_s: float = 60.0,
    ) -> None:
        self.request, self.job, self.choices = request, job, choices
        self.send_timeout_s = send_timeout_s  # (``GatewaySettings.send_timeout_s``)
        self.tokens = TokenIdText(tokens) if job.token_ids_in_logprobs else tokens
        self.stream: web.StreamResponse | None = None
        self._held: list[bytes] = []  # events not written yet (``flush``)
        tags = job.reasoning_tags  # (each choice's reasoning tokens counted as they come)
        self._reasoning = {c.out.index: ReasoningTokens(*tags, job.shape.thinking) for c in choices} if tags else {}

    async def add(self, choice: RunningChoice, chunk: TokenChunk) -> None:
        """A new chunk of ``choice`` (not an error): an event, or its text and logprobs kept."""
        if self.job.stream and self.stream is None:
            self.stream = await self._open()
        r, job = choice.request, self.job
        if r is not None and choice.echoes_logprobs and chunk.seq == 0:  # the prompt's, with the first
            ids = r.prompt_token_ids or []
            if choice.prompt_only:  # over with its prompt: the token it ran for is not the client's
                choice.out.finish_reason, choice.out.stop_reason = "length", None
            if job.prompt_logprobs is not None:  # vLLM's field
                choice.out.prompt_logprobs = logprobs.vllm_prompt_logprobs(
                    ids, chunk.prompt_logprobs, job.prompt_logprobs, self.tokens
                )
            if job.echo_logprobs is not None:  # the echoed prompt's, its alternatives as many as asked there
                entries = [msgspec.structs.replace(e, top=e.top[: job.echo_logprobs]) for e in chunk.prompt_logprobs]
                part = logprobs.prompt_logprobs(ids, entries, self.tokens, choice.out.text)
                if self.stream is None:
                    choice.parts.append(part)
                else:  # the echoed prompt's event (held back at the stream's opening), its logprobs in it
                    event = self.job.shape.chunk(
                        choice.out.text,
                        choice.out.finish_reason,
                        first=True,
                        index=choice.out.index,
                        logprobs=part,
                        # the choice's first event, as the opening's: with max_tokens 0 its last too
                        token_ids=[] if self.job.return_token_ids else None,
                        prompt_token_ids=self._prompt_ids_once(choice),
                    )
                    self._hold(self._with_usage(event, choice, before=True))
        if choice.prompt_only:
            return
        choice.said += len(chunk.token_ids)
        if (reasoning := self._reasoning.get(choice.out.index)) is not None:
            reasoning.feed(chunk.token_ids, chunk.text)
        token_logprobs = self._logprobs(choice, chunk)
        choice.out.finish_reason, choice.out.stop_reason = chunk.finish_reason, chunk.stop_reason
        if self.stream is not None:
            # One event per worker chunk (a step's token), text or not, so clients can time tokens.
            event = self.job.shape.chunk(
                chunk.text,
                chunk.finish_reason,
                index=choice.out.index,
                logprobs=token_logprobs,
                stop_reason=chunk.stop_reason,
                token_ids=list(chunk.token_ids) if self.job.return_token_ids else None,
                prompt_token_ids=self._prompt_ids_once(choice),
            )
            if not self.job.shape.silent(event):
                self._hold(self._with_usage(event, choice))
                if len(self._held) >= MAX_HELD_EVENTS:  # far behind: out with what it has
                    await self.flush()
        elif token_logprobs is not None:  # the text is the reply stream's, taken at the end
            choice.parts.append(token_logprobs)

    async def fail(self, replies: ReplyStream) -> web.StreamResponse:
        """A choice failed: its error as the status, or (the stream is open) as an event ending it.

        Raises:
            APIError: the error's status (503 for a timeout, ...) when no event went out yet.
        """
        # A structured output that fails as the output grows (past what the grammar engine
        # handles) is named by the body's field that asked for it, as the gateway's own check does.
        param = self.job.structured_field if replies.error_param in STRUCTURED_PARAMS else None
        param = replies.error_param if replies.error_param in BODY_PARAMS else param
        message = replies.error or ""
        error = refusal(replies.error_code, message if param is None else said_as(message, param), param)
        if self.stream is None:
            raise error
        for c in self.choices:  # the text the parsers held back (a part of </think>) is the model's: out first
            if c.out.finish_reason is None and not c.prompt_only:
                self._hold_rest(c)
        self._hold(error.body())  # the same object, type and code as a status would carry
        return await self._end()

    def _hold_rest(self, choice: RunningChoice) -> None:
        """An event of the text ``choice``'s parsers still hold, read to its end, where there is
        any: a stream that ended on an error lost up to 7 characters of reasoning (a possible
        ``</think>``) or a tool parser's held text, which vLLM, holding none, had sent. Its parsers
        read the end as at a finish, the event saying none (the error that follows ends it)."""
        if not self.job.shape.chat:  # (a completion's text is held by no parser)
            return
        event = self.job.shape.chunk("", "error", index=choice.out.index)
        event["choices"][0]["finish_reason"] = None
        if any(event["choices"][0]["delta"].values()):
            self._hold(self._with_usage(event, choice))

    async def finish(self, completion_tokens: int) -> web.StreamResponse:
        """Every choice is over: the JSON body, or the stream's usage chunk (if asked) and its end."""
        job = self.job
        if not job.stream:
            for c in self.choices:
                c.out.text += c.replies.text if c.replies and not c.prompt_only else ""  # after the echo, if any
                c.out.logprobs = logprobs.merge_logprobs(job.shape.chat, c.parts)
                if job.return_token_ids:
                    c.out.token_ids = c.replies.token_ids if c.replies and not c.prompt_only else []
                    c.out.prompt_token_ids = c.prompt_ids
            body = job.shape.full([c.out for c in self.choices], job.prompt_tokens, completion_tokens, self._cached())
            self._detailed(body["usage"], self.choices)
            if job.finishing is not None:
                await job.finishing()
            return web.json_response(body)
        if self.stream is None:  # echo with max_tokens 0: no chunk came
            self.stream = await self._open()
        if job.include_usage:
            usage = job.shape.usage_chunk(job.prompt_tokens, completion_tokens, self._cached())
            self._detailed(usage["usage"], self.choices)
            self._hold(usage)
        return await self._end()

    async def flush(self) -> None:
        """Write the events held, in one write. ConnectionResetError (the connection aborted) when
        the client takes none of it for ``send_timeout_s``: a reader that stopped reading (its
        process paused, its TCP window full) held its key's concurrency slots and, queued here, the
        rest of its output for as long as it kept the socket open, the work done long since (a
        helper's probe: 429s a minute after the worker finished, 30 MB for one request). As
        nginx's send_timeout."""
        if self._held and self.stream is not None:
            data = b"".join(self._held)
            self._held.clear()
            await self._sent(self.stream.write(data))

    async def _sent(self, write: Awaitable[None]) -> None:
        try:
            async with asyncio.timeout(self.send_timeout_s):
                await write
        except TimeoutError:
            if self.request.transport is not None:
                self.request.transport.abort()
            raise ConnectionResetError(f"the client read nothing for {self.send_timeout_s:g} s") from None

    async def _end(self) -> web.StreamResponse:
        """The events held and the stream's end, in one write."""
        assert self.stream is not None
        if self.job.events is None:  # (the Responses API ends with its response.completed event)
            self._held.append(b"data: [DONE]\n\n")
        if self.job.finishing is not None and (again := await self.job.finishing()) is not None and self._held:
            self._held[-1] = again  # (the last event, still held: every end holds it, then comes here)
        await self.flush()
        await self._sent(self.stream.write_eof())
        return self.stream

    def _hold(self, obj: dict[str, Any]) -> None:
        if self.job.events is not None:  # another API's events, made of the chat's (the Responses API)
            self._held.extend(self.job.events(obj))
        else:
            self._held.append(b"data: " + msgspec.json.encode(obj) + b"\n\n")

    def _cached(self) -> int:
        """The prompt tokens the workers found in their prefix caches, each prompt counted once as
        its tokens are: by the choice of it that found the fewest, the one that computed the
        prompt (its other samples then find it cached: the most read ~99 % cached for any cold
        prompt with n > 1, a user's trial)."""
        found: dict[int, int] = {}
        for c in self.choices:
            if c.replies is not None:
                found[c.prompt] = min(found.get(c.prompt, c.replies.cached_tokens), c.replies.cached_tokens)
        return sum(found.values())

    async def _open(self) -> web.StreamResponse:
        """The SSE response, opening with each choice's role (chat) or echoed prompt (completions)."""
        stream = await opensse(self.request)
        for c in self.choices:
            if (self.job.shape.chat or c.out.text or c.out.finish_reason) and not c.echoes_logprobs:
                event = self.job.shape.chunk(
                    c.out.text,
                    c.out.finish_reason,
                    first=True,
                    index=c.out.index,
                    token_ids=[] if self.job.return_token_ids else None,
                    prompt_token_ids=self._prompt_ids_once(c),
                )
                self._hold(self._with_usage(event, c, before=True))
        return stream

    def _prompt_ids_once(self, choice: RunningChoice) -> list[int] | None:
        """The choice's prompt token ids for its first event, with return_token_ids (vLLM's); a
        chat response's one prompt in its first event alone, whatever ``n`` (at the event's top:
        each choice's first event repeated it, where vLLM sends it once)."""
        if not self.job.return_token_ids or choice.prompt_ids_sent:
            return None
        choice.prompt_ids_sent = True
        if self.job.shape.chat and any(c.prompt_ids_sent for c in self.choices if c is not choice):
            return None
        return choice.prompt_ids

    def _with_usage(self, event: dict[str, Any], choice: RunningChoice, before: bool = False) -> dict[str, Any]:
        """``event`` with its choice's usage so far, when the client asked for it in every event
        (vLLM's ``continuous_usage_stats``): its own prompt's tokens, not the request's every prompt
        (a user's trial); ``before``: an opening event (the role, the echoed prompt), which precedes
        every token (the chunk that opened the stream is counted already)."""
        if self.job.continuous_usage:
            event["usage"] = completion_shape.usage(len(choice.prompt_ids), 0 if before else choice.said)
            self._detailed(event["usage"], [choice])
        return event

    def _detailed(self, usage: dict[str, Any], choices: list[RunningChoice]) -> None:
        """``usage`` told how many of ``choices``' output tokens were reasoning, beside a reasoning
        parser, as vLLM's usage tells it (OpenAI's ``completion_tokens_details``) in every usage
        it sends: whole, streamed, per event. A client that budgets or bills thinking read none."""
        if self._reasoning:
            counted = [(self._reasoning.get(c.out.index), c.out.finish_reason is not None) for c in choices]
            spent = sum(counter.count(done) for counter, done in counted if counter is not None)
            # (the Responses API's whole usage names it its way: ``responses_shape``)
            usage["output_tokens_details" if "output_tokens_details" in usage else "completion_tokens_details"] = {
                "reasoning_tokens": spent
            }

    def _logprobs(self, choice: RunningChoice, chunk: TokenChunk) -> dict[str, Any] | None:
        if not chunk.logprobs:
            return None
        if self.job.shape.chat:
            return logprobs.chat_logprobs(chunk.logprobs, self.tokens, choice.sampled)
        skip = choice.request is None or choice.request.params.skip_special_tokens
        return logprobs.completion_logprobs(chunk.logprobs, self.tokens, choice.offset, skip, choice.sampled)


async def opensse(request: web.Request) -> web.StreamResponse:
    if (sink := request.get("sink")) is not None:  # a background response's events: kept, for any reader
        return cast(web.StreamResponse, sink)
    # The charset said, as vLLM and OpenAI say it: a client reading the stream as text (requests)
    # otherwise takes ISO-8859-1 and "Café" comes out "CafÃ©".
    headers = {"Content-Type": "text/event-stream; charset=utf-8", "Cache-Control": "no-cache"}
    resp = web.StreamResponse(headers=headers)
    await resp.prepare(request)
    return resp
