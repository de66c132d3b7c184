"""What a worker tells the cluster about itself: its engine's state as ``WorkerStats``. No bus.

Names are adapter names (the engine holds ``name@version`` keys: see ``versions``); ``max_loras``
is the number of adapters of any rank its device slots hold at once; remaining tokens are
estimates from the lengths of requests that finished here.
"""

from __future__ import annotations

import bisect
import functools
import time
from collections.abc import Collection

from dlora.common.messages import MAX_LISTED, AdapterResidency, GenerateRequest, RequestLoad, WorkerStats
from dlora.common.versions import engine_key, name_of, version_of
from dlora.services.worker.engine import LLMEngine
from dlora.services.worker.engine.sequence import Status
from dlora.services.worker.lengths import OutputLengths


@functools.lru_cache(maxsize=1 << 16)
def _residency(key: str, slot: int | None, merged: bool) -> AdapterResidency:
    """One adapter's residency, made once per state: a stats message lists every adapter held (a
    simulated cluster of 32 replicas x 128 adapters built 8 million of them an hour)."""
    return AdapterResidency(name=name_of(key), version=version_of(key), slot=slot, merged=merged)


@functools.lru_cache(maxsize=64)
def _unplaced(held: tuple[str, ...]) -> tuple[AdapterResidency, ...]:
    """The residency of adapters ``held`` (engine keys, sorted) in no slot and not merged."""
    return tuple(_residency(key, None, False) for key in held)


def arriving_key(req: GenerateRequest) -> str | None:
    """What a request waiting on arrival runs on, as ``worker_stats``'s ``preparing`` counts it: its
    adapter version's ``engine_key`` (the name alone where it names no version), None the base."""
    return req.adapter and engine_key(req.adapter, req.adapter_version or "")


def _remaining(lengths: OutputLengths, generated: int, max_tokens: int, min_tokens: int) -> int:
    """The tokens a request that has ``generated`` so far is expected to add: no fewer than its
    ``min_tokens`` asks for."""
    return max(lengths.expected_remaining(generated, max_tokens), min_tokens - generated)


def worker_stats(
    worker: str,
    engine: LLMEngine,
    lengths: OutputLengths,
    kv_seconds: float = 0.0,
    kv_tokens: int = 0,
    retired: Collection[str] = (),
    preparing: Collection[GenerateRequest] = (),
    stays: bool = False,
) -> WorkerStats:
    """``engine``'s load and residency as ``worker`` publishes them; ``kv_seconds`` / ``kv_tokens``:
    what the moved caches it took cost, in all; ``retired``: the engine keys of adapter versions
    replaced or removed (their requests are pinned here); ``preparing``: the requests taken in and
    not yet in the engine, waiting on arrival (a moved one's cache, a grammar's compile) or queued for
    the task that owns it (``Commands.queued``): waiting too, as vLLM counts one waiting for its
    grammar; ``stays``: every request is pinned here, the worker's progress writes failing
    (``ProgressRecords.outage``): it refuses a move of any (``move_out``), and freed by its refusal a
    request was planned and refused again at each look while they failed. (Its adapter reads'
    figures: the worker's own.)"""
    e, st = engine, engine.stats
    # A request is one however many copies came: a copy delivered twice, queued while the first is
    # in the engine (or waits on arrival), is dropped once taken up, or replaces that one (``admit``).
    # Counted for each until then, it held twice its load and KV in the stats (left by the last session).
    preparing = [r for r in {r.request_id: r for r in preparing}.values() if r.request_id not in e.seqs]
    # what the policy sees, then the requests waiting for their adapter's read: load all the same
    # (a dispatcher that missed them sent more of that adapter's requests elsewhere, to read it again)
    queue = [seq for q in e.queue() if (seq := e.seqs.get(q.request_id)) is not None]
    if e.loading:
        queue += [seq for seq in e.seqs.values() if seq.adapter in e.loading]
    # vLLM's "running": scheduled once, a prompt part-way through its chunked prefill too (counted
    # waiting while its KV grew, it hid a worker busy with long prompts from queue-depth readers);
    # the same rule for each request listed, so the per-adapter figures add up to it
    in_batch = {rid for rid, s in e.seqs.items() if s.status is Status.RUNNING or e.blocks.holds(rid)}
    running = len(in_batch)
    merged = e.merger.merged
    held = tuple(sorted(e.adapters))
    residency = list(_unplaced(held))  # then the few in a slot or merged, in their places
    for key in {*e.slots.resident, merged} & e.adapters.keys():
        residency[bisect.bisect_left(held, key)] = _residency(key, e.slots.slot_of(key), key == merged)
    loads = [
        RequestLoad(
            request_id=seq.request_id,
            adapter=seq.adapter and name_of(seq.adapter),
            context_tokens=seq.total_len,
            remaining_tokens=_remaining(lengths, len(seq.output_ids), seq.params.max_tokens, seq.params.min_tokens),
            total_tokens=len(seq.prompt_ids) + seq.params.max_tokens,
            running=seq.request_id in in_batch,
            rank=e.adapters[seq.adapter].rank if seq.adapter in e.adapters else 0,
            # waiting for its adapter's read here (its rank not known yet: it went to a worker whose
            # max_lora_rank was below it), or on a version retiring here
            pinned=stays or seq.adapter in retired or seq.adapter is not None and seq.adapter not in e.adapters,
            version=version_of(seq.adapter) if seq.adapter else "",
        )
        for seq in queue
    ]
    loads, unlisted = loads[:MAX_LISTED], loads[MAX_LISTED:]  # in arrival order: running ones first
    # counted by adapter all the same: per-adapter figures (metrics, /v1/status) read the first
    # MAX_LISTED only, and those waiting on arrival in none (a helper's finding)
    # and by version: a request of another version than those queued needs a slot of its own
    by_adapter: dict[str, list[int]] = {}
    by_version: dict[str, list[int]] = {}
    for r in unlisted:
        by_adapter.setdefault(r.adapter or "", [0, 0])[0 if r.running else 1] += 1
        key = engine_key(r.adapter, r.version) if r.adapter else ""
        by_version.setdefault(key, [0, 0])[0 if r.running else 1] += 1
    for req in preparing:
        key = arriving_key(req)
        by_adapter.setdefault(name_of(key) if key else "", [0, 0])[1] += 1
        by_version.setdefault(key or "", [0, 0])[1] += 1
    # their work too, where the planner and dispatch read a worker's load: its source lists a moved
    # one no more, so counted in slots alone the worker that just took a plan's moves looked the
    # lightest while their caches came, and drew the next plan's moves and new requests (a review)
    arriving = sum(
        _remaining(lengths, len(r.resume_token_ids), r.params.max_tokens, r.params.min_tokens) for r in preparing
    )
    # and their KV, as the listed ones' contexts count it (a moved one's fills its blocks on arrival)
    size = e.blocks.block_size
    contexts = [r.context_tokens for r in unlisted]
    coming = sum(-(-(len(r.prompt_token_ids or ()) + len(r.resume_token_ids)) // size) for r in preparing)
    # Room ``free_blocks`` still counts: the queued requests holding none yet fill it once admitted (a
    # move by recompute among them: it queues here with no cache on its way). Left out, a worker with
    # hundreds queued looked as roomy to the dispatcher's placement as an idle one.
    queued = sum(-(-s.total_len // size) for rid, s in e.seqs.items() if rid not in in_batch)
    return WorkerStats(
        worker=worker,
        running=running,
        waiting=len(e.seqs) - running + len(preparing),
        preempted=sum(1 for rid, s in e.seqs.items() if s.num_preemptions and rid not in in_batch),
        free_blocks=e.blocks.num_free,
        total_blocks=e.blocks.num_blocks,
        block_size=e.blocks.block_size,
        max_loras=e.config.max_loras,
        max_model_len=e.max_model_len,
        output_tokens_quantiles=lengths.quantiles(),
        max_lora_rank=e.config.adapter_limits.max_lora_rank,
        model_digest=e.model_digest,
        marks_taken=True,
        device=str(e.device),
        dtype=str(e.dtype).removeprefix("torch."),
        adapters=residency,
        reading=[(name_of(k), version_of(k)) for k in sorted(e.loading)],
        mode=st.last_mode,
        steps=st.steps,
        merges=st.merges,
        preemptions=st.preemptions,
        adapter_loads=st.adapter_loads,
        adapter_evictions=st.adapter_evictions,
        adapter_load_seconds=st.adapter_load_seconds,
        prefix_cache_queries=st.prefix_cache_queries,
        prefix_cache_hits=st.prefix_cache_hits,
        seconds_per_token=st.step_seconds / max(1, st.tokens_generated),
        requests=loads,
        unlisted_requests=len(unlisted),
        unlisted_remaining_tokens=sum(r.remaining_tokens for r in unlisted) + arriving,
        unlisted_by_adapter={a: (n[0], n[1]) for a, n in by_adapter.items()},
        unlisted_by_version={k: (n[0], n[1]) for k, n in by_version.items()},
        adapter_seconds_per_token={  # of the adapters held (every one ever served would outgrow a message)
            name_of(k): v for k, v in st.adapter_seconds_per_token().items() if k == "" or k in e.adapters
        },
        prefill_seconds_per_token=st.prefill_seconds / st.prefill_tokens if st.prefill_tokens else 0.0,
        kv_transfer_seconds_per_token=kv_seconds / kv_tokens if kv_tokens else 0.0,
        prefill_tokens=st.prefill_tokens,
        kv_transfer_tokens=kv_tokens,
        sent=(now := time.time()),
        taken=now,
        unlisted_kv_blocks=sum(-(-n // size) for n in contexts) + coming,
        arriving_kv_blocks=coming + queued,
    )


def settings_in_effect(e: LLMEngine) -> dict[str, str]:
    """The engine settings ``e`` runs with, as text (the worker's metrics): where it differs from
    the config's, what took effect (a KV cache too small for ``max_model_len``; chunks and the
    cache off for dynamic RoPE past the native context). vLLM logs its engine config at start."""
    return {
        "device": str(e.device),
        "dtype": str(e.dtype).removeprefix("torch."),
        "kernels": e.kernels.name,
        "max_model_len": str(e.max_model_len),
        "max_num_seqs": str(e.limits.max_num_seqs),
        "max_num_batched_tokens": str(e.limits.max_num_batched_tokens),
        "block_size": str(e.blocks.block_size),
        "num_blocks": str(e.blocks.num_blocks),
        "enable_prefix_caching": str(e.blocks.enable_prefix_caching).lower(),
        "enable_chunked_prefill": str(e.limits.chunked_prefill).lower(),
        "max_loras": str(e.config.max_loras),
        "policy": e.config.policy.name,
    }
