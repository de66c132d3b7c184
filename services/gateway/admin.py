"""Adapter registration checks: the directory, and every file read from it, must resolve inside a
configured root, and the files must make a valid adapter for the base model within the limits
(``dlora.model.adapter_files``). Returns the registry entry or raises APIError(400)."""

from __future__ import annotations

import re
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Annotated

import msgspec

from dlora.common.apikeys import TENANT_PATTERN, tenant_problem
from dlora.common.messages import AdapterEntry
from dlora.common.registry import NAME_PATTERN, valid_name
from dlora.model.adapters import AdapterError, AdapterLimits, inspect_adapter
from dlora.model.config import ModelConfig
from dlora.services.gateway.openai import APIError, documented


class AdapterBody(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """``POST /v1/adapters``: the name to register, the adapter's directory, and the tenant that
    owns it (only that tenant's API keys list and use it; unset or empty: public)."""

    # (said in the OpenAPI document too; the checks below say why in their own words)
    name: Annotated[str, documented(pattern=f"^{NAME_PATTERN}$", maxLength=128)]
    path: str
    owner: Annotated[str, documented(pattern=f"^{TENANT_PATTERN}$")] | None = None


def check_adapter(
    name: str,
    path: str,
    roots: list[str],
    base_name: str,
    cfg: ModelConfig,
    limits: AdapterLimits | None = None,
    owner: str = "",
) -> AdapterEntry:
    """Blocking (it reads and checks every weight): the gateway runs it in a thread.

    Raises:
        APIError(400): a bad name or owner, or a path that is not a readable adapter directory
            inside the roots.
    """
    if not valid_name(name or ""):
        raise APIError(
            400,
            "adapter name must be 1-128 letters, digits, '.', '_', '-' or '/', beginning with a letter or digit, "
            "a '.' or '/' only between two others",
            param="name",
        )
    if owner and (problem := tenant_problem(owner)) is not None:
        raise APIError(400, problem.replace("tenant", "owner", 1), param="owner")
    if name == base_name:
        raise APIError(400, f"{name!r} is the base model's name", param="name")
    if "\x00" in path:  # no file name holds one: the OS refuses it (Path raises ValueError)
        raise APIError(400, "adapter path must not contain a NUL character", param="path")
    try:
        # resolve(): a directory reached through a symlink is judged where it really is; "~" is
        # the gateway's home, as vLLM's get_adapter_absolute_path expands it (it was "outside")
        resolved = Path(path).expanduser().resolve()
        if not any(resolved.is_relative_to(Path(root).expanduser().resolve()) for root in roots):
            raise APIError(
                400,
                f"adapter path {path!r} is outside the adapter roots {roots} (the gateway's adapter_roots "
                f"setting; `dlora up --lora NAME=DIR` adds DIR's folder){_repo_hint(path)}",
                param="path",
            )
        if not resolved.is_dir():
            raise APIError(400, f"adapter path {path!r} is not a directory{_repo_hint(path)}", param="path")
    except (OSError, RuntimeError) as e:  # a name too long, a loop of links, no permission, no home
        why = getattr(e, "strerror", None) or e  # (a RuntimeError has none: raised here, it was a 500)
        raise APIError(400, f"adapter path {path!r} cannot be read: {why}", param="path") from None
    try:
        adapter = inspect_adapter(name, resolved, cfg, limits, roots)
    except AdapterError as e:
        raise APIError(400, str(e), param="path") from None
    return AdapterEntry(
        name=name,
        path=str(resolved),
        rank=adapter.rank,
        created=time.time(),
        version=adapter.digest,
        owner=owner,
        file_bytes=adapter.file_bytes,
    )


# A Hugging Face repo id ("org/name"), which vLLM downloads where a path is not found
_REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


def _repo_hint(path: str) -> str:
    """Said beside a refused path that reads as a repo id: vLLM users give one (its docs do), were
    told only "outside the adapter roots", added the roots, and were refused again."""
    if not _REPO_ID.fullmatch(path):
        return ""
    return (
        " (a Hugging Face repo id is not downloaded here, as vLLM would: give the directory of its "
        f"files, e.g. the one `hf download {path}` prints)"
    )


def lora_roots(paths: Iterable[str]) -> list[str]:
    """The adapter roots ``dlora up --lora NAME=DIR`` adds: each DIR's folder, or, for a snapshot
    of the Hugging Face cache (``models--ORG--NAME/snapshots/COMMIT``, the path vLLM's
    ``--lora-modules`` is given), the repository's folder: the snapshot's files link to its
    ``blobs``, which the snapshots folder does not hold, so every one of them was refused. An
    adapter directly under ``/`` adds itself: its folder, ``/``, would let the admin API load from
    anywhere."""
    roots = set()
    for path in paths:
        adapter = Path(path).expanduser().resolve()  # ~ as check_adapter reads it
        folder = adapter.parent
        in_hub_cache = folder.name == "snapshots" and (folder.parent / "blobs").is_dir()
        roots.add(str(folder.parent if in_hub_cache else adapter if folder == folder.parent else folder))
    return sorted(roots)
