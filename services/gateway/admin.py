"""Adapter registration checks: the directory must lie inside a configured root and load as a
valid adapter for the base model. Returns the registry entry or raises APIError(400)."""

from __future__ import annotations

import re
import time
from pathlib import Path

from dlora.common.messages import AdapterEntry
from dlora.model.adapters import AdapterError, inspect_adapter
from dlora.model.config import ModelConfig
from dlora.services.gateway.openai import APIError

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


def check_adapter(name: str, path: str, roots: list[str], base_name: str, cfg: ModelConfig) -> AdapterEntry:
    if not _NAME.match(name or ""):
        raise APIError(400, "adapter name must be 1-128 letters, digits, '.', '_' or '-'", param="name")
    if name == base_name:
        raise APIError(400, f"{name!r} is the base model's name", param="name")
    resolved = Path(path).resolve()
    if not any(resolved.is_relative_to(Path(root).resolve()) for root in roots):
        raise APIError(400, f"adapter path {path!r} is outside the configured adapter roots", param="path")
    if not resolved.is_dir():
        raise APIError(400, f"adapter path {path!r} is not a directory", param="path")
    try:
        adapter = inspect_adapter(name, resolved, cfg)  # the header's shapes: no tensor is loaded here
    except AdapterError as e:
        raise APIError(400, str(e), param="path") from None
    return AdapterEntry(name=name, path=str(resolved), rank=adapter.rank, created=time.time(), version=adapter.digest)
