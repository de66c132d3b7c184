"""Decode steps replayed as CUDA graphs, one per batch-size bucket (vLLM's CUDA graph capture).

A decode step at batch 32 launches about fifty kernels per layer, each a few microseconds of GPU
work: the host cannot launch them as fast as the GPU runs them (issue 15 measured the GPU idle
71 % of a 7B-width step). A graph recorded once replays the step's launches in one call.

A graph replays the addresses it was recorded with, so everything it reads lives in static
buffers: the step's token ids, positions, KV slots, context lengths, block tables and LoRA groups
are copied into buffers sized for the largest bucket (three host-to-device copies a step), the
batch is padded to its bucket, and the LoRA address tables are updated in place when a slot
changes (``LoraProjection.refresh``). Its grids are fixed too: decode attention runs one program
per padded row; each LoRA pass has as many groups as the batch's adapters rounded up to a power
of two (empty ones exit at once), and is sized for the highest rank ever loaded
(``DeviceLoras.rank_bound``), so it launches whatever the slots hold. A padding token is token 0
at position 0 with a context of one: its K/V go to a scratch block of the cache that no sequence
owns, it joins no LoRA group, and its row is dropped. The graph ends at the final norm; the LM
head runs after it.

A graph is recorded at a key's first use: (bucket, which LoRA passes run, adapters' power of two);
a new highest rank drops them all. Recording time is not a step's (the engine's stats count it).
A key whose recording fails (out of memory while capturing, say) runs eagerly on the same buffers
from then on, the others still replay; a replay that fails turns graphs off for the engine. Only decode steps of the
Triton path run this way (their shapes repeat; prefill shapes do not), and not with dynamic NTK
rotary scaling, which picks frequencies on the host. ``capture=False`` runs the same sequence
eagerly, where CUDA graphs do not exist: the CPU tests check it token for token under
TRITON_INTERPRET=1.
"""

from __future__ import annotations

import itertools
import time
from collections import Counter
from typing import TYPE_CHECKING

import numpy as np
import torch
import triton

from dlora.common import log
from dlora.kernels.attention_triton import PagedMetadata
from dlora.kernels.lora_triton import LoraBatch, LoraPasses, group_by_slot
from dlora.kernels.lora_tuning import bucket
from dlora.services.worker.engine.block_manager import BlockManager
from dlora.services.worker.engine.inputs import Carry, carry_into, step_rows
from dlora.services.worker.engine.model import LlamaModel, StepInputs
from dlora.services.worker.engine.placement import StepSlots
from dlora.services.worker.engine.sequence import Sequence

if TYPE_CHECKING:
    from dlora.services.worker.engine.engine import LLMEngine


logger = log.get("engine")


def capture_sizes(max_num_seqs: int) -> list[int]:
    """The batch-size buckets: 1, 2, 4, then every multiple of 8 up to ``max_num_seqs``, which is
    always the last (vLLM's default capture sizes)."""
    sizes = [s for s in (1, 2, 4, *range(8, max_num_seqs + 1, 8)) if s < max_num_seqs]
    return [*sizes, max_num_seqs]


def decode_graphs(engine: LLMEngine, capture: bool) -> DecodeGraphs:
    """``engine``'s decode steps through static buffers (its kernels must be Triton's), replayed as
    CUDA graphs when ``capture``: the engine makes its own on a GPU; CPU tests set one with
    ``capture=False`` as ``engine.graphs``."""
    c, scratch = engine.config, engine.blocks.end  # the block past the block manager's
    return DecodeGraphs(engine.model, c.max_loras, c.max_num_seqs, engine.max_model_len, scratch, capture)


class DecodeGraphs:
    """Runs a decode batch of at most ``max_num_seqs`` sequences through static buffers, replaying
    a CUDA graph per bucket when ``capture`` is set (``forward``)."""

    def __init__(
        self,
        model: LlamaModel,
        num_slots: int,
        max_num_seqs: int,
        max_model_len: int,
        scratch_block: int,
        capture: bool,
    ) -> None:
        """``num_slots``: the device's LoRA slots; ``scratch_block``: a KV cache block no sequence
        is given, where padding tokens write."""
        self.model, self.capture = model, capture
        self.sizes = capture_sizes(max_num_seqs)
        self.block_size = model.kv.block_size
        self.scratch_block = scratch_block
        self.num_slots = num_slots
        rows = self.sizes[-1]
        self.width = triton.cdiv(max_model_len, self.block_size)  # block table columns
        dev = model.weights.embed.device
        # Host buffers pinned on a GPU, so their copies run asynchronously; a step waits for the
        # last step's copies before it writes them again (``_copied``: with async scheduling the
        # host runs a step ahead of the device).
        pin = capture and dev.type == "cuda"
        self._copied = torch.cuda.Event() if pin else None
        # int64 rows: token ids, positions, sequence lengths, KV slots.
        self._host64 = torch.zeros(4, rows, dtype=torch.int64, pin_memory=pin)
        self._dev64 = torch.zeros(4, rows, dtype=torch.int64, device=dev)
        # int32: context lengths, then two LoRA passes (added, subtracted): a pass's token index,
        # then slot, start and length of each group.
        self._pass_len = rows + 3 * num_slots
        self._host32 = torch.zeros(rows + 2 * self._pass_len, dtype=torch.int32, pin_memory=pin)
        self._dev32 = torch.zeros_like(self._host32, device=dev)
        self._host_tables = torch.zeros(rows, self.width, dtype=torch.int32, pin_memory=pin)
        self._tables_np = self._host_tables.numpy()  # shares its memory
        self._tables = torch.zeros(rows, self.width, dtype=torch.int32, device=dev)
        self._rows32 = torch.arange(rows, dtype=torch.int32, device=dev)
        self._rows64 = torch.arange(rows, dtype=torch.int64, device=dev)
        self._ones = torch.ones(rows, dtype=torch.int32, device=dev)
        self._none = torch.zeros(0, dtype=torch.int32, device=dev)
        # Per key: the graph and its output, the final hidden states (the LM head runs after the
        # replay: a (bucket, vocab) fp32 buffer per graph would hold gigabytes at a 128k vocabulary).
        self._graphs: dict[tuple[int, ...], tuple[torch.cuda.CUDAGraph | None, torch.Tensor | None]] = {}
        self._rank_bound = 0
        self._pool = torch.cuda.graph_pool_handle() if capture else None
        self._recorded = (0, 0.0)  # keys recorded since ``take_recorded``, and their seconds
        self.failed: set[tuple[int, ...]] = set()  # keys whose recording failed: run eagerly on the buffers
        # Steps run, by (bucket, whether a LoRA delta was added, whether one was subtracted).
        self.steps: Counter[tuple[int, bool, bool]] = Counter()

    def runs(self, batch: list[Sequence]) -> bool:
        """Whether ``forward`` takes this batch: decodes only (one new token each), no more than the
        largest bucket, and a rotary scaling that does not depend on the sequence length."""
        return (
            len(batch) <= self.sizes[-1]
            and not self.model.rope.dynamic
            and all(s.num_scheduled == 1 and s.num_cached < self.width * self.block_size for s in batch)
        )

    def bucket(self, batch_size: int) -> int:
        return next(s for s in self.sizes if s >= batch_size)

    def take_recorded(self) -> tuple[int, float]:
        """Graphs recorded since the last call and the seconds it took: not a step's cost (the
        policy prices steps by their time), paid once per key."""
        recorded, self._recorded = self._recorded, (0, 0.0)
        return recorded

    def forward(
        self, batch: list[Sequence], slots: StepSlots, blocks: BlockManager, carry: Carry | None = None
    ) -> torch.Tensor:
        """Logits (B, vocab) in fp32 for a batch ``runs`` accepts, as ``LlamaModel.forward`` gives
        them; the tokens reserved by the step before taken from ``carry`` on the device."""
        r = step_rows(batch, slots, blocks)
        n = self.bucket(len(batch))
        groups = [group_by_slot(r.token_slots), group_by_slot(r.minus_slots if slots.minus >= 0 else [])]
        present = (bool(groups[0][1]), bool(groups[1][1]))
        # Grids for the batch's adapters (a power of two of them), not every slot: one adapter's
        # decode keeps the whole GPU for its split shrink.
        g = min(self.num_slots, bucket(max(len(groups[0][1]), len(groups[1][1]), 1)))
        rank_bound = self.model.loras.rank_bound
        if rank_bound != self._rank_bound:  # a higher rank than any before: new launch sizes
            self._graphs.clear()
            self.failed.clear()  # new launch sizes: recorded afresh
            self._rank_bound = rank_bound
            self._pool = torch.cuda.graph_pool_handle() if self.capture else None
        key = (n, *present, g)
        self.steps[(n, *present)] += 1
        if key not in self._graphs:
            start = time.perf_counter()
            self._fill(n, [], [], [], [], [], [], [([], [], [], [])] * 2)  # padding only: writes go to scratch
            try:
                self._graphs[key] = self._record(self._inputs(n, present, g))
            except torch.OutOfMemoryError as e:  # the memory left now was too little: this key runs eagerly
                # (any other failure leaves the capture's state unknown: it turns graphs off, in the engine)
                logger.warning("cuda graph not recorded: these steps run eagerly", key=key, error=repr(e))
                self._graphs[key] = None, None
                self.failed.add(key)
            finally:  # counted, and kept out of the step's time, whatever became of it
                count, seconds = self._recorded
                self._recorded = count + 1, seconds + time.perf_counter() - start
        self._fill(n, r.ids, r.positions, r.seq_lens, r.slots, r.ctx_lens, r.tables, groups)
        carry_into(self._dev64[0, :n], batch, carry)
        graph, hidden = self._graphs[key]
        if graph is None:  # no CUDA graphs: the same buffers, run eagerly
            hidden = self.model.last_hidden(self._inputs(n, present, g))
        else:  # the graph reads the buffers it was recorded on: no inputs to build
            graph.replay()
        assert hidden is not None
        return self.model.logits(hidden[: len(batch)])

    def _record(self, inputs: StepInputs) -> tuple[torch.cuda.CUDAGraph | None, torch.Tensor | None]:
        """One eager run of ``inputs`` first (it compiles the Triton kernels, which must not happen
        during a capture, and lets cuBLAS pick its kernels for these shapes), on a side stream as
        PyTorch's CUDA graph notes advise; then the capture. Without capture, the eager run alone,
        so the CPU tests run the same sequence."""
        if not self.capture:
            self.model.last_hidden(inputs)
            return None, None
        side, main = torch.cuda.Stream(self._dev64.device), torch.cuda.current_stream(self._dev64.device)
        side.wait_stream(main)
        try:
            with torch.cuda.stream(side):
                self.model.last_hidden(inputs)
        finally:  # even when it fails: what it queued must not run under the real rows filled next
            main.wait_stream(side)
            torch.cuda.synchronize(self._dev64.device)
        graph = torch.cuda.CUDAGraph()
        # Nothing in the capture may copy from host memory: the graph would replay the copy from a
        # host block long since reused (the inputs here are views of the static buffers).
        with torch.cuda.graph(graph, pool=self._pool):
            hidden = self.model.last_hidden(inputs)
        return graph, hidden

    def _inputs(self, n: int, present: tuple[bool, bool], g: int) -> StepInputs:
        """The model's inputs for bucket ``n`` and ``g`` groups a LoRA pass, as views of the static
        buffers."""
        ids, positions, seq_lens, kv_slots = self._dev64[:, :n]
        rows = self.sizes[-1]
        attention = PagedMetadata(
            slots=kv_slots,
            q_start=self._rows32[:n],
            q_len=self._ones[:n],
            ctx_len=self._dev32[:n],
            block_tables=self._tables[:n],
            decode_seqs=self._rows32[:n],
            tile_seq=self._none,
            tile_q0=self._none,
            block_m=16,
        )
        passes = []
        for i, (sign, on) in enumerate(zip((1.0, -1.0), present)):
            if on:
                buf = self._dev32[rows + i * self._pass_len : rows + (i + 1) * self._pass_len]
                slot, start, length = buf[rows:].view(3, self.num_slots)[:, :g]
                batch = LoraBatch(buf[:n], slot, start, length, g, n, sign, rank_bound=self._rank_bound)
                passes.append(batch)
        return StepInputs(
            input_ids=ids,
            positions=positions,
            seq_lens=seq_lens,
            last_index=self._rows64[:n],
            attention=attention,
            lora=LoraPasses(passes) if passes else None,
        )

    def _fill(
        self,
        n: int,
        ids: list[int],
        positions: list[int],
        seq_lens: list[int],
        kv_slots: list[int],
        ctx_lens: list[int],
        tables: list[list[int]],
        groups: list[tuple[list[int], list[int], list[int], list[int]]],
    ) -> None:
        """Copy a step's rows into the static buffers, padded to ``n`` rows."""
        if self._copied is not None:  # the last step's copies out of these buffers are done
            self._copied.synchronize()
        pad = n - len(ids)
        scratch = self.scratch_block * self.block_size
        self._host64[:, :n] = torch.tensor(
            [ids + [0] * pad, positions + [0] * pad, seq_lens + [1] * pad, kv_slots + [scratch] * pad]
        )
        rows, g = self.sizes[-1], self.num_slots
        small = ctx_lens + [1] * (rows - len(ctx_lens))
        for index, slot, start, length in groups:
            unused = g - len(slot)
            small += index + [0] * (rows - len(index))
            small += slot + [0] * unused
            small += start + [0] * unused
            small += length + [0] * unused  # an empty group: its programs exit at once
        self._host32[:] = torch.tensor(small, dtype=torch.int32)
        # Every table into its row at once (a tensor per row cost more than the rest of the step's
        # host work at batch 64); columns past a row's table are never read.
        lens = np.fromiter(map(len, tables), dtype=np.int64, count=len(tables))
        flat = np.fromiter(itertools.chain.from_iterable(tables), dtype=np.int32, count=int(lens.sum()))
        row = np.repeat(np.arange(len(tables)), lens)
        self._tables_np[row, np.arange(len(flat)) - np.repeat(lens.cumsum() - lens, lens)] = flat
        self._tables_np[len(tables) : n, 0] = self.scratch_block  # a padding row reads the scratch block
        # Whole rows, so each copy is contiguous (a column slice goes through temporaries, not async).
        self._dev64.copy_(self._host64, non_blocking=True)
        self._dev32.copy_(self._host32, non_blocking=True)
        self._tables[:n].copy_(self._host_tables[:n], non_blocking=True)
        if self._copied is not None:
            self._copied.record()
