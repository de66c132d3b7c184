"""A workload: who asks what when. Arrivals x adapter popularity x lengths, deterministic per seed.

``build_specs`` turns a ``WorkloadSpec`` into its requests (reading the traces it names);
``build`` is the composition underneath, for callers that hold arrivals, weights and lengths already.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from dlora.loadgen import arrivals as arrival_times
from dlora.loadgen import bundled, popularity
from dlora.loadgen.popularity import Schedule
from dlora.loadgen.spec import WorkloadSpec
from dlora.loadgen.traces import (
    LLMRequestRow,
    RequestTrace,
    TenantSeries,
    TraceError,
    read_azure_functions,
    read_azure_llm,
    read_trace,
)

Traces = tuple[RequestTrace | None, TenantSeries | None]


@dataclass(frozen=True)
class RequestSpec:
    arrival_s: float
    adapter: str | None  # None: the base model
    prompt_len: int
    output_len: int
    # The prompt's leading blocks, by hash id, ``block_tokens`` tokens each (Mooncake traces):
    # requests naming the same id share that block token for token, as a prefix cache would see.
    hash_ids: tuple[int, ...] = ()
    block_tokens: int = 0
    # The run's salt for its prompts' tokens, drawn from its seed: a run repeated with another seed
    # must not find its prompts in the server's prefix cache, as it did when they were the index's.
    prompt_seed: int = 0


@functools.lru_cache(maxsize=4096)
def _block(hash_id: int, size: int, vocab: int, salt: int) -> tuple[int, ...]:
    return tuple(np.random.default_rng([hash_id, salt, 0x5EED]).integers(3, vocab, size).tolist())


def prompt_ids(index: int, spec: RequestSpec, vocab: int = 256, ids: Sequence[int] | None = None) -> list[int]:
    """The prompt of request ``index``: exactly ``spec.prompt_len`` token ids, each drawn uniformly
    from [3, vocab) (exact lengths make runs comparable; ids below 3 are left to special tokens), or
    from ``ids`` (a tokenizer's ordinary ids, ``prompt_text.ordinary_ids``: its whole vocabulary less
    its special ids, as vLLM's random dataset draws; the first 253 of them, as it was, made every
    prompt of a 32k or 150k vocabulary its first 253 ids, and Mistral v0.3's its control tokens).
    Without ``ids`` the draws are those they always were (the ids 3..255).

    Its hash-id blocks come first, each a function of its id and the run's ``prompt_seed``, so
    requests that share an id share that block; the rest is random, a function of ``index`` and
    ``prompt_seed`` (it was ``index``'s alone: request i + 253 repeated request i, and every run,
    whatever its seed, found the last one's prompts in the prefix cache). One seed and one
    tokenizer (or none), one set of prompts, over HTTP and over NATS alike.
    """
    if ids is not None:
        vocab = 3 + len(ids)  # each draw 3 + k picks ids[k]
    out: list[int] = []
    for h in spec.hash_ids:
        if len(out) >= spec.prompt_len:
            break
        out += _block(h, spec.block_tokens, vocab, spec.prompt_seed)
    out = out[: spec.prompt_len]
    own = np.random.default_rng([index, spec.prompt_seed]).integers(3, vocab, spec.prompt_len - len(out))
    drawn = out + [int(t) for t in own]
    return drawn if ids is None else [int(ids[t - 3]) for t in drawn]


@dataclass(frozen=True)
class LengthScaling:
    """How trace lengths are fitted to a small machine: divided by ``divide``, then capped."""

    divide: float = 1.0
    max_prompt: int = 1 << 30
    max_output: int = 1 << 30

    def apply(self, prompt: int, output: int) -> tuple[int, int]:
        p = min(self.max_prompt, max(1, round(prompt / self.divide)))
        o = min(self.max_output, max(1, round(output / self.divide)))
        return p, o


def build(
    arrivals: list[float],
    weights: list[float] | Schedule,
    lengths: list[LLMRequestRow],
    rng: np.random.Generator,
    scaling: LengthScaling = LengthScaling(),
    names: list[str | None] | None = None,
    shift_every_s: float | None = None,
    lengths_in_order: bool = False,
    block_tokens: int | None = None,
    in_turn: bool = False,
) -> list[RequestSpec]:
    """One request per arrival.

    Its adapter is drawn by ``weights`` over ``names`` (default ``lora-<i>``; None = the base
    model); a ``Schedule`` gives the weights in force at its arrival time. With ``shift_every_s``
    popularity moves over time: every that many seconds the weights rotate by one adapter, so the
    hot adapter changes (what migration is for). Its lengths are drawn from ``lengths`` rows, or
    taken in order (a trace replayed with its own lengths). Rows with hash ids (Mooncake) keep
    them, with blocks of ``block_tokens`` trace tokens scaled like the lengths. ``in_turn``: the
    adapters are taken in turn in arrival order, not drawn (vLLM's ``--lora-assignment round-robin``).
    """
    n = len(weights.weights[0]) if isinstance(weights, Schedule) else len(weights)
    names = names or [f"lora-{i}" for i in range(n)]
    if len(names) != n:
        raise ValueError(f"{len(names)} adapter names for {n} weights")
    if in_turn:
        drawn = [i % n for i in range(len(arrivals))]
    elif isinstance(weights, Schedule):
        drawn = [rng.choice(n, p=np.asarray(weights.at(t))) for t in arrivals]
    else:
        drawn = rng.choice(n, size=len(arrivals), p=np.asarray(weights)).tolist()
    picks = (
        np.arange(len(arrivals)) % len(lengths) if lengths_in_order else rng.integers(0, len(lengths), len(arrivals))
    )
    block = max(1, round(block_tokens / scaling.divide)) if block_tokens else 0
    salt = int(rng.integers(1 << 62))  # drawn last: a seed's arrivals, adapters and lengths stay as they were
    out = []
    for t, a, k in zip(arrivals, drawn, picks):
        if shift_every_s and not in_turn:  # equal shares rotate to themselves; the turn's skipped adapters
            a = (a + int(t // shift_every_s)) % n
        p, o = scaling.apply(lengths[k].input_tokens, lengths[k].output_tokens)
        hash_ids = lengths[k].hash_ids if block else ()
        out.append(
            RequestSpec(
                arrival_s=float(t),
                adapter=names[a],
                prompt_len=p,
                output_len=o,
                hash_ids=hash_ids,
                block_tokens=block if hash_ids else 0,
                prompt_seed=salt,
            )
        )
    return out


def load_traces(spec: WorkloadSpec) -> Traces:
    """The request trace and the popularity source among ``spec.trace``, each defaulting to a
    bundled one where the spec needs it (``None`` where it does not).

    Raises:
        TraceError: a trace cannot be read, two of one kind are given, or one is given that the spec does not use.
        ValueError: an unknown ``bundled:NAME``.
    """
    needs_requests, needs_tenants = spec.arrivals == "trace" or spec.lengths == "trace", spec.popularity == "stride"
    requests: RequestTrace | None = None
    tenants: TenantSeries | None = None
    if len(spec.trace) > 1 and spec.trace_format != "auto":
        raise TraceError(
            f"--trace-format {spec.trace_format} applies to every --trace, and two traces are of two "
            "kinds: leave it at auto to give a request trace and a popularity source"
        )
    for path in spec.trace:
        trace = read_trace(bundled.resolve(path), spec.trace_format)
        if isinstance(trace, RequestTrace):
            if requests is not None:
                raise TraceError(f"{path}: a second request trace ({trace.format}); give at most one")
            if not needs_requests:
                raise TraceError(
                    f"{path}: a request trace ({trace.format}), used only by --arrivals trace or --lengths trace"
                )
            requests = trace
        else:
            if tenants is not None:
                raise TraceError(f"{path}: a second popularity source ({trace.format}); give at most one")
            if not needs_tenants:
                raise TraceError(f"{path}: a popularity source ({trace.format}), used only by --popularity stride")
            tenants = trace
    if requests is None and needs_requests:
        requests = read_azure_llm(bundled.path(bundled.AZURE_CONV))
    if tenants is None and needs_tenants:
        tenants = read_azure_functions(bundled.path(bundled.AZURE_FUNCTIONS))
    return requests, tenants


def adapter_names(spec: WorkloadSpec) -> list[str | None]:
    """The spec's adapters in weight order: its names, or ``lora-0`` .. ``lora-<adapters-1>``."""
    return list(spec.adapter_names) if spec.adapter_names else [f"lora-{i}" for i in range(spec.adapters)]


def adapter_weights(spec: WorkloadSpec, tenants: TenantSeries | None) -> list[float] | Schedule:
    """Each adapter's share of the requests (``adapter_names`` order), or a ``Schedule`` of them
    where the spec replays a popularity source's windows.

    Raises:
        ValueError: stride popularity without a popularity source (``load_traces`` gives one).
    """
    k = len(adapter_names(spec))
    if spec.popularity == "stride":
        if tenants is None:
            raise ValueError("--popularity stride needs a popularity source")
        # The Azure Functions sample's one timer function carries 63 % of all invocations: clipped
        # to the k-th largest so even stride 1 is not dominated by it. ServeGen's skew is kept.
        cap = k if tenants.format == "azure-functions" else None
        return popularity.tenants(tenants, k, spec.stride, cap_rank=cap, window_s=spec.tenant_window)
    return {
        "uniform": lambda: popularity.uniform(k),
        "round-robin": lambda: popularity.uniform(k),  # in turn (``build``'s in_turn): equal shares
        "zipf": lambda: popularity.zipf(k, spec.alpha),
        "power": lambda: popularity.power(k, spec.alpha),
    }[spec.popularity]()


def build_specs(spec: WorkloadSpec, traces: Traces | None = None) -> list[RequestSpec]:
    """The requests ``spec`` stands for, in arrival order (at most ``spec.requests``; fewer when a
    replayed trace is shorter). ``traces`` as ``load_traces(spec)`` returns them, read once by a
    caller that builds several workloads from them; by default they are read here.

    Raises:
        TraceError, ValueError: as ``load_traces``; a rate or CV that is not positive; ``traces``
            without the request trace or popularity source the spec uses.
    """
    rng = np.random.default_rng(spec.seed)
    n = spec.requests
    trace, tenants = traces or load_traces(spec)
    if spec.arrivals == "trace":
        times = arrival_times.replay([r.t for r in _replayed(trace).rows[:n]], rate=spec.rate)
    elif spec.ramp_up_strategy is not None:  # (its rates given: checked by the spec)
        cv = 1.0 if spec.arrivals == "poisson" else spec.cv
        start, end = spec.ramp_up_start_rps or 0.0, spec.ramp_up_end_rps or 0.0
        times = arrival_times.ramp_up(spec.ramp_up_strategy, start, end, cv, n, rng)
    else:
        times = arrival_times.gamma(spec.rate, 1.0 if spec.arrivals == "poisson" else spec.cv, n, rng)
    if spec.lengths == "trace":
        rows = _replayed(trace).rows
        scaling = LengthScaling(spec.length_divide, spec.max_prompt, spec.max_output)
    else:
        scaling = LengthScaling()
        if spec.lengths == "fixed":
            rows = [LLMRequestRow(0.0, spec.prompt_len, spec.output_len)]
        elif spec.lengths == "random":
            rows = _random_rows(spec, rng)
        else:
            rows = [
                LLMRequestRow(0.0, int(p), int(o))
                for p, o in zip(rng.integers(1, spec.prompt_len + 1, 1000), rng.integers(1, spec.output_len + 1, 1000))
            ]
    names = adapter_names(spec)
    weights = adapter_weights(spec, tenants)
    return build(
        times,
        weights,
        rows,
        rng,
        scaling,
        names=names,
        shift_every_s=spec.shift_every,
        lengths_in_order=spec.arrivals == "trace" and spec.lengths == "trace",
        block_tokens=_replayed(trace).block_tokens if spec.lengths == "trace" else None,
        in_turn=spec.popularity == "round-robin",
    )


def _random_rows(spec: WorkloadSpec, rng: np.random.Generator) -> list[LLMRequestRow]:
    """Lengths as vLLM's random dataset draws them: each uniform in [floor(len (1 - r)),
    ceil(len (1 + r))] for ``spec.random_range_ratio`` r, every bound at least one token."""
    r = spec.random_range_ratio
    bounds = [
        (max(1, math.floor(n * (1 - r))), max(1, math.ceil(n * (1 + r)))) for n in (spec.prompt_len, spec.output_len)
    ]
    (p_low, p_high), (o_low, o_high) = bounds
    drawn = zip(rng.integers(p_low, p_high + 1, 1000), rng.integers(o_low, o_high + 1, 1000))
    return [LLMRequestRow(0.0, int(p), int(o)) for p, o in drawn]


def _replayed(trace: RequestTrace | None) -> RequestTrace:
    """The request trace a spec replays; ValueError when the traces given hold none."""
    if trace is None:
        raise ValueError("the spec replays a request trace, and the traces given hold none")
    return trace
