"""Which adapters an application on the bus may name: it is the tenant named by its NATS user, and
uses the public adapters and its own. Another tenant's is, to it, not there: the same answer as a
name never registered, as the gateway answers a key of another tenant (README, NATS-native API)."""

from __future__ import annotations

from dlora.common.messages import AdapterEntry
from dlora.common.state import StateStore


def _sees(owner: str, entry: AdapterEntry | None) -> bool:
    return entry is not None and entry.owner in ("", owner)


async def unseen(store: StateStore, owner: str, adapter: str, version: str | None) -> str | None:
    """Why the application ``owner`` may not use ``adapter`` (``version`` of it, where given): the
    name or the version is not registered, or is another tenant's, said alike (the words a worker
    uses for a version it cannot find). None: it may, and a worker loads it.

    Answered here, for every name it may not use: a name never registered went on to a worker,
    whose answer named it (``worker``) and said "(removed)" where a version was given, while
    another tenant's was answered here; the difference told one from the other (a helper's
    finding). What a worker still refuses was registered when looked at here, so its "(removed)"
    is true. Raises the store's errors (Redis unreachable)."""
    if not _sees(owner, await store.get_adapter(adapter)):
        return f"adapter {adapter!r} is not registered"
    if version and not _sees(owner, await store.get_adapter(adapter, version)):  # (a retired one of its own may run)
        return f"adapter {adapter!r} version {version} is not registered"
    return None
