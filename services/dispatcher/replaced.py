"""A request pinned to an adapter version that can no longer be loaded anywhere (its files were
rewritten since it was registered, and no worker holds it in memory), where the name was
registered again since: an RL trainer writes new weights over the files, then calls vLLM's
``load_inplace``, and a request sent in between names the version those files no longer hold."""

from __future__ import annotations

import msgspec

from dlora.common.messages import GenerateRequest
from dlora.common.state import StateStore


async def on_current_version(store: StateStore, req: GenerateRequest) -> GenerateRequest | None:
    """``req`` on the version of its adapter registered now, where it produced nothing yet (vLLM
    runs such a request on the weights loaded in place: a 500 asked the admin for the reload just
    done); None where it must fail: tokens already out, or perhaps out (a worker died with it: its
    record may lag what it sent), for a running request finishes on its own version or not at all;
    no newer registration; or one of another owner than the pinned
    version's (the caller was allowed that one, not necessarily this)."""
    if req.adapter is None or not req.adapter_version or req.resume_token_ids or req.next_seq:
        return None
    # A worker sends a step's chunks before it records them: one that died (or hung) with the
    # request may have sent tokens its record lacks, which a resume on other weights would go on
    # from (a review: its client's text mixed two versions). A record gone ends it anyway.
    if (held := await store.get_inflight(req.request_id)) is not None and (held.deaths or held.tokens):
        return None
    current = await store.get_adapter(req.adapter)
    if current is None or current.version in ("", req.adapter_version):
        return None
    pinned = await store.get_adapter(req.adapter, req.adapter_version)
    if pinned is None or pinned.owner != current.owner:
        return None
    return msgspec.structs.replace(req, adapter_version=current.version)
