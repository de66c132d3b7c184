"""Streaming load through the gateway, one record per request: what was asked, what came back
(status, every event's text, the finish reason, the usage, the longest wait between two events),
and whether a retry was needed. The client retries as the official ``openai`` package does by
default (twice, on 429/503 and on a refused connection, after ``Retry-After`` when the server
gives one), so a fault the service answers "try again shortly" is not counted as a failure when
trying again works; every retry is recorded with its reason.

Probes are greedy requests whose whole text is known beforehand (``oracle``: the same model and
adapters run offline, in this process), so a stream that lost, repeated or changed a token shows.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from dlora.loadgen.workload import RequestSpec, prompt_ids

_RETRIED_STATUSES = (429, 503)
_MAX_RETRY_AFTER_S = 60.0  # the openai package honours a Retry-After up to this


@dataclass(frozen=True)
class Ask:
    kind: str  # "load", "probe" or "canary"
    index: int
    adapter: str | None  # None: the base model
    prompt: list[int]
    max_tokens: int
    expected: str | None = None  # probes: the offline oracle's text


@dataclass
class Outcome:
    ask: Ask
    phase: str
    sent_at: float  # monotonic
    gateway_gen: int  # which gateway process the first try went to
    retried: list[str] = field(default_factory=list)  # why each earlier try was retried
    status: int | None = None
    finish_reason: str | None = None
    error: str | None = None
    text: str = ""
    # the text's length after each event: an event carries one chunk, numbered from 0 (its seq)
    text_ends: list[int] = field(default_factory=list)
    tokens: int = 0  # the usage's completion tokens
    events: int = 0
    done_marker: bool = False  # "data: [DONE]" came
    first_at: float | None = None
    last_at: float | None = None
    max_gap_s: float = 0.0  # longest wait between two events (a stall the client saw)
    cmpl_id: str | None = None
    broke_at: float | None = None  # when the connection broke under the stream
    ended_at: float | None = None  # when the client was done with it, whatever the outcome

    @property
    def request_id(self) -> str | None:
        """The id the gateway gave its (single) choice on the bus."""
        return None if self.cmpl_id is None else f"{self.cmpl_id}-0"

    @property
    def finished(self) -> bool:
        return self.ended_at is not None

    @property
    def completed(self) -> bool:
        """HTTP 200, every token asked for, a finish reason, the stream's end, and no error."""
        return (
            self.status == 200
            and self.error is None
            and self.finish_reason in ("length", "stop")
            and self.done_marker
            and self.tokens == self.ask.max_tokens
        )

    @property
    def reason(self) -> str | None:
        """Why it did not complete (None if it did)."""
        if self.completed:
            return None
        if self.error is not None:
            return self.error
        if self.ended_at is None:
            return "still running"
        if not self.done_marker:
            return f"the stream ended without [DONE] after {self.events} events"
        return f"{self.tokens} of {self.ask.max_tokens} tokens, finish_reason {self.finish_reason}"

    @property
    def exact(self) -> bool | None:
        """Probes: whether the text is the oracle's; None for other requests."""
        return None if self.ask.expected is None else self.text == self.ask.expected


def _backoff(attempt: int, resp: aiohttp.ClientResponse | None) -> float:
    """The openai package's wait before retry ``attempt`` (0-based): the server's Retry-After when
    it gives a sane one, else 0.5 s doubling up to 8 s, less up to a quarter of jitter."""
    if resp is not None:
        try:
            after = float(resp.headers.get("Retry-After", ""))
            if 0 < after <= _MAX_RETRY_AFTER_S:
                return float(after)
        except ValueError:
            pass
    return min(0.5 * 2.0**attempt, 8.0) * (1 - 0.25 * random.random())


class StreamClient:
    def __init__(
        self, url: str, base_model: str, gateway_gen: Callable[[], int], retries: int = 2, timeout_s: float = 180
    ) -> None:
        self.url, self.base_model, self.gateway_gen, self.retries = url, base_model, gateway_gen, retries
        self.session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=timeout_s), connector=aiohttp.TCPConnector(limit=0)
        )

    def body(self, ask: Ask) -> dict[str, Any]:
        return {
            "model": ask.adapter or self.base_model,
            "prompt": ask.prompt,
            "max_tokens": ask.max_tokens,
            "temperature": 0,
            "ignore_eos": True,
            "stream": True,
            "stream_options": {"include_usage": True},
        }

    async def send(self, o: Outcome) -> None:
        try:
            await self._send(o)
        finally:
            o.ended_at = time.monotonic()

    async def _send(self, o: Outcome) -> None:
        for attempt in range(self.retries + 1):
            last = attempt == self.retries
            try:
                async with self.session.post(f"{self.url}/v1/completions", json=self.body(o.ask)) as resp:
                    if resp.status in _RETRIED_STATUSES and not last:
                        o.retried.append(f"HTTP {resp.status}: {(await resp.text())[:160]}")
                        await asyncio.sleep(_backoff(attempt, resp))
                        continue
                    o.status = resp.status
                    if resp.status != 200:
                        o.error = f"HTTP {resp.status}: {(await resp.text())[:200]}"
                        return
                    await self._read(resp, o)
                    return
            except aiohttp.ClientConnectorError as e:  # refused: the request reached no gateway
                if not last:
                    o.retried.append(f"connect: {type(e).__name__}")
                    await asyncio.sleep(_backoff(attempt, None))
                    continue
                o.error = f"{type(e).__name__}: {e}"
                return
            except (aiohttp.ClientError, TimeoutError) as e:  # broke mid-request
                o.error, o.broke_at = f"{type(e).__name__}: {e}", time.monotonic()
                return

    async def _read(self, resp: aiohttp.ClientResponse, o: Outcome) -> None:
        async for raw in resp.content:
            line = raw.decode().strip()
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                o.done_marker = True
                break
            now = time.monotonic()
            event = json.loads(line[6:])
            if "error" in event:
                o.error = event["error"].get("message") or "error event"
                return
            o.cmpl_id = o.cmpl_id or event.get("id")
            if event.get("usage"):
                o.tokens = event["usage"]["completion_tokens"]
                continue
            if o.last_at is not None:
                o.max_gap_s = max(o.max_gap_s, now - o.last_at)
            o.first_at = o.first_at or now
            o.last_at = now
            o.events += 1
            choice = event["choices"][0]
            o.text += choice.get("text") or ""
            o.text_ends.append(len(o.text))
            o.finish_reason = choice.get("finish_reason") or o.finish_reason

    async def close(self) -> None:
        await self.session.close()


def probe_asks(adapters: list[str | None], count: int, tokens: int) -> list[Ask]:
    """``count`` greedy probes over the base model and the adapters in turn, long enough to be
    running when a fault hits (their expected text comes from ``oracle``)."""
    out = []
    for k in range(count):
        adapter = adapters[k % len(adapters)]
        spec = RequestSpec(0.0, adapter, prompt_len=6 + 3 * (k % 5), output_len=tokens)
        out.append(Ask("probe", k, adapter, prompt_ids(10_000 + k, spec), tokens))
    return out


def oracle(model: Path, adapters: dict[str, Path], asks: list[Ask]) -> list[Ask]:
    """The asks with their expected text: the same model and adapters run offline, one engine, in
    this process (what the tests call the offline oracle)."""
    from dlora.services.worker.engine import LLMEngine
    from dlora.services.worker.engine.offline import generate_lines

    engine = LLMEngine(str(model))
    for name, path in adapters.items():
        engine.register_adapter(name, str(path))
    lines = [
        json.dumps(
            {
                "id": str(i),
                "adapter": a.adapter,
                "prompt_token_ids": a.prompt,
                "max_tokens": a.max_tokens,
                "ignore_eos": True,
            }
        )
        for i, a in enumerate(asks)
    ]
    results = generate_lines(engine, lines)
    return [Ask(a.kind, a.index, a.adapter, a.prompt, a.max_tokens, r["text"]) for a, r in zip(asks, results)]


@dataclass
class LoadShape:
    rate: float = 1.5  # requests per second, Poisson
    prompt_tokens: tuple[int, int] = (8, 24)
    output_tokens: tuple[int, int] = (16, 64)


class Traffic:
    """Open-loop load (sending never waits for answers) plus probes sent on demand; every request
    is recorded under the phase it was sent in."""

    def __init__(self, client: StreamClient, adapters: list[str | None], shape: LoadShape, seed: int = 0) -> None:
        self.client, self.adapters, self.shape = client, adapters, shape
        self.rng = random.Random(seed)
        self.outcomes: list[Outcome] = []
        self.phase = ""
        self._tasks: set[asyncio.Task[None]] = set()
        self._sender: asyncio.Task[None] | None = None
        self._index = 0

    def send(self, ask: Ask) -> Outcome:
        o = Outcome(ask, self.phase, time.monotonic(), self.client.gateway_gen())
        self.outcomes.append(o)
        task = asyncio.create_task(self.client.send(o))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return o

    def next_ask(self) -> Ask:
        i, rng, shape = self._index, self.rng, self.shape
        self._index += 1
        adapter = rng.choice(self.adapters)
        spec = RequestSpec(0.0, adapter, rng.randint(*shape.prompt_tokens), rng.randint(*shape.output_tokens))
        return Ask("load", i, adapter, prompt_ids(i, spec), spec.output_len)

    def start(self) -> None:
        self._sender = asyncio.create_task(self._send_forever())

    async def _send_forever(self) -> None:
        while True:
            self.send(self.next_ask())
            await asyncio.sleep(self.rng.expovariate(self.shape.rate))

    async def pause(self) -> None:
        """Stop sending (what was sent runs on)."""
        if self._sender is not None:
            self._sender.cancel()
            await asyncio.gather(self._sender, return_exceptions=True)
            self._sender = None

    async def drain(self, limit_s: float) -> None:
        """Wait for every request sent to end; past ``limit_s`` the rest are cancelled and marked."""
        if self._tasks:
            _, pending = await asyncio.wait(set(self._tasks), timeout=limit_s)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        for o in self.outcomes:
            if not o.finished:
                o.error = f"no answer within the drain timeout ({limit_s:.0f} s)"
