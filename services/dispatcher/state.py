"""What a dispatcher knows between requests, and the choice it makes from it: the workers' latest
stats and when they came, the requests sent to each since, where the placement wants adapters,
and the round-robin turn. Pure (the caller passes the clock), so the dispatcher service and the
cluster simulator (``dlora.sim``) run the same code."""

from __future__ import annotations

import hashlib
import os
from array import array
from collections import Counter, OrderedDict
from collections.abc import Sequence
from typing import NamedTuple

from dlora.common.messages import WorkerStats, likely_dead
from dlora.common.reads import pooled_read
from dlora.common.versions import engine_key
from dlora.services.dispatcher.affinity import GRANULE, MAX_HASHED, PrefixAffinity
from dlora.services.dispatcher.choose import (
    DispatchCosts,
    DispatchMode,
    WorkerLoad,
    choose_worker,
    request_tokens,
)
from dlora.services.dispatcher.lengths import PooledLengths

# Request groups remembered (``GenerateRequest.group``), the least recently sent to forgotten first:
# a group's requests come together, so this holds many times the requests dispatched at once.
MAX_GROUPS = 4096
# Requests a group takes to its worker, at most: a request's choices (the gateway's largest n is
# 128); more of one group, sent by an application, are dispatched by load as any others.
MAX_GROUP_REQUESTS = 128
# Requests' whole-prompt keys remembered while their workers' stats may not yet show them ended
# (``DispatchState.ends``), the least recently sent forgotten first.
MAX_ENDS = 4096


class _Sent(NamedTuple):
    """A request sent, for ``DispatchState.ends``."""

    worker: str
    heard: int  # the worker's stats count when it was sent (``DispatchState.stats_heard``)
    adapter: str | None  # as ``sent_adapters`` counts it (``engine_key``)
    length: int  # its prompt's tokens
    digest: bytes  # and their ``_digest``
    tokens: float  # its output tokens as counted in ``DispatchState.sent_tokens``


def _digest(prompt: Sequence[int]) -> bytes:
    return hashlib.blake2b(array("q", prompt).tobytes(), digest_size=16).digest()


def _prompt_keys(prefixes: list[bytes] | None, prompt: Sequence[int]) -> list[bytes]:
    """The prompt's own of a request's keys (``affinity.request_keys`` puts its
    ``prompt_cache_key``'s after them)."""
    return (prefixes or [])[: min(len(prompt), MAX_HASHED) // GRANULE]


def new_salt() -> bytes:
    """A dispatcher's own ``DispatchState`` salt: random, a new one at each start, so that its ties
    among equal workers are not broken as another dispatcher's are (``choose.tie_order``)."""
    return os.urandom(8)


class DispatchState:
    def __init__(self, ttl_s: float, mode: DispatchMode, costs: DispatchCosts, salt: bytes = b"") -> None:
        """``salt``: this dispatcher's own (up to 56 bytes), which breaks its ties among equal
        workers, and picks its first round-robin turn, apart from another dispatcher's
        (``choose.tie_order``); none (the simulator, the tests): by name, from the first."""
        self.ttl_s, self.mode, self.costs = ttl_s, mode, costs
        # Mixed with a count of the choices: two dispatchers whose salts order the workers alike
        # do not agree on every tie from then on.
        self.salt, self._choices = salt, 0
        # Latest stats per worker and when they arrived (the caller's clock); stale ones are ignored.
        self.workers: dict[str, tuple[WorkerStats, float]] = {}
        self.loads: dict[str, WorkerLoad] = {}  # of those stats, what choosing reads
        # Output tokens of the requests sent to each worker since its last stats (``request_tokens``
        # each): a burst must not all go to the worker that looked idlest a moment ago.
        self.sent_tokens: dict[str, float] = {}
        # and their adapters' (not the base's), by version (``engine_key``)
        self.sent_adapters: dict[str, Counter[str]] = {}
        # Where adapters should have replicas (burst tolerance): worker -> adapters.
        self.placement: dict[str, list[str]] = {}
        self.file_bytes: dict[str, int] = {}  # adapters' files' bytes, as the registry lists them (read prices)
        self.lengths = PooledLengths()  # what the workers' finished requests took (a new one's price)
        # ``pooled_read`` of the workers heard, made again after new stats (every request asked it:
        # 70 us at 256 workers)
        self._unread: tuple[float, float, float | None] | None = None
        self.affinity = PrefixAffinity()  # which worker took each prompt prefix last
        # request group -> its worker and the requests sent there, the latest sent to last
        self.groups: OrderedDict[str, tuple[str, int]] = OrderedDict()
        # A request's prompt's last prefix key -> the request: its worker, that worker's stats
        # count when it was sent, its adapter, and its prompt's length and digest. A later prompt
        # that extends that prompt exactly holds its answer (a chat's next turn), so it has ended:
        # counted among the requests sent since those stats, it made a chat sending its turns back
        # to back (a user's trial, one turn in five) look two requests' work busier on its own
        # worker by the third turn, and go to the other, cache cold.
        self.ends: OrderedDict[bytes, _Sent] = OrderedDict()
        self.stats_heard: Counter[str] = Counter()
        self.gaps: dict[str, float] = {}  # seconds between each worker's last two stats (``quiet``)
        self._turn = int.from_bytes(salt[:4], "little")

    def heard(self, st: WorkerStats, now: float) -> None:
        """A worker's stats came at ``now``."""
        if (before := self.workers.get(st.worker)) is not None:
            self.gaps[st.worker] = now - before[1]
        self.workers[st.worker] = (st, now)
        last = self.loads.get(st.worker)  # the simulator hands an idle replica's message again
        self.loads[st.worker] = last if last is not None and last.stats is st else WorkerLoad.of(st)
        self.sent_tokens[st.worker] = 0.0
        self.lengths.heard(st.worker, st.output_tokens_quantiles)
        self._unread = None
        self.sent_adapters[st.worker] = Counter()
        self.stats_heard[st.worker] += 1

    def forgive(self, now: float) -> None:
        """Every worker counts as heard from ``now``: the silence was the dispatcher's own (its
        connection was down), not theirs."""
        self.workers = {w: (st, now) for w, (st, _) in self.workers.items()}

    def live(self, now: float) -> list[WorkerStats]:
        """Workers heard from within the TTL that take new requests (not draining)."""
        return [st for st, at in self.workers.values() if now - at <= self.ttl_s and not st.draining]

    def quiet(self, now: float) -> set[str]:
        """Live workers silent for over half the TTL and three of their last gaps between stats:
        likely dead, not yet declared lost (two killed together: the first's loss re-dispatched to
        the second). A worker's interval is under half the TTL (``WorkerSettings.check``), but its
        gaps are that plus its Redis writes: hence its own gap too, so a slow one is not quiet. The
        gap is at least the interval its stats say (``WorkerStats.stats_interval_s``): a gap ended
        early by stats sent as it fell idle, or none yet (heard once), is shorter than its next
        silence, and with an interval near half the TTL a worker whose Redis writes took a moment
        was called quiet and passed over. Not the interval alone: it leaves out those writes."""
        return {
            w
            for w, (st, at) in self.workers.items()
            if now - at <= self.ttl_s and likely_dead(now - at, self.ttl_s, self.gaps.get(w, 0.0), st.stats_interval_s)
        }

    def choose(
        self,
        live: list[WorkerStats],
        adapter: str | None,
        prefixes: list[bytes] | None = None,
        group: str = "",
        prompt: Sequence[int] = (),
        tokens: float | None = None,
        version: str | None = None,
    ) -> str | None:
        """The worker among ``live`` for a request of ``version`` of ``adapter`` (None: any version;
        the worker None when there is none), counted as sent to it (``unsend`` takes that back if
        it never went): the one its ``group``'s
        requests went to while it is among ``live`` (up to ``MAX_GROUP_REQUESTS`` of them), else
        round-robin blind to load and adapters, or proactive (``choose_worker``), near a worker
        that took the request's prompt prefix before (``prefixes``: its ``affinity.request_keys``;
        ``prompt``: its prompt's token ids, which those begin with; ``tokens``: its output tokens as
        ``price`` gives them, None: of a request with no bound)."""
        worker: str | None
        tokens = self.price() if tokens is None else tokens
        keys = _prompt_keys(prefixes, prompt)
        self._ended(keys, prompt)
        pinned = self.groups.get(group) if group else None
        if pinned is not None and pinned[1] < MAX_GROUP_REQUESTS and pinned[0] in {w.worker for w in live}:
            worker = pinned[0]
            self.groups.move_to_end(group)
        elif self.mode is DispatchMode.ROUND_ROBIN:
            names = sorted(w.worker for w in live)
            worker = names[self._turn % len(names)] if names else None
            self._turn += 1
        else:
            affine = self.affinity.worker_for(prefixes, {w.worker for w in live}) if prefixes else None
            if self._unread is None:
                self._unread = pooled_read(st for st, _ in self.workers.values())
            worker = choose_worker(
                live,
                adapter,
                self.sent_tokens,
                self.placement,
                self.costs,
                self.loads,
                self.sent_adapters,
                affine,
                tokens,
                self.file_bytes.get(adapter, 0) if adapter is not None else 0,
                self._unread,
                self.salt + self._choices.to_bytes(8, "little") if self.salt else b"",
                version,
            )
            self._choices += 1
            if worker is not None and prefixes:
                self.affinity.sent(prefixes, worker)
            if worker is not None and keys:
                key = engine_key(adapter, version or "") if adapter is not None else None
                sent = _Sent(worker, self.stats_heard[worker], key, len(prompt), _digest(prompt), tokens)
                self.ends[keys[-1]] = sent
                self.ends.move_to_end(keys[-1])
                if len(self.ends) > MAX_ENDS:
                    self.ends.popitem(last=False)
        if worker is not None and group:
            # counted on past a change of worker: a group over its cap goes by load from then on
            self.groups[group] = (worker, pinned[1] + 1 if pinned is not None else 1)
            if len(self.groups) > MAX_GROUPS:
                self.groups.popitem(last=False)
        if worker is not None:
            self.sent_tokens[worker] = self.sent_tokens.get(worker, 0.0) + tokens
            if adapter is not None:
                self.sent_adapters.setdefault(worker, Counter())[engine_key(adapter, version or "")] += 1
        return worker

    def _ended(self, keys: list[bytes], prompt: Sequence[int]) -> None:
        """The latest request sent whose prompt ``prompt`` extends (``keys``: its prefix keys; an
        earlier turn of the chat now sent) has ended: no longer counted among those sent to its
        worker since its stats, if those are the stats it was counted against. Only an exact
        prefix: a prompt sharing a block with another (a few-shot header, then an item) is not."""
        for key in reversed(keys):
            sent = self.ends.get(key)
            if sent is not None and sent.length < len(prompt) and _digest(prompt[: sent.length]) == sent.digest:
                del self.ends[key]
                if self.stats_heard[sent.worker] == sent.heard:
                    self._uncount(sent.worker, sent.adapter, sent.tokens)
                return

    def unsend(
        self,
        worker: str,
        adapter: str | None,
        prefixes: list[bytes] | None = None,
        prompt: Sequence[int] = (),
        tokens: float | None = None,
        heard: int | None = None,
        version: str | None = None,
    ) -> None:
        """A request ``choose`` counted on ``worker`` did not go there (another dispatcher recorded
        it first): no longer counted, nor taken off again when a later prompt extends its prompt
        (``prefixes``, ``prompt``, ``tokens`` and ``version`` as ``choose`` was given them; ``heard``: the
        worker's ``stats_heard`` then: stats heard since counted it out already, and taking it off
        again would take it off the requests sent since)."""
        keys = _prompt_keys(prefixes, prompt)
        if keys and (end := self.ends.get(keys[-1])) is not None and end.worker == worker:
            del self.ends[keys[-1]]
        if heard is None or heard == self.stats_heard[worker]:
            key = engine_key(adapter, version or "") if adapter is not None else None
            self._uncount(worker, key, self.price() if tokens is None else tokens)

    def price(self, max_tokens: int = 0, min_tokens: int = 0, ignore_eos: bool = False) -> float:
        """The output tokens a new request with these sampling parameters is priced at, by the
        workers' lengths heard here (``request_tokens``)."""
        return request_tokens(self.costs, max_tokens, self.lengths, min_tokens, ignore_eos)

    def _uncount(self, worker: str, adapter: str | None, tokens: float) -> None:
        """A request counted as sent to ``worker`` since its stats is not (any more); ``adapter``:
        its ``engine_key``."""
        if worker in self.sent_tokens:  # (not below 0: stats since reset it)
            self.sent_tokens[worker] = max(0.0, self.sent_tokens[worker] - tokens)
        if adapter is not None and (sent := self.sent_adapters.get(worker)) and adapter in sent:
            sent[adapter] -= 1
            if not sent[adapter]:  # its keys are the adapters crowding the worker's slots
                del sent[adapter]

    def forget(self, worker: str) -> None:
        """A worker given up on: nothing of it is kept (its gaps were, for every worker id ever seen:
        a helper's churn of ids; so was its count of stats heard, under pod names that never come
        back: another's). The requests sent to it are forgotten with that count: should it come back
        under that id, counting from 0, an old request's count would match a new one's (a review)."""
        for table in (self.workers, self.loads, self.sent_tokens, self.sent_adapters, self.gaps, self.stats_heard):
            table.pop(worker, None)
        for key in [key for key, sent in self.ends.items() if sent.worker == worker]:
            del self.ends[key]
        self.affinity.forget(worker)
        self.lengths.forget(worker)
        self._unread = None
