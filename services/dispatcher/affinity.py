"""Which worker last took each prompt prefix, so that a multi-turn chat's next turn goes where its
history's KV blocks are cached. Pure: prompt token ids in, a worker's name out.

A user's trial: with two workers, a conversation's turns landed on either, and the prefix cache
hit 35 % of its prompt tokens where one worker hit 80 %. A prompt's keys are taken at every
``GRANULE`` tokens (up to ``MAX_HASHED``), each over the adapter, the cache salt and the tokens
before it; a request sent to a worker leaves its keys at lengths growing by ``KEEP_RATIO`` and at
its whole length there, so a longer prompt that begins with an earlier one finds the worker that
took it and about how much of it is shared. Only a match of at least ``MIN_SHARE`` of the new
prompt counts (within the keys' spacing), as in
SGLang's router (``cache_threshold``, 0.5): a chat template's header or a short system prompt every
request begins with would otherwise draw every new conversation to the worker of the last one.
``choose.choose_worker`` decides whether the worker found is near enough to the soonest.
"""

from __future__ import annotations

import hashlib
import math
from array import array
from collections import OrderedDict
from collections.abc import Collection, Sequence

from dlora.common.messages import GenerateRequest

# Tokens per step of a prefix key: a KV block's (``EngineConfig.block_size``'s default), since the
# prefix cache holds whole blocks only.
GRANULE = 16
# Tokens hashed at most: a key a granule costs ~1 microsecond, ~0.6 ms at this length.
MAX_HASHED = 8192
# The share of a prompt a match must cover (SGLang's router's cache_threshold).
MIN_SHARE = 0.5
# Each key kept covers at most this many times the granules of the one before: a shared prefix is
# found to within this factor (doubling, a 500-token match of a 540-token prompt read as 256 and
# was refused; a review).
KEEP_RATIO = 1.25
# Keys remembered, least recently used dropped first: ~140 bytes each with the dict's own, so
# ~36 MB, about 10,000 requests' worth at up to ~30 keys a request.
CAPACITY = 262_144


def prefix_keys(adapter: str | None, salt: str, token_ids: Sequence[int]) -> list[bytes]:
    """Key i covers the prompt's first (i + 1) x ``GRANULE`` tokens (none for a prompt shorter than
    ``GRANULE``, which fills no block)."""
    h = hashlib.blake2b(f"{adapter or ''}\0{salt}\0".encode(), digest_size=16)
    n = min(len(token_ids), MAX_HASHED) // GRANULE * GRANULE
    data = array("q", token_ids[:n]).tobytes()
    step = GRANULE * 8
    keys = []
    for start in range(0, len(data), step):
        h.update(data[start : start + step])
        keys.append(h.copy().digest())
    return keys


def cache_key(adapter: str | None, salt: str, prompt_cache_key: str) -> bytes:
    """The key of OpenAI's ``prompt_cache_key``, put after a request's prefix keys: the longest, so
    requests sharing it find one another's worker whatever their prompts share."""
    return hashlib.blake2b(f"{adapter or ''}\0{salt}\0key\0{prompt_cache_key}".encode(), digest_size=16).digest()


def request_keys(req: GenerateRequest) -> list[bytes]:
    """A request's keys: its prompt's (``prefix_keys``), then its ``prompt_cache_key``'s, scoped to
    its owner and tenant (one tenant's key is not another's alike). Keyed by the adapter's version,
    its files' digest, as the workers' caches are (a user's trial: keyed by name, a second name of
    the same files went anywhere, and a name loaded again onto other files drew its requests to
    KV they cannot use)."""
    weights = req.adapter_version or req.adapter
    keys = prefix_keys(weights, req.cache_salt, req.prompt_token_ids or [])
    if req.prompt_cache_key:
        keys.append(cache_key(weights, req.cache_salt, f"{req.owner}\0{req.tenant}\0{req.prompt_cache_key}"))
    return keys


class PrefixAffinity:
    """The worker each stored prefix key was last sent to, at most ``capacity`` keys."""

    def __init__(self, capacity: int = CAPACITY) -> None:
        self.capacity = capacity
        self._workers: OrderedDict[bytes, str] = OrderedDict()

    def worker_for(self, keys: list[bytes], live: Collection[str]) -> str | None:
        """The live worker sent the longest prefix of the prompt of ``keys`` (``prefix_keys``), if
        it covers ``MIN_SHARE`` of it; else None."""
        least = max(1, math.ceil(MIN_SHARE * len(keys) / KEEP_RATIO))
        for i in range(len(keys) - 1, least - 2, -1):
            if (worker := self._workers.get(keys[i])) is not None and worker in live:
                return worker
        return None

    def sent(self, keys: list[bytes], worker: str) -> None:
        """A request of ``keys`` went to ``worker``: its prefixes are cached there now. Kept at
        lengths growing by ``KEEP_RATIO`` and at its whole length: what a later, longer prompt looks
        up."""
        kept, n = [], 1
        while n < len(keys):
            kept.append(keys[n - 1])
            n = max(n + 1, math.ceil(n * KEEP_RATIO))
        kept += keys[-1:]
        for key in kept:
            self._workers[key] = worker
            self._workers.move_to_end(key)
        while len(self._workers) > self.capacity:
            self._workers.popitem(last=False)

    def clear(self) -> None:
        """Every worker's cache was reset (``POST /reset_prefix_cache``): nothing is where it went."""
        self._workers.clear()

    def forget(self, worker: str) -> None:
        """A worker given up on: its cache went with it."""
        for key in [k for k, w in self._workers.items() if w == worker]:
            del self._workers[key]
