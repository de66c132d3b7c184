"""LoRA adapters in host memory, as ``dlora.model.adapters`` validated them: the tensors it named,
with their scaling. Module names, config fields and the checks follow PEFT (see that module)."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load

from dlora.model.adapters import AdapterError, AdapterLimits, AdapterRefused, read_adapter_files, validate
from dlora.model.config import ModelConfig

__all__ = ["AdapterError", "AdapterLimits", "AdapterRefused", "LoraAdapter", "LoraWeight", "load_adapter"]


@dataclass
class LoraWeight:
    a: torch.Tensor  # (rank, in_features)
    b: torch.Tensor  # (out_features, rank)
    scale: float


@dataclass
class LoraAdapter:
    name: str
    path: Path
    # (layer index, PEFT target name such as "q_proj") -> weights
    weights: dict[tuple[int, str], LoraWeight]
    digest: str = ""  # its version: AdapterSpec.digest
    merge_delta: float | None = None  # its largest ‖ΔWᵢ‖/‖Wᵢ‖ (``Merger.assessed``), once read by an engine
    file_bytes: int = 0  # its files' (AdapterSpec.file_bytes: what reading it read)

    @functools.cached_property
    def rank(self) -> int:
        """The largest rank of its modules (asked for every queued request every step: cached,
        as the weights never change after load)."""
        return max(w.a.shape[0] for w in self.weights.values())

    @property
    def nbytes(self) -> int:
        return sum(w.a.nbytes + w.b.nbytes for w in self.weights.values())

    @property
    def target_names(self) -> set[str]:
        return {t for _, t in self.weights}


def load_adapter(name: str, path: str | Path, cfg: ModelConfig, limits: AdapterLimits | None = None) -> LoraAdapter:
    """Read and validate a PEFT LoRA directory, then its tensors; raise AdapterError with the
    reason if it is unusable. The files are checked here as at registration (limits, dtypes,
    finite values), on the bytes that are then loaded: files changed since are caught even before
    the worker compares their digest with the registered one."""
    conf_bytes, weight_bytes = read_adapter_files(name, path, limits)
    spec = validate(name, path, conf_bytes, weight_bytes, cfg, limits)
    try:
        tensors = load(weight_bytes)
    except SafetensorError as e:  # (its header passed ``validate``'s check, made to refuse the same)
        error = AdapterError(f"adapter {name!r}: cannot read {Path(path) / 'adapter_model.safetensors'} ({e})")
        error.digest = spec.digest
        raise error from None
    weights = {k: LoraWeight(a=tensors[m.a_key], b=tensors[m.b_key], scale=m.scale) for k, m in spec.modules.items()}
    return LoraAdapter(name=name, path=Path(path), weights=weights, digest=spec.digest, file_bytes=spec.file_bytes)
