"""The engine: requests in, one step at a time, new tokens and text out.

``step()``: ask the policy, switch merged/unmerged as it decides, schedule, run the model, sample and
report; synchronous, driven by the worker service from its own task.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from dlora.common import log
from dlora.common.messages import ErrorCode, FinishReason
from dlora.kernels.backend import select_kernels
from dlora.model.config import ModelConfig, model_digest, served_name, targets
from dlora.model.tokenizer import load_tokenizer
from dlora.services.worker.engine import adding, async_scheduling, forward, observing, preparing, switching, taking
from dlora.services.worker.engine.block_manager import BlockManager
from dlora.services.worker.engine.config import EngineConfig
from dlora.services.worker.engine.device import resolve_device
from dlora.services.worker.engine.inputs import Carry, build_inputs
from dlora.services.worker.engine.kv_cache import KVCache
from dlora.services.worker.engine.kv_transfer import KVSnapshot, export_kv
from dlora.services.worker.engine.lora import AdapterError, LoraAdapter, load_adapter
from dlora.services.worker.engine.merge import Merger
from dlora.services.worker.engine.model import LlamaModel, StepInputs
from dlora.services.worker.engine.outputs import LaunchedLogprobs, RequestOutput, advance, failed_output
from dlora.services.worker.engine.outputs import RequestError as RequestError  # (the package's: engine.RequestError)
from dlora.services.worker.engine.placement import PreparedStep, StepSlots
from dlora.services.worker.engine.queue_view import kv_room, queued
from dlora.services.worker.engine.sampler import SamplingError, sample_sequences
from dlora.services.worker.engine.scheduler import Limits
from dlora.services.worker.engine.sequence import Sequence, Status
from dlora.services.worker.engine.slots import DeviceLoras, SlotChange, SlotTable
from dlora.services.worker.engine.stats import EngineStats
from dlora.services.worker.engine.structured import Grammars
from dlora.services.worker.engine.weights import load_weights
from dlora.services.worker.policy import (
    BatchLimits,
    Policy,
    QueuedRequest,
    StepDecision,
    make_policy,
)

if TYPE_CHECKING:  # it imports Triton, which a CPU engine does without
    from dlora.services.worker.engine.async_scheduling import InFlight
    from dlora.services.worker.engine.graphs import DecodeGraphs

logger = log.get("engine")


class LLMEngine:
    """One replica's inference: the base model and its paged KV cache, the registered adapters (host
    memory, ``max_loras`` device slots, one merged at most), the running requests and the batching
    policy that picks each step.

    Owned by one thread at a time: the worker service calls it from one task (through
    ``asyncio.to_thread`` for ``step``), ``dlora generate`` and the benchmarks from their own
    loop. ``add_request`` / ``abort`` queue and drop requests; ``step`` runs one iteration and
    returns what each request produced; ``register_adapter`` / ``unregister_adapter`` change the
    adapters. Nothing here does I/O beyond loading weights.
    """

    def __init__(self, model: str, config: EngineConfig | None = None, policy: Policy | None = None) -> None:
        """``model``: a Hugging Face model directory. ValueError when ``config`` names an unknown dtype,
        kernel path or policy or fails its ``check``; OSError / ValueError from reading the model."""
        self.config = config = config or EngineConfig()
        if bad := config.check():
            raise ValueError("; ".join(f"{f}={v!r} {why}" for f, v, why in bad))
        self.device, self.dtype = resolve_device(config.device, config.dtype)
        self.kernels = select_kernels(config.kernels, self.device)
        self.model_config = cfg = ModelConfig.from_dir(model)
        self.model_name = served_name(model)
        self.tokenizer = load_tokenizer(model)
        self.model_digest = model_digest(cfg, self.tokenizer.get_vocab())  # another model's requests are refused
        self.primary_eos = self.tokenizer.eos_token_id  # the others stop with their id as stop_reason
        self.eos_ids = set(cfg.eos_token_ids) | ({self.primary_eos} - {None})

        weights = load_weights(model, cfg, self.dtype, self.device)
        # The Triton path keeps a block past the block manager's for padded rows' writes (DecodeGraphs).
        scratch = 1 if self.kernels.name == "triton" else 0
        kv, num_blocks = KVCache.sized(
            cfg, config.block_size, config.num_blocks, config.kv_cache_bytes, self.dtype, self.device, scratch
        )
        self._init_scheduling(config, cfg, num_blocks, policy)
        self.device_loras = DeviceLoras(cfg, config.max_loras, self.dtype, self.device, tables=self.kernels.lora_tables)
        self.merger = Merger(weights, targets(cfg), self.kernels.merge_rows)
        self.policy.unmergeable = self.merger.unmergeable  # the policy never merges these
        self.model = LlamaModel(cfg, weights, kv, self.device_loras, self.kernels)
        if self.kernels.name == "triton" and self.device.type == "cuda" and not config.enforce_eager:
            from dlora.services.worker.engine.graphs import decode_graphs

            self.graphs = decode_graphs(self, capture=True)
        self.last_logits: dict[str, torch.Tensor] = {}  # (vocab,) of the last step by request id: for tests
        self._rng = torch.Generator().manual_seed(config.seed)
        self.grammars = Grammars(self.tokenizer, cfg.vocab_size, self.eos_ids)
        if self.max_model_len < cfg.context_length():
            logger.warning(
                "max_model_len below the model's context",
                max_model_len=self.max_model_len,
                context=cfg.context_length(),
                why="max_model_len set lower, or the KV cache holds no more (kv_cache_bytes, num_blocks)",
            )

    def _init_scheduling(self, config: EngineConfig, cfg: ModelConfig, num_blocks: int, policy: Policy | None) -> None:
        """The state every step's scheduling runs on (no weights, no tensors): the block manager,
        the scheduler's limits, the slot table, the policy, the requests and the counters. Apart so
        the cluster simulator (``dlora.sim``) runs these very parts against a cost model."""
        if config.max_model_len is not None and config.max_model_len > (longest := cfg.longest_supported()):
            # vLLM refuses it too: RoPE past the positions the model was trained on degrades silently
            raise ValueError(
                f"max_model_len {config.max_model_len} is over the model's context length {longest} "
                "(max_position_embeddings, its RoPE scaling and sliding window); leave it out or lower it"
            )
        self.max_model_len = min(config.max_model_len or cfg.context_length(), num_blocks * config.block_size)
        # Dynamic NTK rotates by the length when written: a cached block or early chunk past the native
        # context would differ from one prefill of the whole prompt (as transformers does it); both off.
        whole = cfg.rope["rope_type"] == "dynamic" and self.max_model_len > cfg.max_position_embeddings
        self.blocks = BlockManager(num_blocks, config.block_size, config.enable_prefix_caching and not whole)
        chunked = config.enable_chunked_prefill and not whole
        self.limits = Limits(
            max_num_seqs=config.max_num_seqs,
            # Without chunks a prompt must fit in one step.
            max_num_batched_tokens=max(config.max_num_batched_tokens, 0 if chunked else self.max_model_len),
            max_adapters=config.max_loras,
            chunked_prefill=chunked,
        )
        self.slots = SlotTable(config.max_loras)
        self.policy: Policy = policy or make_policy(
            config.policy,
            BatchLimits(config.max_num_seqs, config.max_loras, self.limits.max_num_batched_tokens, chunked),
        )
        self.adapters: dict[str, LoraAdapter] = {}
        self.loading: set[str] = set()  # adapters read beside the steps: their requests wait unseen by the policy
        self.seqs: dict[str, Sequence] = {}
        self._in_flight: InFlight | None = None  # async scheduling's step whose tokens are on their way
        # its outputs once taken in, and requests ended as they were added, until ``step`` returns them
        self._taken: list[RequestOutput] = []
        self._chunks: taking.Chunks | None = None  # the last step's prompt chunks, checked when taken in
        # The adapters a switch under way merges in or out; left set when it raised (a device lost
        # there is their requests' death, though none was scheduled yet: the worker's hand-over)
        self.switching: set[str] = set()
        self.stats = EngineStats()
        self.graphs: DecodeGraphs | None = None  # the decode steps' CUDA graphs, made with the model on a GPU
        self._arrivals = 0
        self._queued: dict[str, QueuedRequest] = {}  # the last ``queue()``'s entries
        self.clock = time.perf_counter  # seconds; a simulator's runs on simulated time

    # ---- adapters -------------------------------------------------------------------------
    def register_adapter(self, name: str, path: str | Path) -> LoraAdapter:
        """Load a PEFT adapter into host memory (raises AdapterError with the reason)."""
        return self.install_adapter(self.read_adapter(name, path))

    def read_adapter(self, name: str, path: str | Path) -> LoraAdapter:
        """A PEFT adapter read and checked, the engine unchanged (safe beside a step). AdapterError."""
        if not name or name == self.model_name:
            raise AdapterError(f"adapter name {name!r} is empty or the base model's name")
        return self.merger.assessed(load_adapter(name, path, self.model_config, self.config.adapter_limits))

    def install_adapter(self, adapter: LoraAdapter) -> LoraAdapter:
        """Register what ``read_adapter`` read (AdapterError if its name is taken): its requests run."""
        if adapter.name in self.adapters:
            raise AdapterError(f"adapter {adapter.name!r} is already registered")
        self.merger.admit(adapter)
        self.adapters[adapter.name] = adapter
        self.loading.discard(adapter.name)
        return adapter

    def runnable(self) -> bool:
        """Whether a step could run something: a request not waiting for its adapter, one in flight, or an
        output to hand out (a request ended as it was added)."""
        return (
            self._in_flight is not None
            or bool(self._taken)
            or any(s.adapter not in self.loading for s in self.seqs.values())
        )

    def in_use(self, name: str) -> bool:
        """Whether a request in flight runs on the adapter."""
        return name in self.adapters_in_use()

    def adapters_in_use(self) -> set[str | None]:
        """The adapters requests in flight run on, and those of a step still in flight (async
        scheduling: its record names them when it is taken in, whether or not they were aborted)."""
        held = {s.adapter for s in self.seqs.values()}
        if (f := self._in_flight) is not None:
            held |= {a for a, _ in f.step.fed} | {f.step.merged}
        return held

    def unregister_adapter(self, name: str) -> None:
        """Drop an adapter: unmerged if merged, its device slot freed (AdapterError if unknown or in use)."""
        if name not in self.adapters:
            raise AdapterError(f"adapter {name!r} is not registered")
        if self.in_use(name):
            raise AdapterError(f"adapter {name!r} has requests in flight")
        if self.merger.merged == name:
            switching.unmerge(self)
        if (slot := self.slots.drop(name)) is not None:
            self.device_loras.clear(slot)
        del self.adapters[name]
        self.merger.unmergeable.discard(name)
        self.stats.forget_adapter(name)

    # ---- requests -------------------------------------------------------------------------
    # Its work, its signature and its contract are adding.py's (engine.py stood at the 500-line bound):
    # bound here, not delegated to, so that the 16 parameters are written once.
    add_request = adding.add_request

    def export_kv(self, request_id: str) -> KVSnapshot | None:
        """The cache of a decoding request (None if it has none: waiting, mid-prefill or unknown).
        RuntimeError while its last token is in flight (async scheduling): ``drain`` first."""
        if (seq := self.seqs.get(request_id)) is None or seq.status is not Status.RUNNING or not seq.num_cached:
            return None
        if seq.in_flight:
            raise RuntimeError(f"request {request_id!r} has a token in flight: drain() the engine first")
        return export_kv(seq, self.blocks, self.model.kv)

    def abort(self, request_id: str) -> bool:
        """Drop a request and free its memory; False if it was not in flight."""
        if self.seqs.pop(request_id, None) is None:
            return False
        self.blocks.free(request_id)
        return True

    def fail_all(self, reason: str) -> list[RequestOutput]:
        """End with ``reason`` every request a step could run (after one failed outside any of them)."""
        self._in_flight = None  # its tokens are theirs: they fail instead
        taken = self._hand_out()  # ended ones among them too (async scheduling)
        return taken + [self._fail(s, reason) for s in list(self.seqs.values()) if s.adapter not in self.loading]

    def drain(self) -> list[RequestOutput]:
        """The outputs of the step left in flight by async scheduling (none otherwise), taken in
        now. Call it before reading a running sequence's tokens from outside (``export_kv``, a
        move): until then its last one is ``RESERVED``."""
        return async_scheduling.drain(self)

    def reset_prefix_cache(self) -> int:
        """Forget the prefix cache (``BlockManager.reset_prefix_cache``); the blocks it held."""
        return self.blocks.reset_prefix_cache()

    def holds(self, seq: Sequence) -> bool:
        """Whether ``seq`` is still in flight here: not ended, aborted or replaced under its id
        since a step ran it (async scheduling takes a step in a call later)."""
        return self.seqs.get(seq.request_id) is seq

    def has_unfinished(self) -> bool:
        return bool(self.seqs or self._taken) or self._in_flight is not None

    def queue(self) -> list[QueuedRequest]:
        """What the policy may run, in scheduling order: priority, then arrival (``queue_view.queued``)."""
        seqs, merged = self.seqs.values(), self.merger.merged
        if self.loading:  # (a list made only then: the policy asks every step)
            seqs = [s for s in seqs if s.adapter not in self.loading]
        self._queued = queued(seqs, self.adapters, self.limits, self._queued, self.blocks, self._cache_key, merged)
        return list(self._queued.values())

    # ---- the step -------------------------------------------------------------------------
    def step(self, decision: StepDecision | None = None) -> list[RequestOutput]:
        """Run one iteration, in four phases: decide (the policy, unless ``decision`` overrides it),
        prepare (switch merged/unmerged, schedule, give unmerged adapters their slots), run (the
        model forward and sampling), postprocess (tokens to text and stop conditions, stats, and
        the decision handed back to the policy with what the step ran and cost). What each request
        produced, failures included (their ``error`` says why); ValueError for a decision that
        merges an unknown adapter; ``DeviceLost`` after a sticky device error (``faults``)."""
        if self.config.async_scheduling:
            return async_scheduling.step(self, decision)
        if not self.seqs:
            return self._hand_out()
        decision = decision or self.policy.decide(self.queue(), self.merger.merged, kv_room(self.blocks))
        step = self._prepare(decision)
        if step is None:
            return self._hand_out()
        graphs = self.graphs  # this step's, also if a replay that fails turns them off
        ran, logits, tokens, failed = self._run(step)
        outputs = failed + self._postprocess(ran, logits, tokens)
        self.blocks.checked()  # every block it named looked at before another step takes one
        generated = sum(len(o.new_token_ids) for o in outputs)
        recorded, recording_s = graphs.take_recorded() if graphs is not None else (0, 0.0)
        self.stats.record_graphs(recorded, recording_s)
        self._observe(decision, step, generated, [self.clock() - step.started - recording_s])
        return self._hand_out() + outputs  # (with those ended as they were added)

    def _hand_out(self) -> list[RequestOutput]:
        """The outputs kept for the caller (a step's taken in, requests ended as they were added), once:
        until then ``fail_all`` returns them, should a step raise after taking some in (async scheduling)."""
        out, self._taken = self._taken, []
        return out

    def _prepare(self, decision: StepDecision) -> PreparedStep | None:
        """Switch, schedule and place the batch's adapters (``preparing.prepare``; a phase for
        ``loadgen/step_phases.py``); None when nothing can run."""
        return preparing.prepare(self, decision)

    def _run(
        self, step: PreparedStep
    ) -> tuple[list[Sequence], torch.Tensor | None, list[int | SamplingError], list[RequestOutput]]:
        """The forward and sampling: the sequences that ran to a new token, their logits (B, vocab),
        one token (or the sampler's error) each, and failure outputs of those that could not run."""
        ran, logits, failures = self._forward(step.batch, step.slots)
        failed = [self._fail(seq, why) for seq, why in failures]
        ran, logits = taking.written(self, ran, logits)
        self.last_logits = dict(zip((s.request_id for s in ran), logits)) if logits is not None else {}
        tokens = (
            sample_sequences(logits, ran, self._rng, self.eos_ids, self.grammars).result() if logits is not None else []
        )
        return ran, logits, tokens, failed + taking.fail_chunks(self)

    def _cache_key(self, adapter: str | None, merged: str | None | bool = True) -> bytes:
        """Which weights compute ``adapter``'s KV with ``merged`` merged (True: as now): its content
        digest and the merged adapter's (the prefix cache's key; ``block_manager.py`` says why)."""
        merged = self.merger.merged if merged is True else merged or None
        own = self.adapters[adapter].digest if adapter is not None else ""
        return f"{own}|{self.adapters[merged].digest if merged is not None else ''}".encode()

    def _postprocess(
        self,
        ran: list[Sequence],
        logits: torch.Tensor | None,
        tokens: list[int | SamplingError],
        reserved: bool = False,
        launched: LaunchedLogprobs | None = None,
    ) -> list[RequestOutput]:
        """Each sampled token taken into its request (``taking.take``; a phase for ``loadgen/step_phases.py``)."""
        return taking.take(self, ran, logits, tokens, reserved, launched)

    def _observe(self, decision: StepDecision, step: PreparedStep, generated: int, seconds: list[float]) -> None:
        """Record the step (``generated`` tokens) in the stats and hand the policy its decision back
        with what the step ran and cost, once per entry of ``seconds`` (``observing.observe``)."""
        observing.observe(self, decision, step, generated, seconds)

    def _forward(
        self, batch: list[Sequence], slots: StepSlots, carry: Carry | None = None
    ) -> tuple[list[Sequence], torch.Tensor | None, list[tuple[Sequence, str]]]:
        return forward.run(self, batch, slots, carry)

    def switch(self, merged: str | None) -> tuple[float, float]:
        """Merge/unmerge so that ``merged`` (an adapter's name, None: base weights) is the merged
        adapter; seconds spent merging and unmerging (``switching.switch``). The step does this for
        its decision; the benchmarks call it to time a switch as the engine pays it. KeyError for
        an unknown adapter."""
        return switching.switch(self, merged)

    def _synchronize(self) -> None:  # a switch's copies run asynchronously on a GPU: its time is until they end
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _load_slot(self, change: SlotChange) -> None:
        start = self.clock()
        self.device_loras.load(change.slot, self.adapters[change.loaded])
        self.stats.record_load(change.loaded, evicted=change.evicted is not None, seconds=self.clock() - start)

    def _inputs(self, batch: list[Sequence], slots: StepSlots, carry: Carry | None = None) -> StepInputs:
        return build_inputs(batch, slots, self.blocks, self.kernels, self.device, carry)

    def _advance(self, seq: Sequence, token: int, reserved: bool = False) -> RequestOutput:
        out = advance(seq, token, self.eos_ids, self.max_model_len, self.primary_eos, reserved)
        self.stats.count_prompt(seq.uncounted_prompt, seq.num_cached_prompt)  # its first token: prefilled
        seq.uncounted_prompt = 0
        if out.finish_reason is not None:
            self._finish(seq, out.finish_reason)
        return out

    def _fail(
        self, seq: Sequence, reason: str, code: ErrorCode = ErrorCode.INTERNAL, param: str | None = None
    ) -> RequestOutput:
        """End a request whose step failed; its output carries the reason, whose fault (``code``) and
        the field at fault (``param``, the request's)."""
        if seq.in_flight:  # a token never made
            seq.output_ids.pop()
        self._finish(seq, FinishReason.ERROR)
        return failed_output(seq, reason, code, param)

    def _finish(self, seq: Sequence, reason: FinishReason) -> None:
        seq.status = Status.FINISHED
        seq.finish_reason = reason
        self.blocks.free(seq.request_id)
        del self.seqs[seq.request_id]
