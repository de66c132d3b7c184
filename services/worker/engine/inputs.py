"""One step's model inputs from its batch: the flat token ids and positions, and the kernel path's
attention and LoRA metadata, built once per step and shared by every layer."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from dlora.kernels.backend import Kernels
from dlora.kernels.host import to_device
from dlora.services.worker.engine.block_manager import BlockManager
from dlora.services.worker.engine.model import StepInputs
from dlora.services.worker.engine.placement import StepSlots
from dlora.services.worker.engine.sequence import Sequence


@dataclass
class StepRows:
    """A step's inputs as host lists: per token (``ids`` to ``minus_slots``) and per sequence."""

    ids: list[int] = field(default_factory=list)
    positions: list[int] = field(default_factory=list)
    seq_lens: list[int] = field(default_factory=list)  # the token's sequence's context after this step
    slots: list[int] = field(default_factory=list)  # flat KV cache slot the token's K/V go to
    token_slots: list[int] = field(default_factory=list)  # device slot of the delta it adds, -1: none
    minus_slots: list[int] = field(default_factory=list)  # device slot of the delta it subtracts, -1: none
    q_lens: list[int] = field(default_factory=list)  # new tokens of each sequence
    ctx_lens: list[int] = field(default_factory=list)  # its context after this step
    tables: list[list[int]] = field(default_factory=list)  # its block table


def step_rows(batch: list[Sequence], lora: StepSlots, blocks: BlockManager) -> StepRows:
    """Each sequence's scheduled tokens back to back (a prompt or a chunk of it at prefill, one
    token at decode), with their KV slots and the device slots of the LoRA deltas each adds and
    subtracts (``lora``)."""
    r = StepRows()
    for s in batch:
        new = s.scheduled_ids()
        n = len(new)
        total = s.num_cached + n  # its context once this step's tokens are in
        r.ids += new
        r.positions += range(s.num_cached, total)
        r.seq_lens += [total] * n
        r.slots += blocks.slots(s.request_id, s.num_cached, total)
        added, subtracted = lora.slots_of(s.adapter)
        r.token_slots += [added] * n
        r.minus_slots += [subtracted] * n
        r.q_lens.append(n)
        r.ctx_lens.append(total)
        r.tables.append(blocks.table(s.request_id))
    return r


def build_inputs(
    batch: list[Sequence],
    lora: StepSlots,
    blocks: BlockManager,
    kernels: Kernels,
    device: torch.device,
) -> StepInputs:
    """The tensors of ``step_rows`` on ``device``, with the kernel path's metadata."""
    r = step_rows(batch, lora, blocks)
    dev = device
    return StepInputs(
        input_ids=to_device(r.ids, torch.int64, dev),
        positions=to_device(r.positions, torch.int64, dev),
        seq_lens=to_device(r.seq_lens, torch.int64, dev),
        last_index=to_device(np.cumsum(r.q_lens) - 1, torch.int64, dev),
        attention=kernels.attention_metadata(r.q_lens, r.ctx_lens, r.tables, r.slots, blocks.block_size, dev),
        lora=kernels.lora_metadata(r.token_slots, dev, r.minus_slots if lora.minus >= 0 else None),
    )
