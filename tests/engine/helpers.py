from __future__ import annotations

import os
from typing import Any

import torch

from dlora.common.messages import SamplingParams
from dlora.model.config import ModelConfig
from dlora.model.make_tiny import TinyOutput
from dlora.services.worker.engine import EngineConfig, LLMEngine
from dlora.services.worker.engine.kv_cache import KVCache
from dlora.services.worker.policy import Mode, PolicyConfig, StepDecision


def make_engine(tiny: TinyOutput, **overrides) -> LLMEngine:
    """An engine on ``tiny``'s model with its adapters registered; ``overrides`` are EngineConfig
    fields, ``policy`` a policy name. Unmerged-only unless a test names a policy: these tests were
    written against the plain FCFS path (the engine's own default is the worker's, dlora)."""
    overrides["policy"] = PolicyConfig(name=overrides.get("policy", "unmerged-only"))
    # make gpu-check runs the engine tests with every engine on the GPU.
    overrides.setdefault("device", os.environ.get("DLORA_TEST_DEVICE", "cpu"))
    overrides.setdefault("dtype", "float32")  # the parity tests compare fp32 token for token
    if "max_num_batched_tokens" in overrides:  # a budget of a few tokens: as few sequences (vLLM's rule)
        overrides.setdefault("max_num_seqs", min(EngineConfig().max_num_seqs, overrides["max_num_batched_tokens"]))
    if "num_blocks" not in overrides and "kv_cache_bytes" not in overrides:
        overrides["kv_cache_bytes"] = kv_bytes_enough(tiny, overrides)
    engine = LLMEngine(str(tiny.model), EngineConfig(**overrides))
    for name, path in tiny.adapters.items():
        engine.register_adapter(name, path)
    return engine


def kv_bytes_enough(tiny: TinyOutput, overrides: dict[str, Any] | None = None) -> int:
    """The engine's default KV cache (256 MiB), or less: twice what ``max_num_seqs`` requests at
    the model's whole context hold (in fp32), which no test's requests outgrow. The default is
    32,768 blocks of the tiny model; each engine zeroed it page by page (~0.1 s of a core, some
    hundred engines a run) and held it until the collector freed it."""
    overrides = overrides or {}
    cfg = ModelConfig.from_dir(tiny.model)
    seqs = overrides.get("max_num_seqs", EngineConfig().max_num_seqs)
    context = max(cfg.context_length(), overrides.get("max_model_len") or 0)
    per_token = KVCache.bytes_per_token(cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, torch.float32)
    return min(EngineConfig().kv_cache_bytes, 2 * seqs * context * per_token)


def add_all(engine: LLMEngine, requests: dict[str, tuple[str | None, list[int]]], max_tokens: int) -> None:
    """Submit every request (id -> (adapter, prompt ids)), in order, each of ``max_tokens``."""
    for rid, (adapter, ids) in requests.items():
        engine.add_request(rid, prompt_token_ids=ids, params=SamplingParams(max_tokens=max_tokens), adapter=adapter)


def run_all(
    engine: LLMEngine, requests: dict[str, tuple[str | None, list[int]]], max_tokens: int
) -> dict[str, list[int]]:
    """Submit every request at once and step until all finish; tokens per request id."""
    add_all(engine, requests, max_tokens)
    out: dict[str, list[int]] = {rid: [] for rid in requests}
    while engine.has_unfinished():
        for o in engine.step():
            out[o.request_id] += o.new_token_ids
    return out


def run_plan(
    engine: LLMEngine,
    requests: dict[str, tuple[str | None, list[int]]],
    max_tokens: int,
    plan: list[tuple[str | None, bool]],
) -> tuple[dict[str, list[int]], set[Mode]]:
    """Submit every request, then step with the decisions of ``plan`` in turn, (merged adapter,
    mixed) each over every request by arrival, until all finish: tokens per request id, and the
    modes the steps ran in."""
    add_all(engine, requests, max_tokens)
    got: dict[str, list[int]] = {rid: [] for rid in requests}
    modes = set()
    for i in range(200):
        if not engine.has_unfinished():
            break
        merged, mixed = plan[i % len(plan)]
        decision = StepDecision(merged, sorted(engine.seqs, key=lambda r: engine.seqs[r].arrival), mixed=mixed)
        for o in engine.step(decision):
            got[o.request_id] += o.new_token_ids
        modes.add(decision.mode)
    return got, modes
