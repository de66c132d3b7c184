"""The worker's inference engine: model, paged KV cache, continuous batching, merged and unmerged LoRA.

The names below load on first use (PEP 562), so a process that needs only a torch-free module of
this package (the gateway checks schemas with ``structured``) does not import torch and the model.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

from dlora.services.worker.engine.config import EngineConfig

__all__ = ["EngineConfig", "LLMEngine", "RequestError", "RequestOutput"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        return getattr(import_module("dlora.services.worker.engine.engine"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
