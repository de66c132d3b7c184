"""Merged mode: fold one adapter into the base weights (W + s·B·A) and take it out again exactly.

Merging rounds W + s·B·A to the weights' dtype, so subtracting s·B·A would not give W back bit
for bit (the drift the dLoRA artifact let accumulate). Before adding, the rows the adapter
touches are copied aside on the weights' own device (a device-to-device copy: on a GPU no host
round trip, which cost 600 ms per merge at 7B widths on an H200); unmerge copies them back, so
after any number of cycles the weights equal the originals exactly. The price is device memory
for one copy of the touched rows while an adapter is merged.

Only an adapter whose change is small beside the weights is merged. A mixed step computes its
other requests as x·(W + ΔW)ᵀ − x·ΔWᵀ: the rounding of the large sum stays in the difference, about
the dtype's epsilon times ‖ΔW‖/‖W‖ of each output, so an adapter far larger than the weights (in
the limits an adapter is refused by, a weight of 100 at scale 8 is ‖ΔW‖/‖W‖ ~ 10⁷) would spoil
every other tenant's tokens in its steps. Such an adapter runs unmerged only (``unmergeable``,
which the policies leave alone).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch

from dlora.kernels.merge import merge_rows
from dlora.model.config import Target
from dlora.services.worker.engine.lora import LoraAdapter
from dlora.services.worker.engine.weights import ModelWeights

# Largest ‖ΔW‖/‖W‖ an adapter may have to be merged (module docstring): at 1 a mixed step's other
# requests carry a relative error of a few ε (fp32: ~1e-7); trained adapters are far below it (the
# LoRA paper, Hu et al. 2021, §7.3: ‖ΔW_q‖ 6.91 against ‖W_q‖ 61.95 in GPT-3), so this leaves out
# only adapters no training makes.
MAX_MERGE_DELTA = 1.0


@dataclass
class _Saved:
    weight: torch.Tensor  # the fused weight, modified in place
    rows: slice
    original: torch.Tensor  # copy of weight[rows] before the merge, on the same device


class Merger:
    """Merges at most one adapter at a time into ``weights`` and restores them bit for bit."""

    def __init__(
        self,
        weights: ModelWeights,
        targets: dict[str, Target],
        merge: Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, float], None] = merge_rows,
    ) -> None:
        """``merge``: the kernel path's ``merge_rows`` (weight rows, saved, A, B, scale)."""
        self.weights = weights
        self.targets = targets
        self._merge_rows = merge
        self.merged: str | None = None
        self._saved: list[_Saved] = []
        self.unmergeable: set[str] = set()  # adapters too large beside the weights to merge (the policy's too)
        # ‖Wᵢ‖ per row of each (layer, target), taken here while nothing is merged and only read
        # after: an adapter read on another thread is assessed while a step merges (``assessed``)
        self._norms = {(i, t): self._norms_of(i, t) for i in range(len(weights.layers)) for t in targets}

    def assessed(self, adapter: LoraAdapter) -> LoraAdapter:
        """``adapter`` with its ``merge_delta`` (``delta_ratio``); safe beside a step on another thread."""
        adapter.merge_delta = self.delta_ratio(adapter)
        return adapter

    def admit(self, adapter: LoraAdapter) -> None:
        """Mark ``adapter`` unmergeable if its change to any output row of a weight it touches is
        larger than ``MAX_MERGE_DELTA`` × that row."""
        self.unmergeable.discard(adapter.name)
        if (adapter.merge_delta if adapter.merge_delta is not None else self.delta_ratio(adapter)) > MAX_MERGE_DELTA:
            self.unmergeable.add(adapter.name)

    def delta_ratio(self, adapter: LoraAdapter) -> float:
        """The largest ‖scale·(B·A)ᵢ‖ / ‖Wᵢ‖ over the output rows i of the (layer, target)s
        ``adapter`` touches: a batch mate's error in output i scales with its row's ratio, so a
        change in a few rows is not averaged away over the others. Row norms of B·A from
        ((B·AAᵀ) ∘ B) summed over the rank, no out × in product formed; a row of W near zero is
        counted at a thousandth of the weight's mean row norm."""
        worst = 0.0
        for key, w in adapter.weights.items():
            a, b = w.a.double(), w.b.double()
            delta = abs(w.scale) * ((b @ (a @ a.T)) * b).sum(dim=1).clamp(min=0).sqrt()
            rows = self._norms[key]
            floor = 1e-3 * float(rows.square().mean().sqrt())
            worst = max(worst, float((delta / rows.clamp(min=max(floor, 1e-30))).max()))
        return worst

    def _norms_of(self, layer: int, target: str) -> torch.Tensor:
        """‖Wᵢ‖ of each output row of ``target`` in ``layer``: (out_features,) float64 on the host,
        a block of rows at a time in fp32 (no copy of the whole weight), one copy to the host."""
        t = self.targets[target]
        w = getattr(self.weights.layers[layer], t.fused)[t.offset : t.offset + t.out_features]
        return torch.cat([w[i : i + 1024].float().norm(dim=1) for i in range(0, len(w), 1024)]).cpu().double()

    def merge(
        self, adapter: LoraAdapter, resident: Mapping[tuple[int, str], tuple[torch.Tensor, torch.Tensor]] | None = None
    ) -> None:
        """W[rows] = W[rows] + scale·B·A for each (layer, target) the adapter holds, computed in fp32
        and rounded once to the weights' dtype. ``resident``: the adapter's A (rank, in_features)
        and B (out_features, rank) already on the weights' device (its slot's), by (layer, PEFT
        target), used where they hold the same values as host memory (same dtype); the others
        are copied from host memory. RuntimeError if an adapter is merged already; if the merge
        fails part way (out of device memory for the saved rows, say), the rows changed so far
        are restored before the error propagates, so the base weights are never left half merged.
        ValueError for an ``unmergeable`` adapter."""
        if self.merged is not None:
            raise RuntimeError(f"{self.merged!r} is merged; unmerge it first")
        if adapter.name in self.unmergeable:
            raise ValueError(f"adapter {adapter.name!r} is too large beside the base weights to merge")
        resident = resident or {}
        try:
            for key, w in adapter.weights.items():
                layer, target = key
                t = self.targets[target]
                weight = getattr(self.weights.layers[layer], t.fused)
                rows = slice(t.offset, t.offset + t.out_features)
                a, b = resident.get(key, (w.a, w.b))
                if a.dtype != w.a.dtype:  # a slot in half precision: merge from the exact host values
                    a, b = w.a, w.b
                a, b = (x.to(weight.device).contiguous() for x in (a, b))
                saved = torch.empty_like(weight[rows])
                self._merge_rows(weight[rows], saved, a, b, w.scale)
                self._saved.append(_Saved(weight, rows, saved))
        except BaseException:
            self.unmerge()
            raise
        self.merged = adapter.name

    def touched(self, adapter: LoraAdapter) -> list[torch.Tensor]:
        """Views of the weight rows a merge of ``adapter`` rewrites, one per (layer, target)."""
        views = []
        for layer, target in adapter.weights:
            t = self.targets[target]
            views.append(getattr(self.weights.layers[layer], t.fused)[t.offset : t.offset + t.out_features])
        return views

    def unmerge(self) -> None:
        """Put back the rows saved at merge (exactly the original bits); a no-op when none are."""
        for s in reversed(self._saved):
            s.weight[s.rows] = s.original
        self._saved.clear()
        self.merged = None
