"""The model cards of ``GET /v1/models`` and ``GET /v1/models/{model}``: the base model and every
adapter a caller may use, in OpenAI's ``model`` object shape with vLLM's ``root`` and ``parent``.
Pure: the handlers read the workers and the adapter registry and pass them in."""

from __future__ import annotations

from typing import Any

from dlora.common.messages import AdapterEntry, WorkerStats
from dlora.model.config import same_model
from dlora.services.gateway.auth import Principal


def model_cards(
    base_name: str,
    workers: list[WorkerStats],
    adapters: list[AdapterEntry],
    who: Principal,
    created: int,
    max_model_len: int,
    model_digest: str = "",
) -> list[dict[str, Any]]:
    """The base model (naming the live workers serving it, with the device and dtype of each:
    ``served_by``), then each adapter ``who`` may use, with the base as its parent and ``owned_by``
    its tenant (dlora when public). Where an adapter's files lie is for admin callers only: others
    see its name as its root. ``created``: Unix seconds, the base model's; ``max_model_len``: the
    context a request may fill, on every card (vLLM's). A worker of another base model than
    ``model_digest`` (a deployment that mixes models) serves none of it: not named."""
    workers = [w for w in workers if same_model(w.model_digest, model_digest)]
    cards: list[dict[str, Any]] = [
        {
            "id": base_name,
            "object": "model",
            "created": created,
            "owned_by": "dlora",
            "root": base_name,
            "parent": None,
            "max_model_len": max_model_len,
            "served_by": [{"worker": w.worker, "device": w.device, "dtype": w.dtype} for w in workers],
        }
    ]
    cards += [
        {
            "id": e.name,
            "object": "model",
            "created": int(e.created),
            "owned_by": e.owner or "dlora",
            "root": e.path if who.admin else e.name,
            "parent": base_name,
            "max_model_len": max_model_len,
            "rank": e.rank,
            "version": e.version,
        }
        for e in adapters
        if who.may_use(e)
    ]
    return cards
