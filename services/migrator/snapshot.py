"""What the migration planner sees of the cluster: workers and their running requests. Pure data."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from dlora.common.reads import read_price
from dlora.common.versions import engine_key
from dlora.model.config import same_model


@dataclass(frozen=True)
class RequestState:
    request_id: str
    worker: str  # where it runs now
    adapter: str | None  # None: the base model
    context_tokens: int  # prompt + generated so far (what a recompute costs, and its KV size)
    remaining_tokens: float  # expected tokens still to generate (output lengths are unknown: an estimate)
    # Prompt + max_tokens: what a destination's context and KV cache must hold whole (0: unknown).
    total_tokens: int = 0
    rank: int = 0  # its adapter's LoRA rank (0: the base model, or not known)
    pinned: bool = False  # it stays where it is (its adapter version is retiring there: RequestLoad)
    model_digest: str = ""  # its worker's base model (WorkerStats.model_digest; "": not said)
    running: bool = True  # it holds KV there (RequestLoad.running); waiting, a move recomputes nothing
    version: str = ""  # its adapter's version (RequestLoad.version; "": not said, any version)

    @property
    def key(self) -> str:
        """What it runs on: the worker engine's key for its adapter's version (``engine_key``: the
        plain name where the version is not said), "" for the base model. Versions apart: after an
        in-place reload a worker holding, and running, only the old one must read the new one (and
        give it a slot of its own) for a moved request of it."""
        return engine_key(self.adapter, self.version) if self.adapter else ""


class Running(set[str]):
    """The adapter versions a worker has requests of (``RequestState.key``s), with the names of the
    versioned ones beside: a name alone (an older worker's request) then finds a version of it
    without a scan of the keys, for each of the planner's (group, worker) pairs. ``by_version``: the
    worker counts by version (``WorkerState.by_version``), so a name alone there is its engine's key
    for an entry registered before versions, a slot and weights of its own beside any version."""

    def __init__(self, keys: Iterable[str] = (), by_version: bool = False) -> None:
        super().__init__()
        self.by_version = by_version
        self.versioned: set[str] = set()  # the names of its keys that say a version
        self.shared = 0  # its names alone that share the slot of a version of them here
        for key in keys:
            self.add(key)

    def add(self, key: str) -> None:
        if key in self:
            return
        super().add(key)
        name, _, version = key.partition("@")
        if not version:
            self.shared += name in self.versioned
        elif name not in self.versioned:
            self.versioned.add(name)
            self.shared += name in self

    @property
    def slots(self) -> int:
        """The device slots its requests take at once: one per version, a name alone sharing one."""
        return len(self) if self.by_version else len(self) - self.shared


def runs_among(keys: set[str], key: str) -> bool:
    """Whether requests of ``key`` (``RequestState.key``) run on one of ``keys``: the same version, or
    where either says none (an older worker's requests, in a rolling upgrade), that adapter at any
    version. One way only, an older worker's requests moved onto a worker running a version of their
    adapter each took a slot of their own beside it, where none was free: they stayed. A version
    joins a name alone only where that shares no other version's slot (``Running.slots``): beside
    rl and rl@v1 in one slot, rl@v2 was taken as joining, and the worker ran over its slots."""
    if key in keys:
        return True
    name, _, version = key.partition("@")
    if version:
        if isinstance(keys, Running):
            return name in keys and not keys.by_version and name not in keys.versioned
        return name in keys and not any(k.partition("@")[0] == name and k != name for k in keys)
    if isinstance(keys, Running):
        return name in keys.versioned
    return any(k.partition("@")[0] == name for k in keys)


def takes(running: set[str], key: str, slots: int) -> bool:
    """Whether a worker running requests of ``running`` (``RequestState.key``s) and with ``slots`` may
    take one of ``key`` ("": the base model, which needs no slot): it runs that version already,
    or has a slot free for it."""
    if not key or runs_among(running, key):
        return True
    return (running if isinstance(running, Running) else Running(running)).slots < slots


@dataclass(frozen=True)
class WorkerState:
    worker: str
    kv_blocks: int  # total KV blocks
    block_size: int
    slots: int  # adapters it can hold on the device at once, each of any rank (WorkerStats.max_loras)
    adapters: frozenset[str]  # adapters it holds now (names)
    seconds_per_token: float  # measured: decode seconds per generated token per request here
    # Measured per adapter ("" for the base model) where it has run here; see WorkerStats.
    adapter_seconds_per_token: dict[str, float] = field(default_factory=dict)
    max_model_len: int = 0  # the most tokens one request may span here (0: not known)
    adapter_read_seconds: float = 0.0  # measured: an adapter's read into host memory here (0: not yet)
    adapter_read_bytes: float = 0.0  # the mean bytes of those reads' files (0: not known)
    adapter_read_seconds_per_byte: float | None = None  # the line fitted to them (None: in proportion)
    max_lora_rank: int = 0  # the highest adapter rank it loads (0: not known)
    model_digest: str = ""  # its base model (WorkerStats.model_digest; "": not said)
    failed_adapters: frozenset[str] = frozenset()  # its read failed here lately (WorkerStats.failed_adapters)
    # Remaining tokens of the requests its stats counted past the listed ones (MAX_LISTED): load
    # that stays here (left out, a worker with thousands queued looked as busy as one with 4,096).
    unlisted_tokens: float = 0.0
    # (name, version) of those it holds (AdapterResidency; version "": not said). None: not known
    # (a caller that passes names alone), each held at whatever version a request runs on.
    versions: frozenset[tuple[str, str]] | None = None
    # Its stats count by version (``WorkerStats.unlisted_by_version`` said): its keys are its engine's.
    by_version: bool = False
    # The adapter keys of the requests it counts past the listed ones (by name from an older worker):
    # they take slots when they run, as the listed ones' do (``planner.running_adapters``).
    unlisted_keys: frozenset[str] = frozenset()
    # The KV blocks of the requests it counts past the listed ones, those on their way here with
    # them (WorkerStats.unlisted_kv_blocks): room a plan's moves may not count on.
    unlisted_blocks: int = 0

    def has(self, key: str) -> bool:
        """Whether it holds ``key`` (``RequestState.key``) in host memory or on the device: a moved
        request of it needs no read here. An old version alone is not the new one (``runs_among``
        says when a version not said matches)."""
        name, _, version = key.partition("@")
        if name not in self.adapters:
            return False
        return self.versions is None or not version or bool({(name, version), (name, "")} & self.versions)

    def holds(self, r: RequestState) -> bool:
        """Whether ``r`` may run here: it fits whole (elsewhere it would be refused, or cut short),
        its adapter's rank is one this worker loads and its read did not fail here lately, it is
        not pinned to another worker, and this worker serves the base model it runs on (where both say)."""
        return (
            (self.max_model_len == 0 or r.total_tokens <= self.max_model_len)
            and (self.max_lora_rank == 0 or r.rank <= self.max_lora_rank)
            and (not r.pinned or r.worker == self.worker)
            and same_model(self.model_digest, r.model_digest)
            and (r.adapter is None or r.adapter not in self.failed_adapters)
        )

    def read_seconds(self, nbytes: int) -> float:
        """Seconds a read of an adapter of ``nbytes`` (its files'; 0: not known) takes here (``read_price``)."""
        line = self.adapter_read_seconds, self.adapter_read_bytes, self.adapter_read_seconds_per_byte
        return read_price(*line, nbytes)

    def unlisted_seconds(self) -> float:
        return self.unlisted_tokens * self.seconds_per_token

    def cost(self, adapter: str | None) -> float:
        """Seconds per token a request of ``adapter`` takes here: what it measured, else the mean."""
        return self.adapter_seconds_per_token.get(adapter or "", self.seconds_per_token)


@dataclass(frozen=True)
class ClusterSnapshot:
    workers: list[WorkerState]
    requests: list[RequestState]
    file_bytes: dict[str, int] = field(default_factory=dict)  # adapter -> its files' bytes (read prices)
    # Costs of a move, in seconds of the destination's time.
    recompute_seconds_per_token: float = 0.0005  # prefill of the moved context
    kv_transfer_seconds_per_token: float = 0.001  # shipping KV over the bus instead
    adapter_load_seconds: float = 0.05  # loading an adapter the destination lacks
