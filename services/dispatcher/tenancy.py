"""What an application on the bus may set and name: not the workers' own fields (``as_taken``);
it is the tenant named by its NATS user, and uses the public adapters and its own. Another
tenant's is, to it, not there: the same answer as a name never registered, as the gateway answers
a key of another tenant (README, NATS-native API)."""

from __future__ import annotations

import msgspec

from dlora.common import subjects
from dlora.common.messages import AdapterEntry, GenerateRequest
from dlora.common.state import StateStore


def as_taken(req: GenerateRequest, owner: str) -> GenerateRequest:
    """``req`` as the dispatcher takes it from ``owner`` (its sender's NATS user, "" for a gateway):
    the workers' own fields cleared, the owner set, an adapter named "" read as the base model (as
    the gateway reads a model named ""), and a ``client`` that is not ``owner``'s to name cleared.
    ``req`` itself where nothing changes (its bytes are forwarded as they came)."""
    # the workers' own fields: a shipped cache that never comes would hold a worker 5 s; outputs to
    # resume from would never be sent. Gateways never set them.
    clean = dict(owner=owner, kv_chunks=0, kv_transfer="", kv_export_s=0.0, recoveries=0, recorded=False)
    clean |= dict(continued=False, resume_token_ids=[], resume_text_pending=0, resume_text_held="", next_seq=0)
    clean |= dict(queued_s=0.0)  # (a move's wait: an application's named its own first chunk's queue time)
    if req.adapter == "":
        clean["adapter"] = None
    if owner and not subjects.owns_client(owner, req.client):  # another's reader: not its to name
        clean["client"] = ""
    if all(getattr(req, k) == v for k, v in clean.items()):
        return req
    return msgspec.structs.replace(req, **clean)


def _sees(owner: str, entry: AdapterEntry | None) -> bool:
    return entry is not None and entry.owner in ("", owner)


async def unseen(store: StateStore, owner: str, adapter: str, version: str | None) -> str | AdapterEntry:
    """Why the application ``owner`` may not use ``adapter`` (``version`` of it, where given): the
    name or the version is not registered, or is another tenant's, said alike (the words a worker
    uses for a version it cannot find). Else the entry it may use, its version the one the request
    runs on where it names none (read again later, the name could be another tenant's by then).

    Answered here, for every name it may not use: a name never registered went on to a worker,
    whose answer named it (``worker``) and said "(removed)" where a version was given, while
    another tenant's was answered here; the difference told one from the other (a helper's
    finding). What a worker still refuses was registered when looked at here, so its "(removed)"
    is true. Raises the store's errors (Redis unreachable)."""
    if (entry := await store.get_adapter(adapter)) is None or not _sees(owner, entry):
        return f"adapter {adapter!r} is not registered"
    if version and not _sees(owner, await store.get_adapter(adapter, version)):  # (a retired one of its own may run)
        return f"adapter {adapter!r} version {version} is not registered"
    return entry
