"""The cluster as one gateway sees it, for ``GET /v1/status`` and the ``/dashboard`` page: each
live worker's mode, merged adapter, queues, KV usage and adapters (from their stats on the bus),
where each adapter lives, the migrator's recent plans (from ``subjects.MOVES``), and the traffic
and latency this gateway measured per adapter.

``ClusterView`` and ``Traffic`` keep what was heard; ``cluster_status`` is the pure core that
turns them into the document (``ClusterStatus``, described in the gateway's OpenAPI document).
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import msgspec

from dlora.common.messages import AdapterEntry, MovePlan, WorkerStats

RECENT_PLANS = 20  # plans kept for the page
RECENT_LATENCIES = 200  # latencies kept per adapter for its percentiles


class AdapterPlace(msgspec.Struct, kw_only=True):
    name: str
    tier: str  # "gpu": in a device slot or merged into the device's weights; "cpu": in host memory only
    slot: int | None
    merged: bool


class WorkerStatus(msgspec.Struct, kw_only=True):
    worker: str
    incarnation: str
    draining: bool
    device: str
    dtype: str
    # How it runs: its last step's mode ("merged", "unmerged", "mixed"; "" before any step), or
    # "idle" when it holds no request (its last step's mode then no longer says anything).
    mode: str
    merged: str | None  # the adapter merged into its weights now
    running: int
    waiting: int
    kv_cache_usage: float  # fraction of its KV blocks in use, 0 to 1
    free_blocks: int
    total_blocks: int
    max_loras: int  # device slots for adapters
    seconds_per_token: float  # measured step time per generated token
    adapter_read_seconds: float  # measured: an adapter's read into host memory (0: none yet)
    adapter_read_bytes: float  # the mean bytes of those reads' files (0: none yet)
    # the seconds a byte more on the line fitted to them (None: priced in proportion to the bytes)
    adapter_read_seconds_per_byte: float | None
    # output tokens its recent requests took, as 16 quantiles (empty before 8 finished): what
    # dispatch prices a new request's output at
    output_tokens_quantiles: list[int]
    steps: int
    preemptions: int
    adapters: list[AdapterPlace]
    stats_age_s: float  # how old its latest stats are
    # Its base model's digest (``model.config.model_digest``; "": an older worker): one unlike the
    # gateway's (``ClusterStatus.model_digest``) gets none of its requests.
    model_digest: str = ""


class AdapterStatus(msgspec.Struct, kw_only=True):
    name: str  # the base model's served name for the base model
    base: bool
    rank: int
    version: str
    placement: dict[str, str]  # worker -> tier ("gpu" or "cpu") where it is loaded
    running: int  # requests running for it across the workers now
    waiting: int
    # What this gateway served for it since it started: requests answered in full, failed, and
    # aborted (their client gone before the end; vLLM counts them finished, finished_reason
    # "abort"): the three sum to its dlora_requests_total.
    requests: int
    errors: int
    tokens: int
    ttft_p50_s: float | None  # over its last RECENT_LATENCIES requests
    ttft_p90_s: float | None
    e2e_p50_s: float | None
    e2e_p90_s: float | None
    aborted: int = 0


class ClusterStatus(msgspec.Struct, kw_only=True):
    time: float  # Unix seconds
    model: str  # the base model's served name
    gateway: str  # this gateway's id: traffic and latency are what it served
    workers: list[WorkerStatus]
    adapters: list[AdapterStatus]
    migrations: list[MovePlan]  # the migrator's plans as it published them, newest first
    model_digest: str = ""  # the gateway's base model's (``model.config.model_digest``)


FORGET_AFTER_TTLS = 10  # heartbeat TTLs of silence after which a worker is forgotten here


class ClusterView:
    """The latest stats of every worker heard from, and the migrator's recent plans."""

    def __init__(self) -> None:
        self.workers: dict[str, tuple[WorkerStats, float]] = {}  # worker -> (stats, monotonic when)
        self.plans: deque[MovePlan] = deque(maxlen=RECENT_PLANS)
        self._stepped: dict[str, float] = {}  # worker -> when its step count was last seen to move

    def heard(self, st: WorkerStats, now: float) -> None:
        before = self.workers.get(st.worker)
        if before is None or before[0].steps != st.steps:  # first heard counts as a step
            self._stepped[st.worker] = now
        self.workers[st.worker] = (st, now)

    def planned(self, plan: MovePlan) -> None:
        self.plans.appendleft(plan)

    def stepped_since(self, worker: str, since: float) -> bool:
        """Whether ``worker`` was seen to step after ``since`` (monotonic seconds): heard from
        since then with a step count that moved. Nothing more is asked of how recently: a loaded
        host delivers stats late, and a worker heard stepping since the last check is alive."""
        return self._stepped.get(worker, -math.inf) > since

    def live(self, now: float, ttl_s: float) -> list[tuple[WorkerStats, float]]:
        """(stats, age in seconds) of the workers heard from within ``ttl_s``; those not heard
        from for ``FORGET_AFTER_TTLS`` of it are forgotten (every worker id ever seen was kept:
        a replaced host's new id, an autoscaled one's)."""
        for worker in [w for w, (_, at) in self.workers.items() if now - at > FORGET_AFTER_TTLS * ttl_s]:
            del self.workers[worker]
            self._stepped.pop(worker, None)
        return [(st, now - at) for st, at in self.workers.values() if now - at <= ttl_s]


Percentiles = tuple[float | None, float | None, float | None, float | None]  # TTFT P50, P90; e2e P50, P90
_NONE: Percentiles = (None, None, None, None)
Figures = tuple[int, int, int, int, Percentiles]  # requests, errors, aborted, tokens, latency percentiles
_NO_FIGURES: Figures = (0, 0, 0, 0, _NONE)


@dataclass
class _Tally:
    requests: int = 0
    errors: int = 0
    aborted: int = 0
    tokens: int = 0
    ttft: deque[float] = field(default_factory=lambda: deque(maxlen=RECENT_LATENCIES))
    e2e: deque[float] = field(default_factory=lambda: deque(maxlen=RECENT_LATENCIES))
    latencies: int = 0  # latencies kept so far: what ``_percentiles`` were worked out at
    _percentiles: tuple[int, Percentiles] = (0, _NONE)

    def percentiles(self) -> Percentiles:
        """Its latencies' percentiles, worked out again only once one came since the last poll:
        every poll sorted each adapter's four times (~0.4 s of the gateway's loop at 4,000 adapters
        with traffic, each open status page once a second: a helper's measure), though most had
        served nothing since."""
        if self._percentiles[0] != self.latencies:
            ttft, e2e = sorted(self.ttft), sorted(self.e2e)
            got = (_quantile(ttft, 0.5), _quantile(ttft, 0.9), _quantile(e2e, 0.5), _quantile(e2e, 0.9))
            self._percentiles = (self.latencies, got)
        return self._percentiles[1]


class Traffic:
    """Requests, errors, aborts, tokens and recent latencies per adapter label, as this gateway served them."""

    def __init__(self) -> None:
        self.by_label: dict[str, _Tally] = {}
        self._frozen: dict[str, Figures] | None = None  # ``frozen``'s: its figures, fixed

    def figures(self, label: str) -> Figures:
        """``label``'s requests, errors, aborts, tokens and latency percentiles."""
        if self._frozen is not None:
            return self._frozen.get(label, _NO_FIGURES)
        if (t := self.by_label.get(label)) is None:
            return _NO_FIGURES
        return t.requests, t.errors, t.aborted, t.tokens, t.percentiles() if t.latencies else _NONE

    def _of(self, label: str) -> _Tally:
        return self.by_label.setdefault(label, _Tally())

    def first_token(self, label: str, seconds: float) -> None:
        t = self._of(label)
        t.ttft.append(seconds)
        t.latencies += 1

    def done(self, label: str, seconds: float, tokens: int) -> None:
        t = self._of(label)
        t.requests += 1
        t.tokens += tokens
        t.e2e.append(seconds)
        t.latencies += 1

    def failed(self, label: str) -> None:
        self._of(label).errors += 1

    def aborted(self, label: str) -> None:
        self._of(label).aborted += 1

    def frozen(self) -> Traffic:
        """Its figures as they are now, for a document made off the event loop (``status_body``):
        each tally's counts and percentiles (worked out here, where the latencies are appended), not
        its latencies."""
        out = Traffic()
        out._frozen = {label: self.figures(label) for label in self.by_label}
        return out


def _quantile(ordered: Sequence[float], q: float) -> float | None:
    """The ``q`` quantile of ``ordered`` (sorted) as ``statistics.quantiles(values, n=100, method="inclusive")``
    gives it (linear between the two nearest): that one alone, where ``quantiles`` makes all 99
    (every poll of every open status page took 0.77 s of the gateway's loop at 4,000 adapters
    that had served requests: a helper's measure)."""
    if not ordered:
        return None
    i = round(q * 100)
    j, delta = divmod(i * (len(ordered) - 1), 100)
    if delta == 0:
        return ordered[j]
    return (ordered[j] * (100 - delta) + ordered[j + 1] * delta) / 100


def _worker(st: WorkerStats, age: float) -> WorkerStatus:
    places = [AdapterPlace(name=a.name, tier=a.tier, slot=a.slot, merged=a.merged) for a in st.adapters]
    return WorkerStatus(
        worker=st.worker,
        incarnation=st.incarnation,
        draining=st.draining,
        device=st.device,
        dtype=st.dtype,
        mode=st.mode if st.running or st.waiting else "idle",
        merged=st.merged_adapter,
        running=st.running,
        waiting=st.waiting,
        kv_cache_usage=st.kv_cache_usage,
        free_blocks=st.free_blocks,
        total_blocks=st.total_blocks,
        max_loras=st.max_loras,
        seconds_per_token=st.seconds_per_token,
        adapter_read_seconds=st.adapter_read_seconds,
        adapter_read_bytes=st.adapter_read_bytes,
        adapter_read_seconds_per_byte=st.adapter_read_seconds_per_byte,
        output_tokens_quantiles=st.output_tokens_quantiles,
        steps=st.steps,
        preemptions=st.preemptions,
        adapters=places,
        stats_age_s=round(age, 3),
        model_digest=st.model_digest,
    )


def cluster_status(
    live: list[tuple[WorkerStats, float]],
    plans: list[MovePlan],
    registered: list[AdapterEntry],
    traffic: Traffic,
    model: str,
    gateway: str,
    now: float,
    model_digest: str = "",
) -> ClusterStatus:
    """The status document: ``live`` workers as (stats, age), listed by name; the ``plans`` newest
    first; every ``registered`` adapter (and the base model, under ``model``) with where it lives,
    its requests in flight, and ``traffic``'s figures; ``now`` in Unix seconds; ``model_digest``:
    the gateway's, beside each worker's."""
    workers = sorted((_worker(st, age) for st, age in live), key=lambda w: w.worker)
    rows = [
        (model, True, 0, ""),
        *((e.name, False, e.rank, e.version) for e in sorted(registered, key=lambda e: e.name)),
    ]
    # One pass over the requests and the residency, not one per adapter: thousands of adapters
    # and requests are polled every second by every open page.
    states: dict[str, list[int]] = {}  # adapter -> [running, waiting]
    for st, _ in live:
        for adapter, (running, waiting) in st.requests_by_adapter().items():  # listed or not
            both = states.setdefault(adapter or model, [0, 0])
            both[0] += running
            both[1] += waiting
    placement: dict[str, dict[str, str]] = {}
    for w in workers:
        for p in w.adapters:
            placement.setdefault(p.name, {})[w.worker] = p.tier
    adapters = []
    for name, base, rank, version in rows:
        running, waiting = states.get(name, (0, 0))
        served, errors, aborted, tokens, (ttft_p50, ttft_p90, e2e_p50, e2e_p90) = traffic.figures(name)
        adapters.append(
            AdapterStatus(
                name=name,
                base=base,
                rank=rank,
                version=version,
                placement=placement.get(name, {}),
                running=running,
                waiting=waiting,
                requests=served,
                errors=errors,
                tokens=tokens,
                ttft_p50_s=ttft_p50,
                ttft_p90_s=ttft_p90,
                e2e_p50_s=e2e_p50,
                e2e_p90_s=e2e_p90,
                aborted=aborted,
            )
        )
    return ClusterStatus(
        time=now,
        model=model,
        gateway=gateway,
        workers=workers,
        adapters=adapters,
        migrations=plans,
        model_digest=model_digest,
    )


def status_body(*args: Any) -> bytes:
    """``cluster_status(*args)`` as JSON: run on a thread (``monitoring.status``), from a ``frozen``
    traffic and the workers' stats (frozen messages), as the loop held them when the poll came."""
    return msgspec.json.encode(cluster_status(*args))
