"""Device slots for adapters: an LRU table (pure bookkeeping) and the per-layer slices it fills.

The engine holds every registered adapter in host memory and copies at most ``num_slots`` of
them to the device; a step can only use adapters that are resident, and an adapter used by the
running step is never evicted.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Set as AbstractSet
from dataclasses import dataclass

import torch

from dlora.kernels.lora import LoraProjection, LoraSlice
from dlora.model.config import ModelConfig, targets
from dlora.services.worker.engine.lora import LoraAdapter


class NoFreeSlot(RuntimeError):
    """Every slot holds an adapter the caller pinned."""


@dataclass(frozen=True)
class SlotChange:
    slot: int
    loaded: str  # adapter now in the slot
    evicted: str | None  # adapter it replaced, if any


class SlotTable:
    """Which adapter sits in which slot, least recently used first."""

    def __init__(self, num_slots: int) -> None:
        if num_slots < 1:
            raise ValueError(f"num_slots={num_slots} must be >= 1")
        self.num_slots = num_slots
        self._lru: OrderedDict[str, int] = OrderedDict()

    def slot_of(self, name: str) -> int | None:
        return self._lru.get(name)

    @property
    def resident(self) -> list[str]:
        return list(self._lru)

    def acquire(self, name: str, pinned: AbstractSet[str] = frozenset()) -> tuple[int, SlotChange | None]:
        """The slot for ``name``, placing it if needed (evicting the LRU adapter not in ``pinned``)."""
        if name in self._lru:
            self._lru.move_to_end(name)
            return self._lru[name], None
        evicted = None
        if len(self._lru) < self.num_slots:
            used = set(self._lru.values())
            slot = next(s for s in range(self.num_slots) if s not in used)
        else:
            evicted = next((n for n in self._lru if n not in pinned), None)
            if evicted is None:
                raise NoFreeSlot(f"all {self.num_slots} adapter slots are pinned")
            slot = self._lru.pop(evicted)
        self._lru[name] = slot
        return slot, SlotChange(slot, name, evicted)

    def drop(self, name: str) -> int | None:
        """Forget ``name``; returns the slot it freed."""
        return self._lru.pop(name, None)


class DeviceLoras:
    """Per layer, per fused projection ('qkv', 'o', 'gate_up', 'down'): the LoraSlices of every slot,
    and (``tables``: for the Triton kernels) their address tables, rebuilt whenever a slot changes."""

    def __init__(
        self, cfg: ModelConfig, num_slots: int, dtype: torch.dtype, device: torch.device, tables: bool = False
    ) -> None:
        self.dtype, self.device, self.tables = dtype, device, tables
        self.rank_bound = 0
        self.targets = targets(cfg)
        self.layers: list[dict[str, LoraProjection]] = []
        self._slice: list[dict[str, LoraSlice]] = []  # layer -> target name -> its slice
        for _ in range(cfg.num_layers):
            fused: dict[str, list[LoraSlice]] = {}
            by_target = {}
            for name, t in self.targets.items():
                sl = LoraSlice(t.offset, t.out_features, [None] * num_slots, [None] * num_slots, [0.0] * num_slots)
                fused.setdefault(t.fused, []).append(sl)
                by_target[name] = sl
            self.layers.append({name: LoraProjection(slices) for name, slices in fused.items()})
            self._slice.append(by_target)
        self._refresh()

    def load(self, slot: int, adapter: LoraAdapter) -> None:
        # The largest rank ever loaded, as a power of two of at least 16: what a CUDA graph's LoRA
        # launches are sized for (engine/graphs.py), so it changes a few times at most.
        self.rank_bound = max(self.rank_bound, 1 << (max(16, adapter.rank) - 1).bit_length())
        self._empty(slot)
        try:
            for (layer, target), w in adapter.weights.items():
                sl = self._slice[layer][target]
                sl.a[slot] = w.a.to(device=self.device, dtype=self.dtype).contiguous()
                sl.b[slot] = w.b.to(device=self.device, dtype=self.dtype).contiguous()
                sl.scale[slot] = w.scale
        finally:
            self._refresh()  # also after a failed copy: nothing may point at the slot's old weights

    def weights_of(self, slot: int) -> dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]]:
        """The A (rank, in_features) and B (out_features, rank) the adapter in ``slot`` holds on the
        device, by (layer, PEFT target name); empty for an empty slot."""
        return {
            (layer, target): (a, b)
            for layer, by_target in enumerate(self._slice)
            for target, sl in by_target.items()
            if (a := sl.a[slot]) is not None and (b := sl.b[slot]) is not None
        }

    def clear(self, slot: int) -> None:
        self._empty(slot)
        self._refresh()

    def _empty(self, slot: int) -> None:
        for by_target in self._slice:
            for sl in by_target.values():
                sl.a[slot] = sl.b[slot] = None
                sl.scale[slot] = 0.0

    def _refresh(self) -> None:
        # The tables hold raw addresses of the slot tensors, and the stacks copies of them: both
        # must follow every change.
        for fused in self.layers:
            for proj in fused.values():
                proj.forget()
                if self.tables:
                    proj.refresh(self.device)
