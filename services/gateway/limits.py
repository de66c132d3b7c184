"""Per-key request limits: a token bucket (requests per second on average, bursts up to its size)
and a cap on requests at once. Pure: the clock is passed in, so the tests step time by hand.

The counts are this gateway process's own: with N gateways behind a balancer a key gets up to N
times its limits. Sharing them (a Redis script per request) would add a round trip to every
request and a count that leaks when a gateway dies holding it; a deployment that needs a global
limit divides the key's limits by its gateways, or limits at its balancer.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

from dlora.common import apikeys


@dataclass(frozen=True)
class Limits:
    """What one key may do: ``rate_per_s`` requests per second on average (0: no limit), up to
    ``burst`` at once after a quiet spell (the bucket's size, at least 1), and at most
    ``concurrency`` requests in progress (0: no limit)."""

    rate_per_s: float = 0.0
    burst: int = 1
    concurrency: int = 0

    @classmethod
    def of(cls, rate_per_s: float, burst: int, concurrency: int) -> Limits:
        """Limits with an unset burst (0) made one second's worth of the rate, at least 1."""
        return cls(rate_per_s, burst if burst > 0 else max(1, math.ceil(rate_per_s)), concurrency)

    @property
    def unlimited(self) -> bool:
        return self.rate_per_s <= 0 and self.concurrency <= 0


@dataclass(frozen=True)
class Refusal:
    """A request over a limit: why (for the client), and how long to wait before trying again:
    ``wait_s`` exactly, and in whole seconds for ``Retry-After`` (``headers``)."""

    message: str
    wait_s: float

    @property
    def headers(self) -> dict[str, str]:
        """``Retry-After`` (whole seconds, RFC 9110) and ``retry-after-ms``, which the openai package
        reads first: by the whole seconds alone its retries met on the same second's tick and a
        third of them ran out (a helper's trial at 2 requests/s)."""
        return {
            "Retry-After": str(max(1, math.ceil(self.wait_s))),
            "retry-after-ms": str(math.ceil(self.wait_s * 1000)),
        }


@dataclass
class _Bucket:
    tokens: float
    at: float  # the clock's time ``tokens`` was counted at
    rate_per_s: float = 0.0  # the limits it was last counted under
    burst: int = 0

    def full(self, now: float) -> bool:
        """Refilled to its burst by ``now``: it holds nothing a fresh one would not."""
        return self.tokens + (now - self.at) * self.rate_per_s >= self.burst


# Seconds between sweeps of full buckets (each key ever used kept one: a helper's trial, 100,000
# keys used once each held 21 MB).
SWEEP_INTERVAL_S = 60.0


class KeyLimiter:
    """The limits of every key this process has seen, by key id. ``admit`` before a request,
    ``release`` when it ends (whatever way), for every admitted request."""

    def __init__(self, clock: Callable[[], float]) -> None:
        self.clock = clock
        self._buckets: dict[str, _Bucket] = {}
        self._running: dict[str, int] = {}
        self._swept = clock()

    def admit(self, key_id: str, limits: Limits) -> Refusal | None:
        """Take one request for ``key_id`` if its limits allow (None), or say why not. A refused
        request takes nothing: neither a token nor a place."""
        running = self._running.get(key_id, 0)
        if 0 < limits.concurrency <= running:
            # When one of them ends is unknown; a second is a retry interval that does not hammer.
            return Refusal(
                f"concurrency limit reached for this API key: {limits.concurrency} requests at once; "
                "try again when one has finished",
                1.0,
            )
        if limits.rate_per_s > 0:
            now = self.clock()
            if now - self._swept >= SWEEP_INTERVAL_S:
                self._swept = now
                self._buckets = {k: b for k, b in self._buckets.items() if not b.full(now)}
            bucket = self._buckets.setdefault(key_id, _Bucket(float(limits.burst), now))
            # min: a bucket made under a larger burst does not keep its extra tokens
            bucket.tokens = min(float(limits.burst), bucket.tokens + (now - bucket.at) * limits.rate_per_s)
            bucket.at, bucket.rate_per_s, bucket.burst = now, limits.rate_per_s, limits.burst
            if bucket.tokens < 1.0:
                # at most the smallest rate's wait: a key stored before that was checked (or a
                # gateway's key_rate_per_s) waited for ever, and math.ceil(inf) made a 500
                wait = min((1.0 - bucket.tokens) / limits.rate_per_s, 1 / apikeys.MIN_RATE)
                return Refusal(
                    f"rate limit reached for this API key: {limits.rate_per_s:g} requests per second "
                    f"(bursts of {limits.burst}); try again in {wait:.2f} s",
                    wait,
                )
            bucket.tokens -= 1.0
        self._running[key_id] = running + 1
        return None

    def release(self, key_id: str) -> None:
        """An admitted request of ``key_id`` ended."""
        left = self._running.get(key_id, 0) - 1
        if left > 0:
            self._running[key_id] = left
        else:
            self._running.pop(key_id, None)  # keys at rest hold no entry here

    def running(self, key_id: str) -> int:
        """Requests of ``key_id`` admitted and not yet released."""
        return self._running.get(key_id, 0)
