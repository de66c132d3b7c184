"""The registry's side of the wire contract: adapter registrations and their removals, inference
API keys (each stored in Redis and its durable copy) and the adapter events broadcast when one
changes. Re-exported by ``common/messages.py``, the one place services import messages from."""

from __future__ import annotations

import msgspec


class AdapterEntry(msgspec.Struct, kw_only=True, frozen=True):
    """An adapter in the registry (Redis), valid against the base model when registered."""

    name: str
    path: str
    rank: int
    # Unix seconds it was registered.
    created: float
    # Content digest of its config and weights at registration: requests run on this version, and
    # a name registered again with other files is a new version.
    version: str = ""
    # Bytes of its files (adapter_config.json and the weights): what a read of it reads, which a
    # worker's measured reads price (``read_price``). 0: registered before this was kept.
    file_bytes: int = 0
    # The tenant it belongs to: only that tenant's API keys (and admins) list and use it. Empty:
    # public, every caller's.
    owner: str = ""


class AdapterRemoval(AdapterEntry, kw_only=True, frozen=True):
    """The registration an admin removed, as it was, kept until its name is registered again (in
    Redis and in the registry's durable copy): a Redis brought back from an older snapshot must not
    serve it, nor any registration ``created`` before it. An AdapterEntry with one more field, so a
    reader that knows only entries takes it for one (a rolling upgrade)."""

    # Unix seconds it was removed (for people: the registry orders by ``created`` alone).
    removed: float = 0.0


class ApiKey(msgspec.Struct, kw_only=True, frozen=True):
    """An inference API key as stored (Redis, and its durable copy): never the key itself, only its
    SHA-256 digest (``common/apikeys.py`` says why that hash)."""

    # Names the key in listings and revocation; not secret.
    id: str
    # SHA-256 of the key, hex: a presented key is looked up by its digest.
    digest: str
    # The end of the key ("sk-dlora-...AbCd"), so a listing tells keys apart without revealing them.
    hint: str
    # Who the key acts for: the adapters it lists and uses are this tenant's and the public ones.
    tenant: str
    # "inference" (completions, chat, models) and/or "admin" (adapter and key administration).
    scopes: list[str]
    # Unix seconds it was created.
    created: float
    # Requests per second on average, the token bucket's size, and requests at once; None: the
    # gateway's key_rate_per_s / key_burst / key_concurrency; 0: no limit (a burst of 0: the
    # gateway's key_burst).
    rate_per_s: float | None = None
    burst: int | None = None
    concurrency: int | None = None
    # A revoked key is refused (401) but kept, so listings show it and it cannot come back.
    revoked: bool = False


class AdapterEvent(msgspec.Struct, kw_only=True, frozen=True, tag=True):
    """Registry changes, broadcast on ``subjects.ADAPTER_EVENTS`` so workers retire versions of
    the adapter other than ``version`` (every version when it was removed) once unused."""

    name: str
    removed: bool
    # The version now registered under the name; None when it was removed.
    version: str | None = None
