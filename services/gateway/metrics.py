"""Prometheus metrics of the gateway: requests and their latencies by adapter, as its clients saw
them (docs/metrics.md). Each worker, the dispatcher and the migrator export their own.

The gateway serves ``/metrics`` on its API port, to anyone who reaches it (as vLLM does), so an
adapter a tenant owns counts there under ``PRIVATE``, not its name: no caller learns another
tenant's adapter names (README, API keys). The status page (admin) and the workers' metrics
(``metrics_port``, for operators) keep the names."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Collection, Sequence
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Histogram
from redis.exceptions import RedisError

from dlora.common import log
from dlora.common.bus import STATE_OUTAGE, StateBound, every
from dlora.common.messages import ErrorCode, FinishReason, TokenChunk
from dlora.common.state import StateStore
from dlora.services.gateway.replies import ReplyStream
from dlora.services.gateway.responses_metrics import StoreCounts
from dlora.services.gateway.status import Traffic

if TYPE_CHECKING:
    from dlora.services.gateway.responses import RunningChoice

# The error ``Gateway.shutdown`` ends what still runs with (``Metrics.finished``: an abort)
SHUTTING_DOWN = "the gateway is shutting down"
logger = log.get("gateway")

# The adapter labels of every adapter a tenant owns (on the public /metrics) and of public adapters
# past ``max_adapter_labels``: no adapter's name (registry.py refuses parentheses), so a public
# adapter named "private" or "other" is not counted with them (a review).
PRIVATE = "(private)"
OTHER = "(other)"
# Seconds. Up to two hours, as vLLM's: ending at 60 s, every slower request (a long generation, a
# queue under overload) fell in +Inf and every quantile of a slow hour read 60.
_LATENCY = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 240.0, 480.0)
_LATENCY += (960.0, 1920.0, 7680.0)
# vLLM's own buckets for its names (vllm/v1/metrics/loggers.py), so that an SLO query on a bucket
# edge (le="0.5") reads a dlora gateway as it reads vLLM.
_VLLM_BUCKETS = {
    "time_to_first_token_seconds": (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0)
    + (2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0),
    "request_time_per_output_token_seconds": (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75)
    + (1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0),
    "e2e_request_latency_seconds": (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0)
    + (50.0, 60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0),
}
_VLLM_BUCKETS["inter_token_latency_seconds"] = _VLLM_BUCKETS["request_time_per_output_token_seconds"]
for _phase in ("queue", "prefill", "decode", "inference"):
    _VLLM_BUCKETS[f"request_{_phase}_time_seconds"] = _VLLM_BUCKETS["e2e_request_latency_seconds"]
# vLLM's per-request timings beyond ours, observed as vLLM observes them (vllm/v1/metrics/stats.py):
# the inter-token latency at each output after a choice's first, the rest as a choice finishes.
_VLLM_TIMES = (
    ("inter_token_latency_seconds", "Time between a choice's outputs after its first"),
    ("request_prefill_time_seconds", "Time from a choice's first step scheduled to its first token"),
    ("request_decode_time_seconds", "Time from a choice's first token to its last"),
    ("request_inference_time_seconds", "Time from a choice's first step scheduled to its last token"),
)
# vLLM's histograms of counts (buckets 1, 2, 5, 10, ... up to the model's context; n's its own)
_VLLM_COUNTS = (
    ("request_prompt_tokens", "Prompt tokens of a finished choice"),
    ("request_generation_tokens", "Tokens a finished choice generated"),
    ("request_params_max_tokens", "The max_tokens a finished choice ran with"),
    ("request_max_num_generation_tokens", "Tokens the longest choice of a finished request generated"),
    ("request_params_n", "The n of a finished request"),
)


def one_two_five(most: int) -> tuple[float, ...]:
    """1, 2, 5, 10, 20, 50, ... up to ``most`` (vLLM's ``build_1_2_5_buckets``), as floats."""
    out: list[float] = []
    scale = 1
    while True:
        for m in (1, 2, 5):
            if m * scale > most:
                return tuple(out)
            out.append(float(m * scale))
        scale *= 10


class Metrics:
    """The gateway's families; the latency histograms also under vLLM's names, labelled by the
    served base model's name ``model_name`` alone (as vLLM labels a LoRA request's: no adapter
    named, so no tenant's shows), so that vLLM dashboards' latency panels read a dlora gateway."""

    def __init__(self, model_name: str = "", max_adapter_labels: int = 256, max_model_len: int = 8192) -> None:
        self.registry = r = CollectorRegistry()
        self.model_name = model_name
        # Public adapters named in the series, first served first, until removed: ~89 series each,
        # and 4,000 adapters made 301,000 (22 MB a scrape; a helper's trial). The rest: ``OTHER``.
        self.max_adapter_labels = max_adapter_labels
        self._labelled: set[str] = set()
        self.requests = Counter(
            "dlora_requests", "Requests finished, by adapter and status", ["adapter", "status"], registry=r
        )
        # A dispatcher restarting, or none running: each such request was sent again (``hand_over``)
        self.dispatch_waits = Counter(
            "dlora_dispatch_waits", "Requests (each choice) that found no dispatcher and waited for one", registry=r
        )
        self.ttft = Histogram(
            "dlora_time_to_first_token_seconds",
            "Time to first token",
            ["adapter"],
            buckets=_LATENCY,
            unit="seconds",
            registry=r,
        )
        self.tpot = Histogram(
            "dlora_time_per_output_token_seconds",
            "Time per output token after the first",
            ["adapter"],
            buckets=_LATENCY,
            unit="seconds",
            registry=r,
        )
        self.e2e = Histogram(
            "dlora_e2e_request_latency_seconds",
            "End-to-end request latency",
            ["adapter"],
            buckets=_LATENCY,
            unit="seconds",
            registry=r,
        )
        self.queue = Histogram(
            "dlora_request_queue_time_seconds",
            "Time waiting at the worker before the first step",
            ["adapter"],
            buckets=_LATENCY,
            unit="seconds",
            registry=r,
        )
        # vLLM's (v1) names for the same figures: its request_time_per_output_token is, as ours, one
        # observation per request; its inter-token latency one per output after a choice's first.
        self.vllm = {
            name: Histogram(
                f"vllm:{name}", doc, ["model_name"], buckets=_VLLM_BUCKETS[name], unit="seconds", registry=r
            )
            for name, doc in (
                ("time_to_first_token_seconds", "Time to first token"),
                ("request_time_per_output_token_seconds", "Time per output token after the first, per request"),
                ("e2e_request_latency_seconds", "End-to-end request latency"),
                ("request_queue_time_seconds", "Time waiting at the worker before the first step"),
                *_VLLM_TIMES,
            )
        }
        tokens = one_two_five(max_model_len)
        self.vllm_counts = {
            name: Histogram(
                f"vllm:{name}",
                doc,
                ["model_name"],
                buckets=(1.0, 2.0, 5.0, 10.0, 20.0) if name == "request_params_n" else tokens,
                registry=r,
            )
            for name, doc in _VLLM_COUNTS
        }
        # (the one observed at every output: its child looked up once)
        self.itl = self.vllm["inter_token_latency_seconds"].labels(model_name)
        # vLLM's finished-request counter: one per request its engine ran (a choice here, as vLLM
        # runs each of n as a request), by how it ended; every reason from the start, as vLLM
        # declares them, so that a rate() of a reason not seen yet reads 0, not nothing.
        self.success = Counter(
            "vllm:request_success",
            "Requests the workers ran that finished, by finish reason",
            ["model_name", "finished_reason"],
            registry=r,
        )
        for reason in FinishReason:
            self.success.labels(model_name, reason.value)
        self.responses_store = StoreCounts(r)  # (the Responses API's stored responses)
        self.traffic = Traffic()  # the same, kept for the status page
        self._absent: set[str] = set()  # adapter labels unregistered at the last keep_only
        self._statuses: set[str] = set()  # those ``requests`` counted (``keep_only`` drops a label's)

    def label(self, name: str, public: bool = True) -> str:
        """The adapter label of adapter (or model) ``name``: ``PRIVATE`` for a tenant's own, the
        name itself for the base model and the first ``max_adapter_labels`` public adapters
        served (until removed: ``keep_only``), else ``OTHER``."""
        if not public:
            return PRIVATE
        if name in self._labelled or name in (self.model_name, "?"):
            return name
        if len(self._labelled) < self.max_adapter_labels:
            self._labelled.add(name)
            return name
        return OTHER

    def finished(self, ran: Sequence[ReplyStream]) -> None:
        """The requests ``ran`` (those a dispatcher took) are over: each counted in ``success`` by
        how it ended, one not ended by its worker (its client went, or another choice failed and it
        was aborted) as ``abort`` (vLLM declares the reason but leaves such requests uncounted:
        vllm-project/vllm#31503; counted here so the reasons sum to what ran). One refused with a 4xx
        (by the dispatcher: too long, an adapter gone) is not counted: vLLM refuses those before
        its engine runs them. One the gateway's stop cut (an UNAVAILABLE error from ``shutdown``)
        is an abort too, not an error: as an error, every rolling restart of gateways set off a
        dashboard's error-rate alert for requests nothing failed."""
        for replies in ran:
            reason = replies.finish_reason or FinishReason.ABORT
            # The stop's own error, not a flag set at the stop: an error the server made as the
            # gateway began to stop (its handler still writing it) stays an error
            if reason == FinishReason.ERROR and replies.error == SHUTTING_DOWN:
                reason = FinishReason.ABORT
            if reason == FinishReason.ERROR and replies.error_code in (ErrorCode.BAD_REQUEST, ErrorCode.NOT_FOUND):
                continue
            self.success.labels(self.model_name, reason.value).inc()

    def count(self, label: str, status: str) -> None:
        """One request over under adapter label ``label`` with ``status`` (``requests``)."""
        self.requests.labels(label, status).inc()
        self._statuses.add(status)

    def keep_only(self, adapters: Collection[str]) -> int:
        """Drop the series and the status page's traffic of adapter labels not among ``adapters``
        (the ones registered now), the base model, ``PRIVATE`` and "?" at this call and the one
        before: a Redis restarted empty, read before its registry was put back (seconds), drops
        nothing. Returns how many adapter labels' series went. Kept, each adapter name ever served
        held ~94 series for good (a helper: 14,609 after 150 adapters registered, used and
        deleted). The labels are those ``label`` named: no family's samples are read (on the
        event loop, every minute: reading the histograms' took 0.29 s at 256 labels, a helper's
        measure), and a series not there is no error to remove."""
        absent = (self._labelled | self.traffic.by_label.keys()) - {*adapters, self.model_name, PRIVATE, OTHER, "?"}
        drop, self._absent = absent & self._absent, absent
        for label in drop & self._labelled:
            for status in self._statuses:
                self.requests.remove(label, status)
            for histogram in self._ours:
                histogram.remove(label)
        self.traffic.by_label = {k: v for k, v in self.traffic.by_label.items() if k not in drop}
        gone = len(drop & self._labelled)
        self._labelled -= drop  # (their places free for others)
        return gone

    @property
    def _ours(self) -> tuple[Histogram, ...]:
        return self.ttft, self.tpot, self.e2e, self.queue

    def failed(self, name: str, status: int, public: bool = True) -> None:
        """A request for adapter (or model) ``name`` refused or failed with HTTP ``status``;
        ``public``: not an adapter a tenant owns (else counted under ``PRIVATE``)."""
        self.count(self.label(name, public), str(status))
        self.traffic.failed(name)


class RequestTimer:
    """One request's latency metrics, under its adapter's label (``Metrics.label``; the status
    page's traffic under its ``name``): time to first token and the worker's queue
    time at its first chunk; the 200, end-to-end latency and time per output token when it is
    done. Timed from ``start`` (monotonic seconds; None: now): the request's arrival, its body
    read, as vLLM's arrival time is taken before tokenizing (timed from its publishing, a request
    that waited seconds to be tokenized or for its grammar read as fast: a helper's finding).

    Ours time the request as its client saw it, once; vLLM's names time each choice as vLLM times
    each of ``n`` (its own request there): its own first chunk, and its own end as it finishes.
    Observed once a request, an ``n`` = 8 request weighed as one in every quantile, its time to
    first token the fastest of its eight, and the histograms' ``_count`` was not
    ``vllm:request_success_total``'s, which counts choices (a helper, from vLLM's
    ``IterationStats``)."""

    def __init__(self, metrics: Metrics, name: str, public: bool = True, start: float | None = None) -> None:
        self.metrics, self.name, self.public = metrics, name, public
        self.start = time.monotonic() if start is None else start
        self.first_at: float | None = None  # monotonic seconds of the first chunk
        # Each choice's first chunk: when, and its queue and prefill time at the worker
        self.choice_first: dict[str, tuple[float, float | None, float | None]] = {}
        self.choice_last: dict[str, float] = {}  # each choice's latest output with tokens (monotonic s)
        self.over = False  # counted in ``requests`` (its 200, its failure or its abort)
        self.ran: Sequence[ReplyStream] = ()  # its choices' replies, once a dispatcher took them
        self.handed: dict[str, RunningChoice] = {}  # those choices by request id (max_tokens, prompt)

    def began(self, handed: Sequence[RunningChoice]) -> None:
        """A dispatcher took ``handed``, the request's choices that run."""
        self.ran = [c.replies for c in handed if c.replies is not None]
        self.handed = {c.request.request_id: c for c in handed if c.request is not None}

    def __enter__(self) -> RequestTimer:
        return self

    def __exit__(self, kind: type[BaseException] | None, *_: object) -> None:
        """A handler cancelled in the block (its client gone) counts an abort, once: one gone while
        its prompt was tokenized or its grammar compiled, before the relay, was counted nowhere
        though the access log said 499 (a helper's finding). The choices that ran are counted by how
        they ended (``Metrics.finished``), here, after the relay's last chunk whichever way it left."""
        if kind is not None and issubclass(kind, asyncio.CancelledError):
            self.aborted()
        self.metrics.finished(self.ran)

    @property
    def label(self) -> str:
        """Its adapter's label now (``Metrics.label``): a place freed while it ran is taken again,
        not written outside the bound (a review)."""
        return self.metrics.label(self.name, self.public)

    def chunk(self, chunk: TokenChunk, tokens: int) -> None:
        """``chunk`` of a choice came (none a duplicate), the choice's ``tokens`` so far with it:
        the request's first chunk and each choice's first are timed, each later one with tokens
        (vLLM's inter-token latency, one per output), and each choice's end (stop or length) under
        vLLM's names, its queue time with it: vLLM observes that with its end-to-end latency, in
        one loop over the requests it counts finished (a choice whose client went after its first
        token is in neither)."""
        choice, now = chunk.request_id, time.monotonic()
        if choice not in self.choice_first:
            self._first(choice, now, chunk.queue_seconds, chunk.prefill_seconds)
        elif chunk.token_ids:
            self.metrics.itl.observe(now - self.choice_last[choice])
            self.choice_last[choice] = now
        if chunk.finish_reason in (FinishReason.STOP, FinishReason.LENGTH):
            self._finished(chunk, tokens, now)

    def _finished(self, chunk: TokenChunk, tokens: int, now: float) -> None:
        """A choice ended (stop or length) at ``now`` with ``tokens``: what vLLM observes of each
        request it counts finished (``IterationStats.update_from_finished_request``)."""
        m, choice = self.metrics, chunk.request_id
        first, queue_s, prefill_s = self.choice_first[choice]

        def observe(name: str, value: float) -> None:
            (m.vllm[name] if name in m.vllm else m.vllm_counts[name]).labels(m.model_name).observe(value)

        observe("e2e_request_latency_seconds", now - self.start)
        if queue_s is not None:
            observe("request_queue_time_seconds", queue_s)
        # Each finished choice, 0 for one of a token (as vLLM: its _count is e2e's)
        observe("request_time_per_output_token_seconds", (now - first) / (tokens - 1) if tokens > 1 else 0.0)
        decode_s = self.choice_last[choice] - first  # (to its last output with a token, as vLLM's)
        observe("request_decode_time_seconds", decode_s)
        if prefill_s is not None:  # (the worker's, from its first step to its first token)
            observe("request_prefill_time_seconds", prefill_s)
            observe("request_inference_time_seconds", prefill_s + decode_s)
        if chunk.usage is not None:
            observe("request_prompt_tokens", chunk.usage.prompt_tokens)
        observe("request_generation_tokens", tokens)
        if (ran := self.handed.get(choice)) is not None and ran.request is not None:
            observe("request_params_max_tokens", ran.request.params.max_tokens)

    def _first(self, choice: str, now: float, queue_s: float | None, prefill_s: float | None) -> None:
        """``choice``'s first chunk came at ``now``: its time to first token; the request's too,
        with its queue time, if it is the request's first."""
        m = self.metrics
        self.choice_first[choice] = (now, queue_s, prefill_s)
        self.choice_last[choice] = now
        m.vllm["time_to_first_token_seconds"].labels(m.model_name).observe(now - self.start)
        if self.first_at is not None:
            return
        self.first_at = now
        m.ttft.labels(self.label).observe(now - self.start)
        m.traffic.first_token(self.name, now - self.start)
        if queue_s is not None:
            m.queue.labels(self.label).observe(queue_s)

    def done(self, n_tokens: int, total_tokens: int) -> None:
        """Every choice is over; ``n_tokens``: the longest choice's, which bound the time per token;
        ``total_tokens``: every choice's."""
        end, m = time.monotonic(), self.metrics
        self.over = True
        m.count(self.label, "200")
        m.e2e.labels(self.label).observe(end - self.start)
        m.traffic.done(self.name, end - self.start, total_tokens)
        if self.first_at is not None and n_tokens > 1:
            m.tpot.labels(self.label).observe((end - self.first_at) / (n_tokens - 1))
        # vLLM's once a request, as its last choice finishes: a prompt of a completion's list is a
        # request of its own there, its n choices a parent's children
        by_prompt: dict[int, list[int]] = {}
        for replies in self.ran:
            ran = self.handed.get(replies.request_id)
            by_prompt.setdefault(ran.prompt if ran is not None else 0, []).append(replies.tokens)
        for tokens in by_prompt.values():
            m.vllm_counts["request_params_n"].labels(m.model_name).observe(len(tokens))
            m.vllm_counts["request_max_num_generation_tokens"].labels(m.model_name).observe(max(tokens))

    def failed(self, status: int) -> None:
        """It failed after its stream opened (an error event ended it)."""
        self.over = True
        self.metrics.failed(self.name, status, self.public)

    def aborted(self) -> None:
        """The client went away before the end: counted unless it was already (its handler's
        cancellation passes the relay's count on to the handler's; a client gone as its failure
        was written is that failure, not an abort too)."""
        if not self.over:
            self.over = True
            self.metrics.count(self.label, "aborted")
            self.metrics.traffic.aborted(self.name)  # (the status page's "aborted": it left them out)


async def keep_tidy(
    metrics: Metrics, store: StateStore, bound: StateBound, stop: asyncio.Event, every_s: float = 60.0
) -> None:
    """``metrics.keep_only`` the adapters registered now (read within ``bound``) every ``every_s``
    until ``stop`` (a gateway's task); a round that fails (Redis away) is tried at the next."""
    async for _ in every(every_s, stop):
        try:
            async with bound():
                registered = [entry.name for entry in await store.list_adapters()]
            metrics.keep_only(registered)
        except (*STATE_OUTAGE, RedisError):  # Redis away: the next round
            pass
        except Exception as e:  # noqa: BLE001 - any other: logged, the task goes on (it ended unseen)
            logger.warning("metrics of removed adapters not dropped", error=f"{type(e).__name__}: {e}")
