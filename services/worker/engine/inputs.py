"""One step's model inputs from its batch: the flat token ids and positions, and the kernel path's
attention and LoRA metadata, built once per step and shared by every layer."""

from __future__ import annotations

import torch

from dlora.kernels.backend import Kernels
from dlora.services.worker.engine.block_manager import BlockManager
from dlora.services.worker.engine.model import StepInputs
from dlora.services.worker.engine.placement import StepSlots
from dlora.services.worker.engine.sequence import Sequence


def build_inputs(
    batch: list[Sequence],
    lora: StepSlots,
    blocks: BlockManager,
    kernels: Kernels,
    device: torch.device,
) -> StepInputs:
    """Each sequence's scheduled tokens back to back (a prompt or a chunk of it at prefill, one
    token at decode), with their KV slots and the device slots of the LoRA deltas it adds and subtracts (``lora``)."""
    ids: list[int] = []
    positions: list[int] = []
    seq_lens: list[int] = []
    slots: list[int] = []
    token_slots: list[int] = []
    minus_slots: list[int] = []
    q_lens, ctx_lens, tables = [], [], []
    for s in batch:
        new = s.scheduled_ids()
        n = len(new)
        total = s.num_cached + n  # its context once this step's tokens are in
        ids += new
        positions += range(s.num_cached, total)
        seq_lens += [total] * n
        slots += blocks.slots(s.request_id, s.num_cached, total)
        added, subtracted = lora.slots_of(s.adapter)
        token_slots += [added] * n
        minus_slots += [subtracted] * n
        q_lens.append(n)
        ctx_lens.append(total)
        tables.append(blocks.table(s.request_id))
    dev = device
    last = torch.tensor(q_lens).cumsum(0) - 1
    return StepInputs(
        input_ids=torch.tensor(ids, dtype=torch.int64, device=dev),
        positions=torch.tensor(positions, dtype=torch.int64, device=dev),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int64, device=dev),
        last_index=last.to(dev),
        attention=kernels.attention_metadata(q_lens, ctx_lens, tables, slots, blocks.block_size, dev),
        lora=kernels.lora_metadata(token_slots, dev, minus_slots if lora.minus >= 0 else None),
    )
