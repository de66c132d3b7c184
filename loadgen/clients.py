"""Send one request and record what came back, against the gateway (HTTP, streamed, so the first
token is timed) or straight to the NATS request subject."""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import json
import os
import time
import urllib.parse
import uuid
from collections.abc import AsyncIterable, AsyncIterator, Callable, Mapping, Sequence

import aiohttp
import msgspec
import nats

from dlora.common import subjects
from dlora.common.messages import GenerateRequest, SamplingParams, TokenChunk
from dlora.common.urls import redacted
from dlora.loadgen.metrics import RequestResult
from dlora.loadgen.workload import RequestSpec, prompt_ids


class HttpClient:
    """OpenAI completions (or chat completions) with ``stream: true``; ``model`` is the adapter (or
    the base name). A chat stream's events are read as a completion's: each with ``choices`` is a
    token's (``delta.content``, "" too: a token whose text is held back), but for the role's opening.

    With ``max_retries`` it retries what the official ``openai`` package retries that a gateway
    answers when it cannot serve now (its default is 2 retries; it also retries 408, 409, other
    5xx and timeouts): a 429 or 503 before the stream starts, or a refused connection, is tried
    again after the response's ``Retry-After`` (at most 60 s) or else 0.5 s doubling up to 8 s;
    a stream that broke after it started is not retried (it counts as failed)."""

    def __init__(
        self,
        url: str,
        base_model: str,
        clock: Callable[[], float],
        timeout_s: float | None = None,
        max_retries: int = 0,
        api_key: str | None = None,
        chat_text: Callable[[int, list[int]], str] | None = None,
        ignore_eos: bool = True,
        count_tokens: Callable[[str], int] | None = None,
        sampling: Mapping[str, object] | None = None,
        prompt_vocab: Sequence[int] | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        self.url, self.base_model, self.clock, self.max_retries = url.rstrip("/"), base_model, clock, max_retries
        # vLLM's --ignore-eos (which its random dataset turns on, as the workload's prompts are random):
        # off, the field is not sent at all, for servers that refuse it (OpenAI's answers 400 to it)
        self.ignore_eos = ignore_eos
        # Output tokens where the server's usage says none (vLLM's bench counts the generated text's
        # tokens with its tokenizer); None: one a streamed event
        self.count_tokens = count_tokens
        # vLLM's --temperature/--top-p/--top-k and --extra-body, over loadgen's greedy default, each
        # request's own fields last (an extra body does not change the prompt or its length)
        self.sampling = {"temperature": 0} | dict(sampling or {})
        # vLLM's --backend openai-chat: the prompt's ids as text (their tokenizer's decode) in one user
        # message, through the server's chat template and tokenizer; None: ids to /v1/completions.
        self.chat_text = chat_text
        # The target's tokenizer's ordinary ids, which the prompts are drawn from (``prompt_ids``'s
        # ``ids``); None: 3..255, where no tokenizer is known
        self.prompt_vocab = prompt_vocab
        key = api_key if api_key is not None else os.environ.get("OPENAI_API_KEY")
        given = dict(headers or {})
        if any(name.lower() == "authorization" for name in given):  # (names are case-insensitive: both were sent)
            key = None
        # No deadline of its own by default: the run bounds each request (its duration and grace, then
        # cut), and a shorter one counted a request a long queue kept past it as failed.
        self.session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=timeout_s),
            connector=aiohttp.TCPConnector(limit=0),
            # vLLM's --header over the key's, as its bench merges them: on every request, the model list's too
            headers=({"Authorization": f"Bearer {key}"} if key else {}) | given,
        )

    async def served_models(self, on_retry: Callable[[str, float], None] | None = None) -> set[str]:
        """The model ids the target serves (``GET /v1/models``), asked once before the run, as
        vLLM's benchmark sends a first request: a wrong URL, a server that is not OpenAI-compatible
        or a refused key ran the whole schedule of failures. A refused connection, a 429 or a 503
        is tried again as a request is (``max_retries``, the same waits): a gateway that was
        starting or restarting stopped the run before it began. ``on_retry(reason, wait_s)`` is
        told of each retry before its wait.

        Raises:
            OSError: it cannot be reached (after ``max_retries`` retries, which it names), or does
                not answer as an OpenAI-compatible server.
        """
        url = f"{self.url}/v1/models"
        attempt = 0
        while True:
            try:
                async with self.session.get(url, timeout=aiohttp.ClientTimeout(total=30)) as resp:
                    text = await resp.text()
                    if resp.status == 200:
                        return {m["id"] for m in json.loads(text)["data"]}
                    reason = f"{url} answered HTTP {resp.status}: {text[:200]}"
                    if (wait_s := self._retry_wait(attempt, resp)) is None:
                        # the openai package's base_url ends in /v1, and users give loadgen that one
                        hint = ": --target is the server's root, without /v1" if self.url.endswith("/v1") else ""
                        raise OSError(
                            f"{url} answered HTTP {resp.status}{_tries(attempt, self.max_retries)}{hint}: {text[:200]}"
                        )
            except aiohttp.ClientConnectorError as e:  # refused: nothing was sent
                reason = f"cannot reach {url}: {type(e).__name__}: {e}"
                if (wait_s := self._retry_wait(attempt)) is None:
                    raise OSError(f"{reason}{_tries(attempt, self.max_retries)}") from None
            except (aiohttp.ClientError, TimeoutError) as e:
                raise OSError(f"cannot reach {url}: {type(e).__name__}: {e}") from None
            except (ValueError, KeyError, TypeError):
                raise OSError(f"{url} is not an OpenAI-compatible model list: {text[:200]!r}") from None
            if on_retry is not None:
                on_retry(reason, wait_s)
            await asyncio.sleep(wait_s)
            attempt += 1

    def _retry_wait(self, attempt: int, resp: aiohttp.ClientResponse | None = None) -> float | None:
        """Seconds to wait after try ``attempt`` (from 0) before the next: the answer's Retry-After,
        else 0.5 s doubling to 8 s; None where there is no next: the ``max_retries`` are spent, or
        ``resp`` is an answer other than 429 or 503 (``resp`` None: a refused connection, retried)."""
        if attempt >= self.max_retries or (resp is not None and resp.status not in (429, 503)):
            return None
        after = retry_after_s(resp.headers) if resp is not None else None
        return after or min(0.5 * 2**attempt, 8.0)

    def body(self, index: int, spec: RequestSpec) -> tuple[str, dict]:
        """The endpoint and the request body of request ``index``: vLLM's benchmark's for its
        ``openai`` backend (completions, here of token ids) or its ``openai-chat`` backend."""
        common = (
            self.sampling
            | {"model": spec.adapter or self.base_model, "stream": True, "stream_options": {"include_usage": True}}
            | ({"ignore_eos": True} if self.ignore_eos else {})
        )
        ids = prompt_ids(index, spec, ids=self.prompt_vocab)
        if self.chat_text is None:
            return "/v1/completions", common | {"prompt": ids, "max_tokens": spec.output_len}
        # vLLM's openai-chat sends the prompt as a list of content parts (one text part), not a string
        message = {"role": "user", "content": [{"type": "text", "text": self.chat_text(index, ids)}]}
        return "/v1/chat/completions", common | {"messages": [message], "max_completion_tokens": spec.output_len}

    async def send(self, index: int, spec: RequestSpec, r: RequestResult) -> None:
        endpoint, body = self.body(index, spec)
        for attempt in range(self.max_retries + 1):
            try:
                async with self.session.post(f"{self.url}{endpoint}", json=body) as resp:
                    if resp.status != 200:
                        r.error = f"HTTP {resp.status}: {(await resp.text())[:200]}"
                        if (wait_s := self._retry_wait(attempt, resp)) is None:
                            return
                    else:
                        r.error, other = None, list[str]()
                        await self._read(resp, r, other)
                        # One whole answer (the server ignored "stream"), told by what came, not by the
                        # header: a stream labelled application/json is read, as the openai package does
                        if r.first_token_s is None and r.error is None and other and other[0].lstrip().startswith("{"):
                            r.error = (
                                "HTTP 200 with one JSON answer, not a stream of events: the target does not stream "
                                f"completions, so no first token can be timed: {''.join(other)[:200]}"
                            )
                        return
            except aiohttp.ClientConnectorError as e:  # refused: nothing was sent
                r.error = f"{type(e).__name__}: {e}"
                if (wait_s := self._retry_wait(attempt)) is None:
                    return
            except (TimeoutError, aiohttp.ClientError) as e:
                r.error = f"{type(e).__name__}: {e}"
                return
            r.retry_reasons.append(f"{self.clock():.3f} s: {r.error}")
            await asyncio.sleep(wait_s)

    async def _read(self, resp: aiohttp.ClientResponse, r: RequestResult, other: list[str] | None = None) -> None:
        """The events of one streamed completion into ``r``. As OpenAI's and vLLM's clients read
        them: ``data:`` with or without its space (the SSE standard's), an event's ``choices`` read
        whatever else it holds (llama.cpp's last chunk and vLLM's continuous usage carry usage
        beside them; Azure's first carries none), its usage's completion tokens where a number,
        an ``"error": null`` no error. ``other``: the start of what came that is no event."""
        counted: int | None = None  # completion tokens the server's usage says
        said: list[str] = []  # every piece of text streamed, reasoning too: what count_tokens counts
        async for data in _events(resp.content, other):
            if data.strip() == "[DONE]":
                continue
            if not isinstance(event := json.loads(data), dict):
                raise ValueError(f"an event that is not a JSON object: {data[:100]!r}")
            if error := event.get("error"):  # OpenAI's {"error": {"message": ...}}, or a server's own string
                r.error = str(error.get("message", error) if isinstance(error, dict) else error)
                return
            now = self.clock()
            usage = event.get("usage") or {}
            if isinstance(tokens := usage.get("completion_tokens"), int) and not isinstance(tokens, bool):
                counted = tokens
            # Chat: the server's count, its template's tokens with the text's (the text re-encoded
            # need not give the ids it was decoded from either), as vLLM's benchmark reads it.
            prompt = usage.get("prompt_tokens")
            if self.chat_text is not None and isinstance(prompt, int) and not isinstance(prompt, bool):
                r.prompt_len = prompt
            if not (choices := event.get("choices")) or _opening(choices[0]):
                continue
            if r.first_token_s is None:
                r.first_token_s = now
            r.token_times.append(now)
            r.tokens = len(r.token_times)  # so far: a stream cut off keeps what it got (NATS's does)
            _read_text(choices[0], r, said)
            if choices[0].get("finish_reason") is not None:
                r.finish_s = now
        if counted is not None:
            r.tokens = counted
        elif self.count_tokens is not None and said:
            # A server that ignores include_usage (or sends a null count) and streams several tokens an
            # event: counted by events, each such output read short (and its TPOT long)
            r.tokens = self.count_tokens("".join(said))

    async def close(self) -> None:
        await self.session.close()


def _read_text(choice: dict, r: RequestResult, said: list[str]) -> None:
    """A completion's ``text`` or a chat delta's ``content`` onto ``r.pieces`` (vLLM's
    generated_text), and with a reasoning parser's ``reasoning``/``reasoning_content`` onto ``said``."""
    delta = choice.get("delta")
    parts = {"text": choice.get("text")} if not isinstance(delta, dict) else delta
    for key in ("text", "content", "reasoning", "reasoning_content"):
        if isinstance(piece := parts.get(key), str) and piece:
            said.append(piece)
            if key in ("text", "content"):
                r.pieces.append(piece)


def _opening(choice: dict) -> bool:
    """A chat stream's first event, the role alone (``"content": ""``), which vLLM's and dlora's
    servers send before the first token's: no token (counted, every request had one ITL too many
    and, from a server that sends it on accepting the request, a TTFT of no token). Its other
    fields empty or null count as absent: OpenAI's says ``"refusal": null``, SGLang's
    ``"reasoning_content"`` and ``"tool_calls"`` null (read as tokens, each request had one too many)."""
    delta = choice.get("delta")
    return (
        isinstance(delta, dict)
        and "role" in delta
        and not any(value for key, value in delta.items() if key != "role")
        and choice.get("finish_reason") is None
    )


async def _events(lines: AsyncIterable[bytes], other: list[str] | None = None) -> AsyncIterator[str]:
    """The data of each server-sent event: its ``data:`` lines (their space after the colon
    optional) joined by newlines, an event ending at a blank line (the SSE standard's, as the
    openai package's SSEDecoder reads it; the last one at the stream's end too). The first lines
    that are none of these go to ``other`` (a whole answer's, to be named)."""
    data: list[str] = []
    async for raw in lines:
        line = raw.decode().rstrip("\r\n")
        if line.startswith("data:"):
            data.append(line[5:].removeprefix(" "))
        elif not line and data:
            yield "\n".join(data)
            data = []
        elif line and other is not None and sum(map(len, other)) < 200:
            other.append(line[:200])
    if data:
        yield "\n".join(data)


def _tries(attempt: int, max_retries: int) -> str:
    """What an error after ``attempt`` retries adds: how many tries it was (none where one), of
    the ``max_retries`` given (an answer not retried, a 404 after a 503, may end them sooner)."""
    return f" (after {attempt + 1} tries, --max-retries {max_retries})" if attempt else ""


def retry_after_s(headers: Mapping[str, str]) -> float | None:
    """How long a 429 or 503 asks to wait, as the openai package reads it (its
    ``_calculate_retry_timeout``): ``retry-after-ms``, else ``Retry-After`` in seconds (a fraction
    too: ``3.5`` was read as no wait) or as an HTTP date; None where absent or outside (0, 60]."""
    try:
        seconds = float(headers.get("retry-after-ms", "")) / 1000
    except ValueError:
        value = headers.get("Retry-After", "")
        try:
            seconds = float(value)
        except ValueError:
            try:
                seconds = email.utils.parsedate_to_datetime(value).timestamp() - time.time()
            except (TypeError, ValueError):
                return None
    return seconds if 0 < seconds <= 60 else None


class NatsClient:
    """GenerateRequest on the request subject; TokenChunks on one reply subscription for the run."""

    def __init__(
        self,
        nc: nats.NATS,
        clock: Callable[[], float],
        user: str = "app",
        ignore_eos: bool = True,
        sampling: Mapping[str, float] | None = None,
        prompt_vocab: Sequence[int] | None = None,
    ) -> None:
        self.nc, self.clock, self.ignore_eos = nc, clock, ignore_eos
        self.sampling = dict(sampling or {})  # SamplingParams' temperature, top_p, top_k where given
        # The model's tokenizer's ordinary ids, which the prompts are drawn from (``prompt_ids``'s
        # ``ids``), as HttpClient's; None: 3..255, where no tokenizer is known
        self.prompt_vocab = prompt_vocab
        # Replies under the NATS user's own subjects (the only ones it may read where the server
        # has users: common/permissions.py), then this run's.
        self.owner = f"{user}.loadgen{uuid.uuid4().hex[:8]}"
        self.subject = subjects.requests_of(user)  # the only one it may publish requests on
        self.waiting: dict[str, tuple[RequestResult, asyncio.Event]] = {}
        # The number of each request's next chunk: after a resume or a NATS reconnect a worker
        # sends chunks again, which must not count twice.
        self.next_seq: dict[str, int] = {}

    @classmethod
    async def connect(
        cls,
        url: str,
        clock: Callable[[], float],
        ignore_eos: bool = True,
        sampling: Mapping[str, float] | None = None,
        prompt_vocab: Sequence[int] | None = None,
    ) -> NatsClient:
        """Connected to ``url``, or OSError with the server's last word after two retries (a wrong
        password or a server that is not there: nats-py's defaults retried for two minutes, printing
        a traceback a second)."""
        errors: list[Exception] = []

        async def on_error(e: Exception) -> None:
            errors.append(e)

        made: list[NatsClient] = []

        async def on_closed() -> None:  # gave up reconnecting: what waits will get no answer
            for client in made:
                client.fail_waiting("the NATS connection closed (the server went away)")

        try:
            nc = await nats.connect(
                url, error_cb=on_error, closed_cb=on_closed, max_reconnect_attempts=2, reconnect_time_wait=0.5
            )
        except (nats.errors.Error, OSError) as e:
            last = errors[-1] if errors else e
            reason = str(last) or type(last).__name__  # some of nats-py's errors say nothing
            raise OSError(f"cannot connect to NATS at {redacted(url)}: {reason}") from None
        client = cls(nc, clock, urllib.parse.urlsplit(url).username or "app", ignore_eos, sampling, prompt_vocab)
        made.append(client)
        await client.nc.subscribe(subjects.replies_of(client.owner), cb=client._on_chunk)
        return client

    async def _on_chunk(self, msg) -> None:
        chunk = msgspec.json.decode(msg.data, type=TokenChunk)
        entry = self.waiting.get(chunk.request_id)
        if entry is None:
            return
        r, done = entry
        if chunk.error is None and chunk.seq < self.next_seq.get(chunk.request_id, 0):
            return
        self.next_seq[chunk.request_id] = chunk.seq + 1
        now = self.clock()
        if chunk.error:
            r.error = chunk.error
            done.set()
            return
        if r.first_token_s is None:
            r.first_token_s = now
        r.tokens += len(chunk.token_ids)
        if chunk.text:  # the worker's detokenized text (vllm-result.json's generated_texts)
            r.pieces.append(chunk.text)
        r.token_times.append(now)
        if chunk.finish_reason:
            r.finish_s = now
            done.set()

    async def send(self, index: int, spec: RequestSpec, r: RequestResult) -> None:
        rid = uuid.uuid4().hex
        done = asyncio.Event()
        self.waiting[rid] = (r, done)
        req = GenerateRequest(
            request_id=rid,
            reply_to=subjects.reply_inbox(rid, self.owner),
            adapter=spec.adapter,
            prompt_token_ids=prompt_ids(index, spec, ids=self.prompt_vocab),
            created=time.time(),
            params=msgspec.convert(
                self.sampling | {"max_tokens": spec.output_len, "ignore_eos": self.ignore_eos}, SamplingParams
            ),
        )
        try:
            await self.nc.publish(self.subject, msgspec.json.encode(req))
            await done.wait()
        finally:
            del self.waiting[rid]
            self.next_seq.pop(rid, None)

    def fail_waiting(self, reason: str) -> None:
        for r, done in self.waiting.values():
            r.error = r.error or reason
            done.set()

    async def close(self) -> None:
        if not self.nc.is_closed:
            with contextlib.suppress(nats.errors.Error, OSError):  # it closed as it drained: nothing left
                await self.nc.drain()
