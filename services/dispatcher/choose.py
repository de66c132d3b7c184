"""Which worker takes a request: dLoRA's proactive dispatch. Pure: worker stats in, a worker out.

A request goes to the worker where it would finish soonest, estimated as the work queued there
(remaining tokens x the live workers' mean measured seconds per token) plus its own
(``request_tokens``: what requests of its bound took lately, pooled over the workers), where its
own tokens cost more if they will run unmerged (the worker is busy with other adapters), all of it
slower where the worker would run requests of more adapters than it has device slots (one step
runs at most that many, so each adapter runs a fraction of the steps), and a worker that lacks the
adapter (and is not meant to hold it by the placement) first pays for loading it: its own reads'
measured seconds scaled to the bytes of the adapter's files (``WorkerStats.read_seconds``), else the live
workers' mean of those, else ``adapter_load_s``. A worker that
took the request's longest known prompt prefix (``affinity.py``) takes it while its estimate is
within ``prefix_affinity`` times the soonest, or within ``AFFINITY_REQUESTS`` requests' work of it:
its prefix cache saves the prompt's prefill.
"""

from __future__ import annotations

import enum
import hashlib
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field

import msgspec

from dlora.common.messages import WorkerStats
from dlora.common.reads import pooled_read, read_price
from dlora.common.versions import engine_key, name_of
from dlora.model.config import same_model
from dlora.services.dispatcher.lengths import PooledLengths


class DispatchMode(enum.StrEnum):
    PROACTIVE = "proactive"  # dLoRA: soonest estimated finish, placement-aware
    ROUND_ROBIN = "round-robin"  # the baseline: blind to load and adapters


class DispatchCosts(msgspec.Struct, kw_only=True, frozen=True, forbid_unknown_fields=True):
    """The estimates proactive dispatch prices a worker with (``[dispatcher.costs]`` in ``dlora.toml``)."""

    # A new request's output tokens until the workers report what theirs took (then those, as
    # ``lengths.py`` says); its max_tokens where that is fewer.
    expected_tokens: float = 64.0
    unmerged_overhead: float = 0.1  # extra cost per token (fraction) when not the worker's dominant adapter
    adapter_load_s: float = 0.05  # seconds to load an adapter the worker lacks, until it measured its reads
    default_seconds_per_token: float = 0.01  # every worker's price when no worker has measured yet
    # The worker that took the request's prompt prefix last takes it while its estimated finish is
    # within this factor of the soonest (SGLang's router is cache-aware below a load-imbalance
    # ratio alike); 1: off.
    prefix_affinity: float = 1.25

    def check(self) -> list[tuple[str, object, str]]:
        """Problems as (field, value, why); empty when the values are usable."""
        bad = [(f, getattr(self, f), "must be >= 0") for f in self.__struct_fields__ if not getattr(self, f) >= 0]
        if self.prefix_affinity < 1:
            bad.append(("prefix_affinity", self.prefix_affinity, "must be >= 1 (1: off)"))
        return bad


DEFAULT_COSTS = DispatchCosts()
# Requests' work (each as much as the request's own) a worker holding the prompt's prefix may be
# behind the soonest whatever the ratio: an idle cluster's estimates differ by the requests sent
# since the last stats, and a chat's turns or a prompt's samples come together (SGLang's router is
# likewise cache-aware unless the load differs by an absolute and a relative threshold both). At
# ``expected_tokens`` a request whatever its own, 60 one-token requests sharing a prefix all went
# to one worker (a trial).
AFFINITY_REQUESTS = 2


@dataclass(frozen=True)
class WorkerLoad:
    """What proactive dispatch reads of one worker's stats, summed once per stats message rather
    than for every request (a dispatcher prices every live worker for each request it places)."""

    worker: str
    queued_tokens: int  # remaining tokens of its requests, summed
    # the adapter version (``engine_key``) with most requests there (the first seen of equals)
    dominant: str | None
    busy: bool  # it holds requests (else a request's own adapter counts as dominant)
    adapters: frozenset[str]  # loaded there (device slots or host memory)
    stats: WorkerStats = field(compare=False, repr=False)  # what it was summed from
    queued_adapters: frozenset[str] = frozenset()  # the adapters its requests run on (not the base)
    slots: int = 0  # its device slots for adapters (WorkerStats.max_loras; 0: unknown)
    # (name, version) of those loaded, version "" where its stats do not say (an older worker)
    versions: frozenset[tuple[str, str]] = frozenset()
    reading: frozenset[tuple[str, str]] | None = None  # WorkerStats.reading (None: not said)
    # the adapter versions its requests run on (``engine_key``s; the name alone where not said)
    queued_keys: frozenset[str] = frozenset()
    versioned: frozenset[str] = frozenset()  # the names of those keys that say a version
    plain: frozenset[str] = frozenset()  # those keys that do not (an older worker's)
    taken: int = 0  # the slots its requests take (``slots_taken`` of ``queued_keys``)
    # Its keys are its engine's (it says ``unlisted_by_version``): a name alone there is an entry
    # registered before versions, held under that key beside any version of it, not "any version".
    by_version: bool = False

    def holds(self, adapter: str, version: str | None = None) -> bool:
        """Whether ``version`` of ``adapter`` is loaded here (None or "": any version of it; a
        version not said, by an older worker or of an unversioned entry, counts as any)."""
        if adapter not in self.adapters:
            return False
        return not version or (adapter, version) in self.versions or (adapter, "") in self.versions

    def joins(self, adapter: str, version: str | None = None) -> bool:
        """Whether a request of ``version`` of ``adapter`` would join requests of it queued here
        (they wait for its read, or run on it). Where the worker says what it reads, only a read
        of that version: after an in-place reload its requests of the old version run on weights
        a new request cannot use (priced as joining them, an RL trainer's new policy went to the
        worker still running the old one's rollouts, and waited there for a read; a helper's
        finding)."""
        if adapter not in self.queued_adapters:
            return False
        if not version or self.reading is None:
            return True
        return (adapter, version) in self.reading or (adapter, "") in self.reading

    @classmethod
    def of(cls, w: WorkerStats) -> WorkerLoad:
        # every request there, listed or not (past MAX_LISTED a burst of one adapter's requests was
        # not seen queued: priced as lacking it, each worker read it again; a helper's finding)
        counts = {a or None: n for a, n in requests_by_version(w).items()}
        return cls(
            worker=w.worker,
            queued_tokens=sum(r.remaining_tokens for r in w.requests) + w.unlisted_remaining_tokens,
            dominant=max(counts, key=counts.__getitem__) if counts else None,
            busy=bool(counts),
            adapters=frozenset(a.name for a in w.adapters),
            stats=w,
            queued_adapters=frozenset(name_of(a) for a in counts if a is not None),
            slots=w.max_loras,
            versions=frozenset((a.name, a.version) for a in w.adapters),
            reading=None if w.reading is None else frozenset((n, v) for n, v in w.reading),
            queued_keys=(keys := frozenset(a for a in counts if a is not None)),
            versioned=frozenset(name_of(k) for k in keys if "@" in k),
            plain=frozenset(k for k in keys if "@" not in k),
            taken=len(keys) if w.unlisted_by_version is not None else slots_taken(keys),
            by_version=w.unlisted_by_version is not None,
        )

    def slots_with(self, keys: Collection[str]) -> int:
        """``slots_taken`` of its queued adapters' keys and ``keys`` (a request's and those sent since
        its stats: a few). One slot a key where none is a name alone beside a version of it (every
        peer says versions, or none does): counted over all of them for every worker priced, a
        choice at 256 workers took 40 % longer. A request's key alone (no sends since its stats: most
        workers) is added to ``taken``, with no set built: a set a worker cost a choice 10-30 %."""
        if len(keys) == 1:
            (key,) = keys
            if key in self.queued_keys:
                return self.taken
            if self.by_version:
                return self.taken + 1
            name, _, version = key.partition("@")
            if version:  # (a name alone counted on its own now shares its slot)
                return self.taken + (name not in self.plain or name in self.versioned)
            return self.taken + (key not in self.versioned)
        every = self.queued_keys.union(keys)
        if self.by_version:
            return len(every)
        if not self.plain:
            if all("@" in k for k in keys):
                return len(every)
        elif not self.versioned and all("@" not in k for k in keys):
            return len(every)
        return slots_taken(every)


def requests_by_version(w: WorkerStats) -> dict[str, int]:
    """``w``'s requests, listed or not, per adapter version they run on (``engine_key``; "" the base
    model), in arrival order. Where ``w`` does not say the unlisted ones' versions (an older worker),
    those by name, which share a slot with any version of it (``slots_taken``)."""
    out: dict[str, int] = {}
    for r in w.requests:
        key = engine_key(r.adapter, r.version) if r.adapter else ""
        out[key] = out.get(key, 0) + 1
    unlisted = w.unlisted_by_adapter if w.unlisted_by_version is None else w.unlisted_by_version
    for key, (running, waiting) in unlisted.items():
        out[key] = out.get(key, 0) + running + waiting
    return out


def slots_taken(keys: Collection[str]) -> int:
    """The device slots requests of ``keys`` (distinct ``engine_key``s) take at once: one per adapter
    version (a worker's engine holds each under its key of its own); a name alone (an older
    worker's request, or one naming no version) shares the slot of a version of it listed beside.
    By name, a request of x@v2 sent to a worker running x@v1 in its only slot was priced as sharing
    that slot, and went there to wait its turn (a helper's finding)."""
    versioned = {name_of(k) for k in keys if "@" in k}
    return sum(1 for k in keys if "@" in k or k not in versioned)


def shares_slot(a: str, b: str) -> bool:
    """Whether requests of the ``engine_key``s ``a`` and ``b`` run on one adapter's weights: the same
    version, or either names none (any version)."""
    return a == b or ("@" not in a or "@" not in b) and name_of(a) == name_of(b)


def request_tokens(
    costs: DispatchCosts,
    max_tokens: int = 0,
    lengths: PooledLengths | None = None,
    min_tokens: int = 0,
    ignore_eos: bool = False,
) -> float:
    """The output tokens a new request is priced at: all of its ``max_tokens`` (0: not known) where
    it ignores EOS (it runs to them: a benchmark's requests); else what requests bounded alike took
    on the workers lately (``lengths``), else ``costs.expected_tokens`` or its ``max_tokens`` where
    that is fewer; at least its ``min_tokens``. Priced at 64 whatever their bound, a trial's
    16-token requests cost 4x their work each on the worker holding their adapter, and went to
    another that read it again."""
    if ignore_eos and max_tokens > 0:
        return float(max_tokens)
    if lengths is not None and (learned := lengths.expected(max_tokens)) is not None:
        return max(float(min_tokens), 1.0, learned)
    expected = min(costs.expected_tokens, max_tokens) if max_tokens > 0 else costs.expected_tokens
    return max(float(min_tokens), expected)


def estimated_finish(
    w: WorkerLoad,
    adapter: str | None,
    extra_tokens: float,
    placed: set[str],
    costs: DispatchCosts,
    extra_adapters: Collection[str],
    tokens: float,
    load_s: float,
    version: str | None = None,
) -> float:
    """Seconds until a request of ``adapter`` and ``tokens`` output tokens would finish on ``w``,
    with requests of ``extra_tokens`` sent there since its stats (of ``extra_adapters``) and
    ``placed`` the adapters the placement means it to hold, its tokens priced at
    ``costs.default_seconds_per_token`` (``choose_worker`` sets it to the live workers' mean: see
    there) and reading the adapter (its ``version``; None: any) there at ``load_s``. The formula
    is the module's docstring."""
    spt = costs.default_seconds_per_token
    queued = w.queued_tokens + extra_tokens
    mine = engine_key(adapter, version or "") if adapter is not None else None
    dominant = w.dominant if w.busy else mine
    # (a name alone is any version only where the worker does not count by version)
    shared = dominant is not None and not w.by_version
    merged = mine is None or mine == dominant or shared and shares_slot(mine, dominant or "")
    own = tokens * (1.0 if merged else 1.0 + costs.unmerged_overhead)
    # (requests of it queued or sent there: it holds it, or is reading it and they join that read;
    # priced as lacking it, a burst of a new adapter's requests spread and each worker read it, a
    # trial. Not where its read failed lately: they would all be refused there, a review)
    holds = adapter is None or adapter in placed or w.holds(adapter, version)
    joins = adapter is not None and (w.joins(adapter, version) or was_sent(extra_adapters, adapter, version))
    holds = holds or joins and adapter not in w.stats.failed_adapters
    # Requests of more adapters than slots: a step runs at most ``slots`` of them, so the queue
    # drains ``adapters / slots`` times slower. Blind to this, dispatch spread every adapter over
    # every worker as round-robin does (simulated, 8 replicas x 64 adapters, 8 slots each: 994
    # ms/token against round-robin's 1,014; priced, 58.8. Issue 21).
    crowding = 1.0
    if mine is not None and w.slots:  # (by version: ``slots_taken``)
        keys = (*extra_adapters, mine) if extra_adapters else (mine,)
        crowding = max(1.0, w.slots_with(keys) / w.slots)
    return (queued + own) * spt * crowding + (0.0 if holds else load_s)


def was_sent(sent: Collection[str], adapter: str, version: str | None = None) -> bool:
    """Whether a request of ``version`` of ``adapter`` joins one of those ``sent`` (``engine_key``s)
    to a worker since its stats: of that version (it reads it for them), or where either does not
    say its version, of that name. By name, the first new-version request after an in-place reload
    was priced as joining the old version's read on the worker just sent one (a helper's finding)."""
    if engine_key(adapter, version or "") in sent or adapter in sent:
        return True
    return not version and any(name_of(k) == adapter for k in sent)


def of_model(workers: list[WorkerStats], digest: str) -> list[WorkerStats]:
    """Those of ``workers`` that serve the base model of ``digest`` (``model.config.model_digest``),
    or do not say (an older worker): a prompt's token ids mean other text under another tokenizer."""
    return [w for w in workers if same_model(w.model_digest, digest)]


def holds_request(w: WorkerStats, tokens: int) -> bool:
    """Whether a request of ``tokens`` (prompt + max_tokens) fits ``w``'s context and KV cache
    whole: elsewhere it would be cut short with finish_reason "length"."""
    return w.max_model_len == 0 or tokens <= w.max_model_len


def choose_worker(
    workers: list[WorkerStats],
    adapter: str | None,
    sent_tokens: Mapping[str, float] | None = None,
    placement: dict[str, list[str]] | None = None,
    costs: DispatchCosts = DEFAULT_COSTS,
    loads: dict[str, WorkerLoad] | None = None,
    sent_adapters: Mapping[str, Collection[str]] | None = None,
    affine: str | None = None,
    tokens: float | None = None,
    file_bytes: int = 0,
    unread: tuple[float, float, float | None] | None = None,
    salt: bytes = b"",
    version: str | None = None,
) -> str | None:
    """The worker for a request of ``adapter``; None when no worker is live. Ties go to the worker
    that holds the adapter, then by name, or with ``salt`` (up to 64 bytes) in an order of its own
    (``tie_order``). ``loads``: each worker's ``WorkerLoad`` of these stats,
    where the caller keeps them (else made here). ``sent_tokens`` / ``sent_adapters``: the output
    tokens of the requests sent to each worker since its stats (each as ``request_tokens`` priced
    it), and their adapters (a burst of new adapters to one worker crowds its slots before its
    stats say so). ``affine``: the worker that took the request's prompt prefix last, which takes
    it within ``costs.prefix_affinity`` of the soonest. ``tokens``: the request's own output
    tokens (``request_tokens``; None: ``costs.expected_tokens``); ``file_bytes``: its adapter's files'
    (0: not known), which scale what reading it costs (``WorkerStats.read_seconds``); ``unread``:
    ``pooled_read`` of these workers, where the caller keeps it (else made here). ``version``: the
    adapter version the request runs on (``GenerateRequest.adapter_version``; None: any), which a
    worker must hold, else it pays for the read."""
    if not workers:
        return None
    tokens = costs.expected_tokens if tokens is None else tokens
    sent, sent_to = sent_tokens or {}, sent_adapters or {}
    placement = placement or {}
    # Every worker is priced at the live workers' mean measured speed. A batched engine's seconds
    # per token fall as its batch grows (a step's time is shared by more tokens), so a worker's own
    # figure says more about its load than its speed: priced by it, the busiest worker looked the
    # fastest and drew still more (simulated at 8 replicas, issue 21: tokens per replica 35k-107k,
    # mean normalized latency 33 % above round-robin's; at the mean, even with round-robin). A
    # worker that has not measured yet runs the same model too, so it is priced the same.
    if measured := [w.seconds_per_token for w in workers if w.seconds_per_token]:
        costs = msgspec.structs.replace(costs, default_seconds_per_token=sum(measured) / len(measured))
    # A worker that has read no adapter yet (just started, or of a version before the figure) is
    # priced at the others' mean read of its size: at the setting's 50 ms beside reads of seconds,
    # every adapter nobody held went to it (a review)
    if unread_s := read_price(*(unread or pooled_read(workers)), file_bytes):
        costs = msgspec.structs.replace(costs, adapter_load_s=unread_s)

    def key(w: WorkerStats) -> tuple[float, int]:
        load = (loads or {}).get(w.worker)
        if load is None or load.stats is not w:  # not kept, or kept of other stats
            load = WorkerLoad.of(w)
        finish = estimated_finish(
            load,
            adapter,
            sent.get(w.worker, 0.0),
            set(placement.get(w.worker, ())),
            costs,
            sent_to.get(w.worker, ()),
            tokens,
            w.read_seconds(file_bytes) or costs.adapter_load_s,
            version,
        )
        holds = adapter is None or load.holds(adapter, version)
        return (round(finish, 9), 0 if holds else 1)

    scored = [(key(w), w) for w in workers]
    low = min(k for k, _ in scored)
    # the salted order among the equals only: a hash a worker a choice cost +60 % at 256 workers (a review)
    best = min((w for k, w in scored if k == low), key=lambda w: tie_order(salt, w.worker))
    if affine is not None and affine != best.worker and costs.prefix_affinity > 1:
        cached = next((w for w in workers if w.worker == affine), None)
        soonest = key(best)[0]
        slack = AFFINITY_REQUESTS * tokens * costs.default_seconds_per_token
        if cached is not None and key(cached)[0] <= max(soonest * costs.prefix_affinity, soonest + slack):
            return affine
    return best.worker


def tie_order(salt: bytes, worker: str) -> str:
    """Where ``worker`` comes among equals: by name without ``salt``, else in the order of a hash
    keyed by it. Each dispatcher counts only its own sends since the workers' stats, so by name two
    that took one request each at once both sent it to the first of the idle workers (a probe: 9
    of 9 trials, the other idle); each with a salt of its own, they part as often as not."""
    return hashlib.blake2b(worker.encode(), key=salt, digest_size=8).hexdigest() + worker if salt else worker


def holding_version(
    workers: list[WorkerStats], adapter: str | None, version: str, avoid: Collection[str]
) -> list[WorkerStats]:
    """The ``workers`` outside ``avoid`` whose stats list ``version`` of ``adapter``: the only
    ones that can serve a request of it once its files were rewritten since registration."""
    return [
        w
        for w in workers
        if w.worker not in avoid and any(a.name == adapter and a.version == version for a in w.adapters)
    ]


def version_gone(adapter: str | None, version: str) -> str:
    """Why a request of an adapter version no worker holds is refused (500: an admin must act)."""
    return (
        f"adapter {adapter!r}: its files changed or went since version {version} was registered and no worker "
        "holds that version in memory; an admin must load it again (vLLM's /v1/load_lora_adapter with "
        "load_inplace, or delete it and register it again)"
    )
