"""Counters of what the engine did, for metrics: steps, switches and their cost, adapter loads.

Running estimates of step costs for decisions live with the policy (policy/costs.py).
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field

# vLLM's buckets of its tokens-per-step histogram (vllm:iteration_tokens_total)
ITERATION_BUCKETS = (1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384)


@dataclass
class EngineStats:
    steps: int = 0
    step_seconds: float = 0.0  # total
    max_step_seconds: float = 0.0  # the longest step (the dLoRA policy's wait bound grows with it)
    last_mode: str = ""  # the mode the last step ran in ("" before any)
    last_batch: int = 0  # the last step's sequences
    last_prefill: int = 0  # and its prompt (and recompute) tokens
    last_fed: int = 0  # and every token it fed (a decode feeds one)
    last_lora: tuple[int, int] = (0, 0)  # and its LoRA work: (segments, rank-tokens), ``policy.lora_work``
    prompt_tokens: int = 0  # total, of requests prefilled here (counted at their first token), not resumed
    prompt_computed: int = 0  # of those, the ones their prefill computed (not found in the prefix cache)
    tokens_generated: int = 0  # total, over all requests
    prefill_tokens: int = 0  # total prompt (and recompute) tokens fed
    prefill_seconds: float = 0.0  # their share of step time
    merges: int = 0
    merge_seconds: float = 0.0  # total
    unmerges: int = 0
    unmerge_seconds: float = 0.0  # total
    preemptions: int = 0
    cuda_graphs: int = 0  # decode-step CUDA graphs recorded (or tried: a failed one runs eagerly)
    cuda_graph_seconds: float = 0.0  # their recording's seconds, left out of the steps' times
    # Tokens of prefills looked up in the prefix cache, and of those found (vLLM's
    # prefix_cache_queries and prefix_cache_hits).
    prefix_cache_queries: int = 0
    prefix_cache_hits: int = 0
    adapter_loads: int = 0
    adapter_evictions: int = 0
    adapter_load_seconds: float = 0.0  # total
    # The same per adapter (engine key), loads into a device slot and their seconds.
    loads_by_adapter: dict[str, int] = field(default_factory=dict)
    load_seconds_by_adapter: dict[str, float] = field(default_factory=dict)
    steps_by_mode: dict[str, int] = field(default_factory=dict)  # "unmerged", "merged", "mixed" (policy.Mode)
    # Per adapter ("" for the base model): the step time its sequences took, each step's time
    # shared by tokens fed, and the tokens they generated.
    adapter_seconds: dict[str, float] = field(default_factory=dict)
    adapter_tokens: dict[str, int] = field(default_factory=dict)
    # vLLM's tokens per step: the computed prompt tokens counted in it (``prompt_computed``, at a
    # request's first token) plus the tokens it generated; steps by the least bucket bound at or above
    # (an index of ``ITERATION_BUCKETS``, its length for none), and their sum.
    iteration_steps: dict[int, int] = field(default_factory=dict)
    iteration_tokens: int = 0
    _prompt_counted: int = 0  # ``prompt_computed`` at the last step recorded

    def count_prompt(self, tokens: int, cached: int) -> None:
        """A request's first token: its prompt's ``tokens`` counted (vLLM counts them then), of which
        ``cached`` were found in the prefix cache (none counted for a resumed request: 0 tokens)."""
        if tokens:
            self.prompt_tokens += tokens
            self.prompt_computed += max(0, tokens - cached)

    def record_steps(
        self,
        seconds: list[float],
        tokens: int,
        fed: int,
        prefill: int,
        mode: str = "unmerged",
        batch: int = 0,
        lora: tuple[int, int] = (0, 0),
    ) -> None:
        """Runs of one step of ``batch`` sequences, one per entry of ``seconds`` (the simulator's
        fast-forward repeats a step; the engine runs each once): each generated ``tokens``, fed
        ``fed`` tokens, ``prefill`` of them prompt/recompute, in ``mode`` with ``lora`` (segments,
        rank-tokens) of LoRA work. The sums are taken in the order of one call per run."""
        runs, share = len(seconds), max(1, fed)
        self.steps += runs
        self.last_batch, self.last_prefill, self.last_fed, self.last_lora = batch, prefill, fed, lora
        self.steps_by_mode[mode] = self.steps_by_mode.get(mode, 0) + runs
        self.last_mode = mode
        total, prefill_total = self.step_seconds, self.prefill_seconds
        for t in seconds:
            total += t
            prefill_total += t * prefill / share
        self.step_seconds, self.prefill_seconds = total, prefill_total
        self.max_step_seconds = max(self.max_step_seconds, max(seconds))
        self.tokens_generated += tokens * runs
        self.prefill_tokens += prefill * runs
        prompt, self._prompt_counted = self.prompt_computed - self._prompt_counted, self.prompt_computed
        self._iteration(tokens + prompt, 1)
        if runs > 1:
            self._iteration(tokens, runs - 1)

    def _iteration(self, tokens: int, runs: int) -> None:
        bucket = bisect.bisect_left(ITERATION_BUCKETS, tokens)
        self.iteration_steps[bucket] = self.iteration_steps.get(bucket, 0) + runs
        self.iteration_tokens += tokens * runs

    def record_adapters(self, seconds: list[float], fed: int, sequences: list[tuple[str, int, bool]]) -> None:
        """Share each run's time (``seconds``, as ``record_steps``) among its sequences, given as
        (adapter, tokens fed, whether it made a token: a prefill chunk short of its prompt's end
        makes none, its share is paid by the tokens that follow)."""
        share = max(1, fed)
        fed_by: dict[str, list[int]] = {}
        for adapter, n, made in sequences:
            fed_by.setdefault(adapter, []).append(n)
            self.adapter_tokens[adapter] = self.adapter_tokens.get(adapter, 0) + made * len(seconds)
        for adapter, ns in fed_by.items():
            total = self.adapter_seconds.get(adapter, 0.0)
            for t in seconds:  # in the order of one call per run
                for n in ns:
                    total += t * n / share
            self.adapter_seconds[adapter] = total

    def switch_and_load_seconds(self) -> float:
        """Merges', unmerges' and adapter loads' seconds, in all: what a step spent on anything but
        its batch."""
        return self.merge_seconds + self.unmerge_seconds + self.adapter_load_seconds

    def forget_adapter(self, key: str) -> None:
        """An adapter (engine key ``name@version``) is gone from the engine: its step-time shares go,
        its load counts fold into its name's (counters stay monotonic by name, and a worker that
        serves thousands of versions over its life keeps one entry per name, not per version)."""
        self.adapter_seconds.pop(key, None)
        self.adapter_tokens.pop(key, None)
        name = key.partition("@")[0]
        if name != key:
            for by_key in (self.loads_by_adapter, self.load_seconds_by_adapter):
                if key in by_key:
                    by_key[name] = by_key.get(name, 0) + by_key.pop(key)

    def forget_name(self, name: str) -> None:
        """Adapter ``name`` is removed from the registry: its folded load counts go (its exporter
        series went already; the entries stayed, two per name ever removed: a helper's churn)."""
        for by_name in (self.loads_by_adapter, self.load_seconds_by_adapter):
            by_name.pop(name, None)

    def adapter_seconds_per_token(self) -> dict[str, float]:
        return {a: self.adapter_seconds[a] / n for a, n in self.adapter_tokens.items() if n}

    def record_graphs(self, count: int, seconds: float) -> None:
        self.cuda_graphs += count
        self.cuda_graph_seconds += seconds

    def record_prefix_cache(self, queries: int, hits: int) -> None:
        self.prefix_cache_queries += queries
        self.prefix_cache_hits += hits

    def record_merge(self, seconds: float) -> None:
        self.merges += 1
        self.merge_seconds += seconds

    def record_unmerge(self, seconds: float) -> None:
        self.unmerges += 1
        self.unmerge_seconds += seconds

    def record_load(self, adapter: str, evicted: bool, seconds: float) -> None:
        self.adapter_loads += 1
        self.adapter_evictions += evicted
        self.adapter_load_seconds += seconds
        self.loads_by_adapter[adapter] = self.loads_by_adapter.get(adapter, 0) + 1
        self.load_seconds_by_adapter[adapter] = self.load_seconds_by_adapter.get(adapter, 0.0) + seconds
