"""Changing the merged adapter, timed as the engine pays it: the old one out, the new one in, each
until its copies end on the device (``LLMEngine._synchronize``), recorded in the engine's stats."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from dlora.services.worker.engine.engine import LLMEngine


def switch(engine: LLMEngine, merged: str | None) -> tuple[float, float]:
    """Merge/unmerge so that ``merged`` (None: base weights) is ``engine``'s merged adapter;
    seconds spent merging and unmerging. KeyError for an unknown adapter."""
    if merged == engine.merger.merged:
        return 0.0, 0.0
    # Named until the switch is done: left when it raised, a device lost in it is their requests'
    # doing though none was scheduled yet (the worker's hand-over, ``LLMEngine.switching``)
    engine.switching = {a for a in (engine.merger.merged, merged) if a is not None}
    unmerge_s = unmerge(engine) if engine.merger.merged is not None else 0.0
    merge_s = 0.0
    if merged is not None:
        start = engine.clock()
        # A and B from the adapter's device slot when it has one (no host copy); a merge takes no
        # slot of its own, so it evicts nothing the next unmerged step needs.
        slot = engine.slots.slot_of(merged)
        engine.merger.merge(engine.adapters[merged], engine.device_loras.weights_of(slot) if slot is not None else None)
        engine._synchronize()
        merge_s = engine.clock() - start
        engine.stats.record_merge(merge_s)
    engine.switching = set()
    return merge_s, unmerge_s


def unmerge(engine: LLMEngine) -> float:
    """Take ``engine``'s merged adapter out of the weights; the seconds it took."""
    start = engine.clock()
    engine.merger.unmerge()
    engine._synchronize()
    engine.stats.record_unmerge(seconds := engine.clock() - start)
    return seconds
