"""The model's forward over a step's batch, through the decode CUDA graphs where they take it,
eagerly otherwise; a request whose forward fails fails alone (``run``: the caller ends it)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from dlora.common import log
from dlora.services.worker.engine import prompt_logprobs
from dlora.services.worker.engine.faults import describe, raise_if_lost
from dlora.services.worker.engine.inputs import Carry
from dlora.services.worker.engine.placement import StepSlots
from dlora.services.worker.engine.sequence import Sequence

if TYPE_CHECKING:
    from dlora.services.worker.engine.engine import LLMEngine

logger = log.get("engine")


def run(
    engine: LLMEngine, batch: list[Sequence], slots: StepSlots, carry: Carry | None = None
) -> tuple[list[Sequence], torch.Tensor | None, list[tuple[Sequence, str]]]:
    """Logits (B, vocab) of the sequences that ran, and those that could not with the reason
    (for the caller to fail: with async scheduling, after the last step's token is taken in);
    the tokens the last step reserved taken from ``carry``. When the batch's forward
    raises, each sequence runs alone, so a request that brings the model down fails by itself
    and its batch mates go on (their KV writes repeat the same values into the same slots, so
    a second pass is harmless). Blocks given out since the last step are zeroed first
    (``BlockManager.take_fresh``)."""
    engine.model.kv.zero_blocks(engine.blocks.take_fresh())
    if engine.graphs is not None and engine.graphs.runs(batch) and not any(s.collects_prompt_logprobs for s in batch):
        try:
            return batch, engine.graphs.forward(batch, slots, engine.blocks, carry), []
        except Exception as e:  # noqa: BLE001 - a graph the driver refuses must not stop serving
            raise_if_lost(e)
            logger.warning("cuda graphs off: this engine runs every step eagerly from now on", error=describe(e))
            engine.graphs = None
    try:
        return batch, prompt_logprobs.forward(engine.model, engine._inputs(batch, slots, carry), batch), []
    except Exception as e:  # noqa: BLE001 - see the docstring
        raise_if_lost(e)
        if len(batch) == 1:
            return [], None, [(batch[0], f"the model step failed: {describe(e)}")]
    ran, rows, failed = [], [], []
    for seq in batch:
        try:
            rows.append(prompt_logprobs.forward(engine.model, engine._inputs([seq], slots, carry), [seq]))
            ran.append(seq)
        except Exception as e:  # noqa: BLE001
            raise_if_lost(e)
            failed.append((seq, f"the model step failed: {describe(e)}"))
    return ran, torch.cat(rows) if rows else None, failed
