"""One simulated replica: the real engine's scheduling path (the policy's decision, merges and
unmerges, the scheduler with its token budget, preemption and prefix cache, the block manager, the
adapter slots and their loads, the stats and the policy's feedback), with the model forward priced
by a ``CostProfile`` instead of run, on simulated time.

``SimEngine`` is an ``LLMEngine`` built without weights (``LLMEngine._init_scheduling``); it
overrides only what touches them: the forward and sampling (``_run``: the step's cost, then each
request's next token, the end-of-sequence token once it reaches its target length), and the
merger and device slots (their cost on the clock). Everything else is the engine's own code.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections import Counter, OrderedDict
from dataclasses import dataclass
from typing import TYPE_CHECKING, cast

from dlora.common.messages import SamplingParams
from dlora.model.config import ModelConfig
from dlora.services.worker.adapters import evictions
from dlora.services.worker.engine import LLMEngine, taking
from dlora.services.worker.engine.config import EngineConfig
from dlora.services.worker.engine.kv_transfer import adopt
from dlora.services.worker.engine.outputs import RequestError
from dlora.services.worker.engine.queue_view import kv_room
from dlora.services.worker.engine.sampler import SamplingError
from dlora.services.worker.engine.sequence import Status
from dlora.services.worker.policy import Policy, lora_work
from dlora.sim.cost import CostProfile, StepShape

if TYPE_CHECKING:
    from collections.abc import Callable

    from dlora.services.worker.engine.lora import LoraAdapter
    from dlora.services.worker.engine.outputs import RequestOutput
    from dlora.services.worker.engine.placement import PreparedStep
    from dlora.services.worker.engine.sequence import Sequence
    from dlora.services.worker.policy import StepDecision

# Llama-2-7B's shape (its HF config): what the profiles price. Only the context, vocabulary and
# end-of-sequence token matter to scheduling.
LLAMA_7B = ModelConfig(
    model_type="llama",
    vocab_size=32000,
    hidden_size=4096,
    intermediate_size=11008,
    num_layers=32,
    num_heads=32,
    num_kv_heads=32,
    head_dim=128,
    rms_norm_eps=1e-5,
    max_position_embeddings=4096,
    tie_word_embeddings=False,
    qkv_bias=False,
    rope={"rope_theta": 10000.0, "rope_type": "default"},
    bos_token_id=1,
    eos_token_ids=(2,),
)


@dataclass(frozen=True)
class SimAdapter:
    """What scheduling reads of an adapter: its name, LoRA rank and content digest."""

    name: str
    rank: int
    digest: str


class _Silent:
    """A tokenizer that decodes nothing: the simulator needs tokens, not text."""

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return ""


class _Merger:
    """The merged adapter, its switches costed on the replica's clock."""

    def __init__(self, engine: SimEngine) -> None:
        self.engine = engine
        self.merged: str | None = None
        self.unmergeable: set[str] = set()  # none: every simulated adapter merges

    def merge(self, adapter: SimAdapter, _weights: object) -> None:
        self.engine.now += self.engine.cost.merge_s
        self.merged = adapter.name

    def unmerge(self) -> None:
        self.engine.now += self.engine.cost.unmerge_s
        self.merged = None


class _DeviceSlots:
    """The device slots' contents, their loads from host memory costed on the replica's clock."""

    def __init__(self, engine: SimEngine) -> None:
        self.engine = engine

    def load(self, _slot: int, adapter: SimAdapter) -> None:
        self.engine.now += self.engine.cost.load_seconds(adapter.rank, "cpu")

    def clear(self, _slot: int) -> None:
        pass

    def weights_of(self, _slot: int) -> None:
        return None


def _by_offset(seqs: list[Sequence], bs: int) -> dict[int, list[Sequence]]:
    """``seqs`` by their cached tokens modulo the block size, each group in the order given."""
    groups: dict[int, list[Sequence]] = {}
    for s in seqs:
        groups.setdefault(s.num_cached % bs, []).append(s)
    return groups


@dataclass(frozen=True)
class _Run:
    """A run of steps that repeat the last one, as it stood before the first of them: the same
    batch, merged adapter and LoRA work at each, only the contexts growing (a token a request a
    step). Step j (from 1) of it attends ``context`` + j tokens a request in all."""

    decision: StepDecision  # the last step's: what each step of the run decides again
    step: PreparedStep  # the last step
    k_max: int  # steps before the first request's end (the step that ends one runs for real)
    crossing: Counter[int]  # requests by their cached tokens modulo the block size
    priced: Callable[[int], float]  # a step's seconds by its context (``CostProfile.by_context``)
    context: int  # tokens the batch has cached
    start: dict[str, int]  # each request's cached tokens, in batch order
    grows: dict[int, list[Sequence]]  # the requests in decision order by their offset (``_by_offset``)
    fills: dict[int, list[Sequence]]  # in batch order (none: no prefix caching)
    salted: dict[str, bytes]  # each request's prefix-cache key under the merged adapter (none: no caching)


class SimEngine(LLMEngine):  # type: ignore[misc]  # LLMEngine is Any to mypy: torch is untyped here
    """The engine of one simulated replica. ``now`` is its clock (seconds of simulated time): a
    step, a switch and a load advance it by what ``cost`` says they take."""

    def __init__(
        self,
        cost: CostProfile,
        config: EngineConfig | None = None,
        model: ModelConfig = LLAMA_7B,
        policy: Policy | None = None,
        now: float = 0.0,
    ) -> None:
        self.config = config = config or EngineConfig()
        if bad := config.check():
            raise ValueError("; ".join(f"{f}={v!r} {why}" for f, v, why in bad))
        if config.async_scheduling:  # its cost model prices a step whole: host and device in turn
            raise ValueError("async_scheduling: the simulator runs steps synchronously")
        self.cost, self.now = cost, now
        self.model_config, self.model_name, self.model_digest = model, "base", ""
        self.tokenizer = _Silent()
        self.device, self.dtype = f"sim:{cost.name}", "bfloat16"  # what its stats say it serves on
        self.eos_ids, self.primary_eos = set(model.eos_token_ids), None
        self._token = next(t for t in range(model.vocab_size) if t not in self.eos_ids)  # any other token
        num_blocks = config.num_blocks or max(1, cost.kv_capacity_tokens // config.block_size)
        self._init_scheduling(config, model, num_blocks, policy)
        self.clock = lambda: self.now
        self.merger = _Merger(self)  # type: ignore[assignment]
        self.device_loras = _DeviceSlots(self)  # type: ignore[assignment]
        self.targets: dict[str, int] = {}  # request id -> the output length it ends at
        self._last: tuple[StepDecision, PreparedStep] | None = None  # the last step, while nothing else changed
        self.fast_forwarded = 0  # steps run by ``fast_forward`` (also in ``stats.steps``)
        self.used: OrderedDict[str, None] = OrderedDict()  # adapters asked for, least lately first (``ask``)
        self.disk_loads = 0  # adapters read from disk into host memory (``install``)

    def add_adapter(self, name: str, rank: int) -> None:
        """An adapter in host memory (its content digest: its name)."""
        self.adapters[name] = cast("LoraAdapter", SimAdapter(name, rank, name))
        self.loading.discard(name)

    def ask(self, adapter: str) -> bool:
        """``adapter`` asked for (a request or a prefetch: least lately used last, as
        ``WorkerAdapters.ensure`` notes it); whether host memory holds it."""
        self.used[adapter] = None
        self.used.move_to_end(adapter)
        return adapter in self.adapters

    def install(self, adapter: str, rank: int) -> None:
        """``adapter`` read from disk (the requests waiting for it run from the next step), then past
        ``max_cpu_loras`` the idle ones used least lately dropped (``evictions``, the worker's own
        choice)."""
        self.disk_loads += 1
        self.add_adapter(adapter, rank)
        self.evict(keep=adapter)

    def evict(self, keep: str | None = None) -> None:
        """Drop what ``evictions`` chooses past ``max_cpu_loras`` (a worker does between commands too)."""
        if len(self.adapters) > self.config.max_cpu_loras:
            for key in evictions(self, self.used, self.adapters_in_use() | {keep, self.merger.merged}):
                self.unregister_adapter(key)

    def add(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        output_len: int,
        adapter: str | None = None,
        max_tokens: int | None = None,
        resumed: list[int] | None = None,
        shipped: bool = False,
    ) -> None:
        """Queue a request that ends after ``output_len`` tokens with the end-of-sequence token (at
        ``max_tokens`` with "length" if that comes first). ``resumed``: tokens it produced elsewhere
        (a move); ``shipped``: its KV cache came along (else, or when its blocks do not fit, the
        context is recomputed here). Raises what ``add_request`` raises."""
        params = SamplingParams(max_tokens=max_tokens or output_len, temperature=0.0)
        self.add_request(
            request_id,
            prompt_token_ids=prompt_token_ids,
            params=params,
            adapter=adapter,
            resume_token_ids=resumed,
        )
        self.targets[request_id] = output_len
        self._last = None
        if shipped:  # its cache came with it: it decodes on, no prefill
            seq = self.seqs[request_id]
            with contextlib.suppress(RequestError):  # no room for it: recomputed here, as a worker does
                adopt(seq, seq.total_len - 1, self.blocks)

    def abort(self, request_id: str) -> bool:
        self.targets.pop(request_id, None)
        self._last = None
        return bool(super().abort(request_id))

    def _synchronize(self) -> None:
        pass

    def _lora_work(self, step: PreparedStep) -> tuple[int, int]:
        """(LoRA segments, rank-tokens) of ``step`` under the adapter merged now (``lora_work``)."""
        merged = self.merger.merged
        ranks = {a: self.adapters[a].rank for a in {a for a, _ in step.fed} | {merged} if a is not None}
        return lora_work(step.fed, merged, ranks)

    def _run(self, step: PreparedStep) -> tuple[list[Sequence], None, list[int | SamplingError], list[RequestOutput]]:
        segments, rank_tokens = self._lora_work(step)
        shape = StepShape(
            tokens=step.num_tokens,
            prefill_tokens=step.num_prefill,
            context_tokens=step.context_tokens,
            lora_segments=segments,
            lora_rank_tokens=rank_tokens,
            prefill_seqs=sum(s.status is Status.WAITING for s in step.batch),
        )
        self.now += self.cost.step_seconds(shape)
        ran, _ = taking.written(self, step.batch, None)
        tokens: list[int | SamplingError] = [
            next(iter(self.eos_ids)) if len(s.output_ids) + 1 >= self.targets[s.request_id] else self._token
            for s in ran
        ]
        return ran, None, tokens, []

    def step(self, decision: StepDecision | None = None) -> list[RequestOutput]:
        self._last = None  # set again by ``_observe`` if this step runs
        return cast("list[RequestOutput]", super().step(decision))

    def _observe(self, decision: StepDecision, step: PreparedStep, generated: int, seconds: list[float]) -> None:
        super()._observe(decision, step, generated, seconds)
        self._last = (decision, step)

    def fast_forward(self, until: float) -> tuple[list[str], int]:
        """Run the steps that begin before ``until`` at once, as long as each would repeat the last:
        that step was decodes only and ran every request here (none waits, none was preempted),
        nothing was added or aborted since, no request reaches its end (each step that ends one
        runs as a real step), and the policy decides it again. Each such step is what the engine's
        own step would make of the same decision (one token per request, its KV blocks, the prefix
        cache, the stats, the policy's ``observe``, its cost on the clock). A policy that learns
        (``Policy.learns``) is asked before each step, as stepping asks it: its cost fit, credits
        or watchdog can change its mind with no change to the queue (a mixed epoch that went on
        past the step where the overhead fit came to price the unmerged one cheaper, 26 merges
        against stepping's 21); the others decide by the queue alone, which these steps leave as
        it was. The requests advanced and the steps run (0: none)."""
        run = self._repeatable()
        if run is None:
            return [], 0
        k = self._asking(run, until) if self.policy.learns else self._at_once(run, until)
        if not k:
            return [], 0
        self.fast_forwarded += k
        return list(run.start), k

    def _repeatable(self) -> _Run | None:
        """What every step of a run repeating the last one shares (None: the last step does not
        repeat): worked out once a run, as none of it changes while only contexts grow."""
        if self._last is None:
            return None
        decision, step = self._last
        batch = step.batch
        if step.num_prefill or len(batch) != len(self.seqs) or any(s.status is not Status.RUNNING for s in batch):
            return None
        bs = self.blocks.block_size
        k_max = min(
            min(self.targets[s.request_id], s.params.max_tokens, self.max_model_len - len(s.prompt_ids))
            - len(s.output_ids)
            - 1
            for s in batch
        )
        segments, rank_tokens = self._lora_work(step)
        start = {s.request_id: s.num_cached for s in batch}
        # The scheduler grows requests in decision order, the KV written is taken in batch order.
        order = [s for rid in decision.request_ids if (s := self.seqs.get(rid)) is not None and rid in start]
        caching = self.blocks.enable_prefix_caching
        keys = {a: self._cache_key(a) for a in {s.adapter for s in batch}} if caching else {}
        return _Run(
            decision,
            step,
            k_max,
            # Step j (from 1) grows a request with c tokens cached by one block where (c + j - 1) % bs == 0.
            Counter(c % bs for c in start.values()),
            self.cost.by_context(StepShape(len(batch), 0, 0, segments, rank_tokens)),
            sum(start.values()),
            start,
            _by_offset(order, bs),
            _by_offset(batch, bs) if caching else {},
            {s.request_id: s.salted(keys[s.adapter]) for s in batch} if caching else {},
        )

    def _at_once(self, run: _Run, until: float) -> int:
        """Run ``run``'s steps that begin before ``until`` in one go (a policy that does not learn
        decides each as the last: the queue it reads stays as it was). The steps run."""
        n, bs = len(run.start), self.blocks.block_size
        seconds: list[float] = []
        free, clock = self.blocks.num_free, self.now
        while len(seconds) < run.k_max and clock < until:
            j = len(seconds) + 1
            free -= run.crossing[(1 - j) % bs]
            if free < 0:
                break
            t = run.priced(run.context + n * j)
            seconds.append((clock + t) - clock)  # what a step measures: its clock after, less before
            clock += t
        if seconds:
            self._advance_run(run, 0, len(seconds))
            self.now = clock  # the same sum, in the same order, as each step's
            self._observe_run(run, run.decision, len(seconds), seconds)
        return len(seconds)

    def _asking(self, run: _Run, until: float) -> int:
        """Run ``run``'s steps that begin before ``until`` one at a time, each only if the policy
        decides it again (asked as stepping asks it, then observing it with that decision's own
        basis before the next is asked). The steps run."""
        n, bs = len(run.start), self.blocks.block_size
        repeated = (run.decision.merged, run.decision.mixed, run.decision.request_ids)
        done = 0
        while done < run.k_max and self.now < until:
            j = done + 1
            if run.crossing[(1 - j) % bs] > self.blocks.num_free:
                break
            t = run.priced(run.context + n * j)
            again = self.policy.decide(self.queue(), self.merger.merged, kv_room(self.blocks))
            if (again.merged, again.mixed, again.request_ids) != repeated:
                break  # the next step runs for real, and asks again: the same state, the same answer
            self._advance_run(run, done, 1)
            clock = self.now
            self.now = clock + t
            self._observe_run(run, again, j, [(clock + t) - clock])  # as a step measures it
            done = j
        return done

    def _advance_run(self, run: _Run, done: int, k: int) -> None:
        """Steps ``done`` + 1 .. ``done`` + ``k`` of ``run``: a token a request, and blocks taken
        and named at the steps where a request crosses a block bound, in the order the engine's
        step takes them: the same tables and cache as stepping."""
        bs, caching = self.blocks.block_size, self.blocks.enable_prefix_caching
        start, batch = run.start, run.step.batch
        written = {rid: c + done for rid, c in start.items()}
        for s in batch:
            s.output_ids.extend([self._token] * k)
            s.detok.push([self._token] * k)
        if k == 1:  # (a step asked for: a request crosses no bound in most)
            steps: list[int] = [done + 1]
        else:  # only the steps where some request crosses a bound do anything (every block_size-th)
            firsts = {*((-c % bs) + 1 for c in run.grows), *((-f - 1) % bs + 1 for f in run.fills)}
            low = done + 1  # each first's steps from here: the first j >= low that is first modulo bs
            steps = sorted({j for first in firsts for j in range(low + (first - low) % bs, done + k + 1, bs)})
        for j in steps:
            for s in run.grows.get((1 - j) % bs, ()):
                self.blocks.grow(s.request_id, start[s.request_id] + j)
            for s in run.fills.get(-j % bs, ()):
                end = start[s.request_id] + j
                self.blocks.computed(s.request_id, s.all_ids(), written[s.request_id], end, run.salted[s.request_id])
                written[s.request_id] = end
        for s in batch:
            s.num_cached = start[s.request_id] + done + k
            if caching:  # a block begun and not filled: it fills no block, so no ids are read
                self.blocks.computed(s.request_id, [], written[s.request_id], s.num_cached, run.salted[s.request_id])

    def _observe_run(self, run: _Run, decision: StepDecision, j: int, seconds: list[float]) -> None:
        """Observe the steps of ``run`` that end with its ``j``-th, one an entry of ``seconds``
        (each step's time) and decided by ``decision``: the engine's stats and the policy's
        feedback."""
        n = len(run.start)
        # The context of the first of these steps: each one attends n more tokens than the last.
        context = run.context + n * (j - len(seconds) + 1)
        repeat = dataclasses.replace(run.step, merge_s=0.0, unmerge_s=0.0, context_tokens=context)
        self._observe(decision, repeat, n, seconds)  # the last step is now ``repeat``

    def _finish(self, seq: Sequence, reason: object) -> None:
        super()._finish(seq, reason)  # type: ignore[arg-type]
        self.targets.pop(seq.request_id, None)
