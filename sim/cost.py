"""What the engine's work costs, for the cluster simulator (issue 21): one replica's step, a merge
or unmerge, an adapter load from each tier, and a request move, priced without running the model.

Pure: no torch, no I/O. A step is described by the figures the real engine records for it
(``StepShape``: tokens fed, how many of them prefill, the context its sequences attend, and the
LoRA work ``policy.base.lora_work`` counts), so the simulator prices exactly what the real
scheduler and policy put into a step.

Profiles (``PROFILES``):

- ``dlora-artifact``: the dLoRA artifact's own per-iteration constants at Llama-7B (merged 15 ms,
  unmerged 27 ms, a switch 20 ms), to compare with the paper's regime.
- ``h100-llama7b`` / ``h200-llama7b``: a roofline of Llama-2-7B in bf16 on one GPU, every constant
  with its source below; the efficiency factors and the per-step overhead are assumptions, and
  say so.
- ``calibrated(bench_json)``: the decode step times ``dlora bench engine`` measured on a machine
  (this CPU, or a GPU once measured there), with the LoRA cost fitted to its unmerged and mixed
  points; or the loop time per decode step ``dlora bench cluster``'s workers measured in its runs.
"""

from __future__ import annotations

import bisect
import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

MIB = 1 << 20


@dataclass(frozen=True)
class StepShape:
    """One step as the engine ran it."""

    tokens: int  # tokens fed: prefill chunks and one per decoding sequence
    prefill_tokens: int  # of those, prompt (or recompute) tokens
    context_tokens: int  # KV entries the step's sequences attend, summed over them
    lora_segments: int = 0  # distinct adapter deltas run (policy.base.lora_work)
    lora_rank_tokens: int = 0  # each token's LoRA ranks, summed over the tokens
    prefill_seqs: int = 0  # sequences the prefill tokens belong to

    @property
    def decode_seqs(self) -> int:
        return self.tokens - self.prefill_tokens


@dataclass(frozen=True)
class CostProfile:
    """Seconds for each kind of work on one replica. A step costs

        step_s + curve(decode sequences) or token_s per decoding sequence
        + prefill_token_s (or token_s) per prompt token + prefill_seq_s per sequence prefilled
        + context_token_s per KV entry read
        + (unmerged_step_s if any LoRA work) + lora_segment_s per segment + lora_rank_token_s per rank-token

    where ``curve`` (batch -> seconds, measured) replaces ``step_s + token_s * batch`` for decode
    batches when a profile has one. Attention is priced by the KV it reads; its FLOPs (quadratic
    in a long prefill) are left out, or in ``prefill_seq_s`` where a profile is fitted to steps."""

    name: str
    step_s: float  # per step whatever its size: the weights read once, launches, sampling
    token_s: float  # per token fed: its share of the weights' FLOPs
    context_token_s: float  # per KV entry a step's attention reads
    lora_segment_s: float  # per distinct adapter whose delta runs: its A and B read once
    lora_rank_token_s: float  # per token per unit of LoRA rank: the delta's FLOPs
    unmerged_step_s: float  # per step with any LoRA work, beyond the above (the artifact's 27 - 15 ms)
    merge_s: float  # folding an adapter into the weights
    unmerge_s: float  # taking it out again
    slot_load_s_per_rank: float  # host memory -> a device slot, per unit of rank (bytes grow with it)
    disk_load_s_per_rank: float  # disk -> host memory, per unit of rank
    kv_transfer_s_per_token: float  # a moved request's KV shipped between replicas, per token
    kv_capacity_tokens: int  # KV entries one replica holds
    curve: tuple[tuple[float, float], ...] = ()  # measured (decode batch, step seconds), ascending
    prefill_token_s: float | None = None  # per prompt (or recompute) token; None: token_s
    prefill_seq_s: float = 0.0  # per sequence a step prefills, beyond its tokens

    @property
    def prompt_token_s(self) -> float:
        """Seconds per prompt token fed."""
        return self.token_s if self.prefill_token_s is None else self.prefill_token_s

    def decode_seconds(self, batch: int) -> float:
        """The weights' part of a step that decodes ``batch`` sequences."""
        if not self.curve:
            return self.step_s + self.token_s * batch
        xs = [b for b, _ in self.curve]
        i = min(max(bisect.bisect_right(xs, batch) - 1, 0), len(xs) - 2)
        (x0, y0), (x1, y1) = self.curve[i], self.curve[i + 1]
        return max(0.0, y0 + (y1 - y0) * (batch - x0) / (x1 - x0))  # linear, the end slopes beyond

    def step_seconds(self, s: StepShape) -> float:
        """Seconds one step of shape ``s`` takes (switches and loads not included: the engine pays
        them before the step, as ``switch_seconds`` and ``load_seconds``)."""
        return self.by_context(s)(s.context_tokens)

    def by_context(self, s: StepShape) -> Callable[[int], float]:
        """``step_seconds`` of steps shaped as ``s`` but for their context (KV entries read), which
        the function is given: the same sum in the same order, what does not depend on the context
        worked out once (the simulator's fast-forward prices a million decode steps an hour,
        each one context token per sequence longer than the last)."""
        head = self.decode_seconds(s.decode_seqs) + self.prompt_token_s * s.prefill_tokens
        head += self.prefill_seq_s * s.prefill_seqs
        per_context = self.context_token_s
        if not s.lora_segments:
            return lambda context: head + per_context * context
        lora = self.unmerged_step_s + self.lora_segment_s * s.lora_segments
        rank_tokens = self.lora_rank_token_s * s.lora_rank_tokens
        return lambda context: head + per_context * context + lora + rank_tokens

    def switch_seconds(self, unmerge: bool, merge: bool) -> float:
        """A change of the merged adapter: the old one out (``unmerge``), the new one in (``merge``)."""
        return self.unmerge_s * unmerge + self.merge_s * merge

    def load_seconds(self, rank: int, tier: str) -> float:
        """Bringing an adapter of ``rank`` into a device slot from ``tier``: "cpu" (host memory)
        or "disk" (read into host memory first); "gpu" is there already."""
        if tier == "gpu":
            return 0.0
        seconds = self.slot_load_s_per_rank * rank
        if tier == "disk":
            seconds += self.host_load_seconds(rank)
        elif tier != "cpu":
            raise ValueError(f"unknown tier {tier!r}: gpu, cpu or disk")
        return seconds

    def host_load_seconds(self, rank: int) -> float:
        """Reading an adapter of ``rank`` from disk into host memory (a worker's load before the
        request that asks for it joins, or a placement's prefetch)."""
        return self.disk_load_s_per_rank * rank

    def move_seconds(self, context_tokens: int, ship_kv: bool) -> float:
        """What moving a running request costs: its KV shipped, or its context recomputed (prefilled
        again at the destination)."""
        if ship_kv:
            return self.kv_transfer_s_per_token * context_tokens
        return self.prompt_token_s * context_tokens + self.prefill_seq_s + self.step_s


# ---- Llama-2-7B on one GPU, by roofline --------------------------------------------------------
# Model: Llama-2-7B (Touvron et al., 2023, "Llama 2", Table 1 and the HF config): 6.74e9
# parameters, 32 layers, hidden 4096, intermediate 11008, 32 KV heads of 128; bf16, 2 bytes.
_PARAMS = 6.74e9
_LAYERS, _HIDDEN, _INTER = 32, 4096, 11008
_WEIGHT_BYTES = 2 * _PARAMS
_KV_BYTES_PER_TOKEN = 2 * _LAYERS * _HIDDEN * 2  # K and V, every layer, bf16: 0.5 MiB
# LoRA on all seven projections (q, k, v, o, gate, up, down): A (r x in) and B (out x r) per
# target, so per unit of rank sum(in + out) = 4 x (4096 + 4096) + 3 x (4096 + 11008) = 78,080
# parameters per layer.
_LORA_PARAMS_PER_RANK = _LAYERS * (4 * (_HIDDEN + _HIDDEN) + 3 * (_HIDDEN + _INTER))

# Assumptions (no published source fits a serving engine's kernels): 80 % of HBM bandwidth on
# weight reads, 60 % of dense bf16 peak on GEMMs, 1 ms per step for launches, sampling and the
# scheduler (a CUDA-graph decode step's host side), 80 % of a link's rate.
_BW_EFF, _FLOP_EFF, _STEP_OVERHEAD_S, _LINK_EFF = 0.8, 0.6, 1e-3, 0.8
# Links: PCIe 5.0 x16, 63 GB/s per direction (PCI-SIG, PCIe 5.0 base specification: 32 GT/s per
# lane, 128b/130b); an NVMe drive at 7 GB/s sequential read (a PCIe 4.0 x4 drive's datasheet
# figure, e.g. Samsung 990 PRO: 7,450 MB/s); 100 Gb/s between hosts (an InfiniBand EDR / 100 GbE NIC).
_PCIE_BPS, _NVME_BPS, _NET_BPS = 63e9, 7e9, 100e9 / 8
# vLLM's default gpu_memory_utilization (0.9) of the device's memory, less the weights, is KV cache.
_GPU_MEM_UTIL = 0.9


def adapter_file_bytes(rank: int) -> int:
    """The bytes of a simulated adapter's files, as the registry keeps them (``AdapterEntry.file_bytes``):
    a bf16 adapter of ``rank`` on all seven projections of the 7B model above. Every profile's
    reads are in proportion to the rank, so dispatch prices them alike whatever the constant."""
    return 2 * _LORA_PARAMS_PER_RANK * rank


def roofline_llama7b(name: str, hbm_bps: float, bf16_flops: float, memory_bytes: float) -> CostProfile:
    """Llama-2-7B serving on one GPU of ``hbm_bps`` memory bandwidth, ``bf16_flops`` dense bf16
    throughput and ``memory_bytes`` of memory, from the constants above."""
    bw, flops = hbm_bps * _BW_EFF, bf16_flops * _FLOP_EFF
    weights_and_copy = 2 * _WEIGHT_BYTES  # a merge reads and writes every projection's weights
    return CostProfile(
        name=name,
        step_s=_STEP_OVERHEAD_S + _WEIGHT_BYTES / bw,  # decode reads every weight once a step
        token_s=2 * _PARAMS / flops,  # 2 FLOPs per parameter per token
        context_token_s=_KV_BYTES_PER_TOKEN / bw,
        lora_segment_s=2 * _LORA_PARAMS_PER_RANK * 16 / bw,  # a rank-16 adapter's A and B, read once
        lora_rank_token_s=2 * _LORA_PARAMS_PER_RANK / flops,
        unmerged_step_s=0.0,
        merge_s=weights_and_copy / bw,
        unmerge_s=weights_and_copy / bw,
        slot_load_s_per_rank=2 * _LORA_PARAMS_PER_RANK / (_PCIE_BPS * _LINK_EFF),
        disk_load_s_per_rank=2 * _LORA_PARAMS_PER_RANK / _NVME_BPS,
        kv_transfer_s_per_token=_KV_BYTES_PER_TOKEN / (_NET_BPS * _LINK_EFF),
        kv_capacity_tokens=int((memory_bytes * _GPU_MEM_UTIL - _WEIGHT_BYTES) / _KV_BYTES_PER_TOKEN),
    )


# NVIDIA H100 SXM datasheet: 3.35 TB/s HBM3, 989 TFLOP/s dense bf16 (1,979 with sparsity), 80 GB.
H100 = roofline_llama7b("h100-llama7b", 3.35e12, 989e12, 80e9)
# NVIDIA H200 datasheet: 4.8 TB/s HBM3e, 989 TFLOP/s dense bf16, 141 GB.
H200 = roofline_llama7b("h200-llama7b", 4.8e12, 989e12, 141e9)

# The dLoRA artifact's constants at Llama-7B (issue 21, from the artifact's simulator): an
# iteration costs 15 ms merged and 27 ms unmerged whatever its batch, and a switch of the merged
# adapter 20 ms (an unmerge and a merge, 10 ms each). Loads, moves and KV as the A100-80GB-class
# roofline (the artifact's testbed), the H100 figures standing in.
ARTIFACT = dataclasses.replace(
    H100,
    name="dlora-artifact",
    step_s=15e-3,
    token_s=0.0,
    context_token_s=0.0,
    lora_segment_s=0.0,
    lora_rank_token_s=0.0,
    unmerged_step_s=12e-3,
    merge_s=10e-3,
    unmerge_s=10e-3,
)

PROFILES = {p.name: p for p in (ARTIFACT, H100, H200)}
_BENCH_RANK = 16  # dlora bench engine makes its adapters at this rank


def _fit_through_zero(rows: list[tuple[float, float, float]]) -> tuple[float, float]:
    """(a, b) minimising sum (a x + b y - z)^2 over ``rows`` of (x, y, z), each clipped at 0;
    with one kind of point only (or none) the other coefficient is 0."""
    sxx = sum(x * x for x, _, _ in rows)
    syy = sum(y * y for _, y, _ in rows)
    sxy = sum(x * y for x, y, _ in rows)
    sxz = sum(x * z for x, _, z in rows)
    syz = sum(y * z for _, y, z in rows)
    det = sxx * syy - sxy * sxy
    if det > 1e-12 * max(sxx * syy, 1e-300):
        a, b = (sxz * syy - syz * sxy) / det, (syz * sxx - sxz * sxy) / det
        if a >= 0 and b >= 0:
            return a, b
    # Collinear points, or a negative coefficient: the better single-term fit.
    a_only = sxz / sxx if sxx else 0.0
    b_only = syz / syy if syy else 0.0
    err_a = sum((a_only * x - z) ** 2 for x, _, z in rows)
    err_b = sum((b_only * y - z) ** 2 for _, y, z in rows)
    return (max(0.0, a_only), 0.0) if err_a <= err_b else (0.0, max(0.0, b_only))


def measured(curve: dict[float, float], name: str, **over: float) -> CostProfile:
    """A profile whose decode step takes ``curve`` (batch -> seconds, two sizes at least), prefill
    tokens the curve's slope each, and everything else as ``over`` sets it, the rest as the H100
    roofline's links (loads, moves; say so when comparing). Raises ValueError with fewer points."""
    if len(curve) < 2:
        raise ValueError("a measured profile needs step times at two batch sizes at least")
    points = tuple(sorted(curve.items()))
    (b0, s0), (b1, s1) = points[0], points[-1]
    # The curve prices decodes itself; this slope prices prompt tokens, which a flat GPU curve's
    # noise must not make negative.
    per_token = max(0.0, (s1 - s0) / (b1 - b0))
    fields: dict[str, Any] = dict(
        name=name,
        step_s=s0 - per_token * b0,
        token_s=per_token,
        context_token_s=0.0,  # in the curve: its points hold a short prompt's context
        lora_segment_s=0.0,
        lora_rank_token_s=0.0,
        unmerged_step_s=0.0,
        curve=points,
    )
    return dataclasses.replace(H100, **(fields | over))


def pooled_cycles(rows: list[dict[str, Any]], min_steps: int = 5) -> dict[float, float]:
    """Mean batch -> mean loop seconds per decode step, per batch bucket over every row's ``cycles``
    (``dlora bench cluster``: bucket -> [steps, seconds, sequences]) where ``min_steps`` were timed."""
    pooled: dict[int, list[float]] = {}
    for row in rows:
        for bucket, counts in row.get("cycles", {}).items():
            total = pooled.setdefault(int(bucket), [0.0, 0.0, 0.0])
            for i, value in enumerate(counts):
                total[i] += value
    return {seqs / n: s / n for _, (n, s, seqs) in sorted(pooled.items()) if n and n >= min_steps}


# A step log's columns (``dlora.loadgen.bench_policy.StepLog``), each but the seconds with the
# profile field that prices one of it; the intercept is ``step_s``. ``prefill_seqs`` counts the
# sequences a step prefills: each chunk of a chunked prompt and each recompute counts again.
STEP_COSTS = {
    "decode_seqs": "token_s",
    "prefill_tokens": "prefill_token_s",
    "prefill_seqs": "prefill_seq_s",
    "lora_segments": "lora_segment_s",
    "lora_rank_tokens": "lora_rank_token_s",
}
STEP_FIELDS = (*STEP_COSTS, "seconds")


def nonnegative_least_squares(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """The coefficients c >= 0 minimising |x c - y|: the best unconstrained fit over every subset of
    ``x``'s columns (the others at 0) whose coefficients are all >= 0 (the optimum is one of them:
    its free coefficients solve their least squares). For the few columns of a cost fit: 2^k fits."""
    k = x.shape[1]
    best, best_err = np.zeros(k), float(y @ y)
    for mask in range(1, 1 << k):
        cols = [j for j in range(k) if mask >> j & 1]
        c, *_ = np.linalg.lstsq(x[:, cols], y, rcond=None)
        if (c >= 0).all() and (err := float(np.sum((x[:, cols] @ c - y) ** 2))) < best_err:
            best, best_err = np.zeros(k), err
            best[cols] = c
    return best


def from_steps(steps: list[list[float]], name: str, **over: float) -> CostProfile:
    """A profile fitted to a run's own steps (``StepLog`` rows in ``dlora bench policy`` and ``bench
    e2e``, ``STEP_FIELDS``: per step its decoding sequences, prompt tokens, sequences prefilling,
    LoRA segments and rank-tokens, and the loop's seconds around it, switches, loads and CUDA graph
    recording out): seconds = step_s + each column times its cost (``STEP_COSTS``), least squares
    with every cost >= 0. Priced so, a step costs what the run's loop spent on one of its shape:
    the engine's host work to admit and finish requests included, which a curve of decode steps
    alone leaves out (issue 21's validation); the simulated engine's own step records (what its
    policy learns from) read that much longer than a real engine's. Adapter loads, moves and KV
    capacity are not in a step log: the H100 roofline's, as in ``measured``; ``over`` sets any
    field. Raises ValueError with fewer steps than columns, or rows of another width."""
    rows = np.asarray(steps, dtype=float)
    if rows.ndim != 2 or rows.shape[0] < len(STEP_FIELDS) or rows.shape[1] != len(STEP_FIELDS):
        raise ValueError(f"a profile fitted to steps needs at least {len(STEP_FIELDS)} rows of {STEP_FIELDS}")
    x = np.column_stack([np.ones(len(rows)), rows[:, :-1]])
    c = nonnegative_least_squares(x, rows[:, -1])
    fields: dict[str, Any] = dict(name=name, step_s=float(c[0]), context_token_s=0.0, unmerged_step_s=0.0)
    fields |= {f: float(v) for f, v in zip(STEP_COSTS.values(), c[1:])}
    return dataclasses.replace(H100, **(fields | over))


def step_log(bench: dict[str, Any]) -> list[list[float]]:
    """Every step logged in a ``dlora bench policy`` / ``bench e2e`` JSON (its rows', or their runs')."""
    rows = bench.get("rows", [])
    return [step for row in rows for run in row.get("runs", [row]) for step in run.get("steps", [])]


# No cost of one replica's work is near an hour; one far past it stalls the simulated clock.
MAX_COST_S = 3600.0


def checked(p: CostProfile) -> CostProfile:
    """``p``, if its costs are possible. Raises ValueError naming the first that is not: a cost
    not a finite number >= 0 (a benchmark's JSON with NaN, Infinity or negative times: a user's
    trial simulated -5 ms/token from one) or over ``MAX_COST_S``, a measured step of no time, a
    prompt token priced below nothing (step times that fall as the batch grows), or steps that
    cost nothing at all."""
    if bad := [(b, sec) for b, sec in p.curve if not (math.isfinite(b) and 0 < sec <= MAX_COST_S)]:
        batch, seconds = bad[0]
        raise ValueError(f"its step at batch {batch:g} takes {seconds:g} s: a step takes some time, under an hour")
    for f in dataclasses.fields(p):
        value = getattr(p, f.name)
        if isinstance(value, (int, float)) and not math.isfinite(value):
            raise ValueError(f"its {f.name} is {value}, not a finite number")
        if isinstance(value, (int, float)) and value < 0 and f.name != "step_s":  # step_s: the curve's intercept
            raise ValueError(f"its {f.name} is {value:g}, below zero (a cost is never)")
        if isinstance(value, float) and value > MAX_COST_S:  # the clock would stall: t + a step == t
            raise ValueError(f"its {f.name} is {value:g} s, over {MAX_COST_S:g}")
    if p.step_seconds(StepShape(1, 0, 0)) <= 0:
        raise ValueError("its decode step costs nothing: the times it was made from are all zero")
    return p


def calibrated(bench: dict[str, Any], name: str = "") -> CostProfile:
    """A profile from a benchmark's JSON. ``dlora bench policy``'s or ``bench e2e``'s: fitted to
    every step their runs logged (``from_steps``), merge and unmerge as they measured them.
    ``dlora bench engine``'s: its base decode step times by
    batch as the curve, merge and unmerge as measured, and the extra time of its unmerged and mixed
    points over base fitted as a cost per LoRA segment and one per rank-token (least squares
    through zero, each point's ``lora_segments`` / ``lora_rank_tokens``; older JSON without them:
    unmerged points of rank 16). ``dlora bench cluster``'s: the step times its workers measured
    alone with requests spread unmerged over their slots (LoRA inside the curve), or, where its
    rows carry the workers' own loop time per decode step during the runs (``cycles``, two batch
    buckets at least: ``pooled_cycles``), that curve, with prompt tokens at the engine-alone slope;
    merge and unmerge at the roofline's unless ``bench`` gives ``merge_ms`` / ``unmerge_ms``. The
    loop-time curve holds the worker shell's work per step, so the simulated engine's own step
    records (the policy's costs, its wait bound, ``seconds_per_token``) read that much longer than
    a real engine's. Prefill, KV, loads and moves are not measured there (see ``measured``).
    ``dlora bench kernels``' JSON is not one: it times each kernel alone, hot, at fixed shapes,
    while a step's time is those kernels inside the model with everything between them (launches,
    norms, sampling, the host), which ``bench engine`` measures whole (on a CPU the LoRA calls cost
    two to three times more inside a step than alone in a loop: BENCHMARKS.md, LoRA tax).
    Raises ValueError without step times at two batch sizes (or too few steps logged), KeyError
    for JSON of none of these kinds; ValueError for costs no engine has (``checked``)."""
    return checked(_calibrated(bench, name))


def _calibrated(bench: dict[str, Any], name: str) -> CostProfile:
    label = name or f"calibrated ({bench.get('machine', 'unknown machine')}, {bench.get('date', '')})"
    switches = {k: bench[f"{k[:-2]}_ms"] / 1e3 for k in ("merge_s", "unmerge_s") if f"{k[:-2]}_ms" in bench}
    if steps := step_log(bench):  # bench policy / e2e: the runs' own steps
        return from_steps(steps, label, **switches)
    if "points" not in bench and "bound" not in bench and bench.get("rows"):
        raise ValueError("its runs logged no steps (measured before dlora bench logged them): run it again")
    if "points" not in bench:  # bench cluster: its workers' step curve, in the runs if measured there
        inside = pooled_cycles(bench.get("rows", []))
        alone = {float(b): s for b, s in bench["bound"]["step_seconds"].items()}
        if len(inside) < 2:
            return measured(alone, label, **switches)
        # A prompt token costs what the engine alone measured: the runs' slope also holds the
        # shell's work per sequence (a chunk out, a record), which a prompt token does not make.
        return measured(inside, label, token_s=measured(alone, label).token_s, **switches)
    points = bench["points"]
    base = {p["batch"]: p["step_ms"] / 1e3 for p in points if p["mode"] == "base"}
    # LoRA-carrying steps over base = segments x a + rank-tokens x b, least squares through zero:
    # unmerged ones and mixed ones (the merged adapter's correction is LoRA work too), each with
    # the work it ran (older JSON without it: unmerged, rank 16).
    rows = [
        (
            p.get("lora_segments", p["adapters"]),
            p.get("lora_rank_tokens", p["batch"] * _BENCH_RANK),
            p["step_ms"] / 1e3 - base[p["batch"]],
        )
        for p in points
        if p["mode"] in ("unmerged", "mixed") and p["batch"] in base
    ]
    segment_s, rank_token_s = _fit_through_zero(rows)
    return measured(base, label, lora_segment_s=segment_s, lora_rank_token_s=rank_token_s, **switches)
