"""Merged mode: fold one adapter into the base weights (W + s·B·A) and take it out again exactly.

Merging rounds W + s·B·A to the weights' dtype, so subtracting s·B·A would not give W back bit
for bit (the drift the dLoRA artifact let accumulate). Before adding, the rows the adapter
touches are copied aside (to host memory when the model is on a GPU); unmerge copies them back,
so after any number of cycles the weights equal the originals exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dlora.model.config import Target
from dlora.services.worker.engine.lora import LoraAdapter
from dlora.services.worker.engine.weights import ModelWeights


@dataclass
class _Saved:
    weight: torch.Tensor  # the fused weight, modified in place
    rows: slice
    original: torch.Tensor  # copy of weight[rows] before the merge


class Merger:
    def __init__(self, weights: ModelWeights, targets: dict[str, Target]) -> None:
        self.weights = weights
        self.targets = targets
        self.merged: str | None = None
        self._saved: list[_Saved] = []

    def merge(self, adapter: LoraAdapter) -> None:
        if self.merged is not None:
            raise RuntimeError(f"{self.merged!r} is merged; unmerge it first")
        for (layer, target), w in adapter.weights.items():
            t = self.targets[target]
            weight = getattr(self.weights.layers[layer], t.fused)
            rows = slice(t.offset, t.offset + t.out_features)
            host = torch.device("cpu")
            self._saved.append(_Saved(weight, rows, weight[rows].to(host, copy=True)))
            a = w.a.to(weight.device, torch.float32)
            b = w.b.to(weight.device, torch.float32)
            merged = weight[rows].float() + (b @ a) * w.scale
            weight[rows] = merged.to(weight.dtype)
        self.merged = adapter.name

    def unmerge(self) -> None:
        for s in reversed(self._saved):
            s.weight[s.rows] = s.original.to(s.weight.device)
        self._saved.clear()
        self.merged = None
