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
    seq_lens: list[int] = field(default_factory=list)  # each token's sequence length as generate rotated it
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
        # Each token's sequence length as transformers' generate rotated it (only dynamic NTK reads
        # it): the prompt's at the prompt's length, each later one at its own. At this step's total,
        # a recompute after preemption or a resume rotated every key at the new length (a helper).
        prompt = len(s.prompt_ids)  # (as lists, not a loop per token: 23 ms per 128k-token prefill)
        r.seq_lens += [prompt] * max(0, min(total, prompt) - s.num_cached)
        r.seq_lens += range(max(prompt, s.num_cached) + 1, total + 1)
        r.slots += blocks.slots(s.request_id, s.num_cached, total)
        added, subtracted = lora.slots_of(s.adapter)
        r.token_slots += [added] * n
        r.minus_slots += [subtracted] * n
        r.q_lens.append(n)
        r.ctx_lens.append(total)
        r.tables.append(blocks.table(s.request_id))
    return r


@dataclass(frozen=True)
class Carry:
    """The last step's sampled tokens, still on the device (async scheduling): ``tokens`` (B,)
    int64, and by request id the sequence and the row of ``tokens`` each drew. Until that step's
    result is taken in, each of those sequences ends in a ``RESERVED`` token on the host."""

    tokens: torch.Tensor
    rows: dict[str, tuple[Sequence, int]]


def carry_into(ids: torch.Tensor, batch: list[Sequence], carry: Carry | None) -> None:
    """Write into ``ids`` (the step's flat token ids, as ``step_rows`` lays them out, on the
    carried tokens' device) each reserved token the step feeds, from ``carry``: a decode's one
    token, or the last of a prefill recomputed after a preemption. Device to device: the host
    does not wait for the step that drew them."""
    if carry is None:
        return
    dst, src, offset = [], [], 0
    for s in batch:
        hit = carry.rows.get(s.request_id)
        last = s.total_len - 1
        if hit is not None and hit[0] is s and s.in_flight and last < s.num_cached + s.num_scheduled:
            dst.append(offset + last - s.num_cached)
            src.append(hit[1])
        offset += s.num_scheduled
    if dst:
        at = to_device(dst, torch.int64, ids.device)
        ids.index_copy_(0, at, carry.tokens.index_select(0, to_device(src, torch.int64, ids.device)))


def rows_of(logits: torch.Tensor | None, rows: list[int]) -> torch.Tensor | None:
    """``logits[rows]`` with the index copied asynchronously: a list index goes from pageable
    memory, which makes the host wait for everything queued on the device (with async
    scheduling, the step just launched)."""
    return logits.index_select(0, to_device(rows, torch.int64, logits.device)) if logits is not None else None


def build_inputs(
    batch: list[Sequence],
    lora: StepSlots,
    blocks: BlockManager,
    kernels: Kernels,
    device: torch.device,
    carry: Carry | None = None,
) -> StepInputs:
    """The tensors of ``step_rows`` on ``device``, with the kernel path's metadata; the tokens
    reserved by the step before taken from ``carry`` (``carry_into``)."""
    r = step_rows(batch, lora, blocks)
    dev = device
    ids = to_device(r.ids, torch.int64, dev)
    carry_into(ids, batch, carry)
    return StepInputs(
        input_ids=ids,
        positions=to_device(r.positions, torch.int64, dev),
        seq_lens=to_device(r.seq_lens, torch.int64, dev),
        last_index=to_device(np.cumsum(r.q_lens) - 1, torch.int64, dev),
        attention=kernels.attention_metadata(r.q_lens, r.ctx_lens, r.tables, r.slots, blocks.block_size, dev),
        lora=kernels.lora_metadata(r.token_slots, dev, r.minus_slots if lora.minus >= 0 else None),
    )
