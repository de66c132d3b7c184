"""``dlora bench kernels``: time and achieved bandwidth / FLOP rate of each kernel, beside its torch
reference (and, for attention, a dense SDPA over the same keys and values).

On a GPU the Triton kernels run natively at Llama-7B shapes, with the fraction of the device's
memory bandwidth. Without one they run under TRITON_INTERPRET=1 at small shapes: the interpreter
executes programs one by one in Python, so its times say nothing about speed and are recorded
only to show the path runs; the torch paths are timed at the real shapes on the CPU.
"""

from __future__ import annotations

import argparse
import math
import os
import random
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from dlora.loadgen.bench_common import figure, machine, save, today

if TYPE_CHECKING:
    from matplotlib.figure import Figure

TITLE = "Kernels: LoRA shrink/expand and paged attention (`dlora bench kernels`)"
# Peak memory bandwidth (GB/s) of devices we may be lent, by name fragment; --peak-gbs overrides.
PEAK_GBS = {"H200": 4800.0, "H100 PCIe": 2000.0, "H100": 3350.0, "A100-SXM4-80GB": 2039.0, "A100": 1555.0}


@dataclass
class Point:
    kernel: str  # "lora decode", "lora prefill", "attention decode", "attention prefill"
    impl: str  # triton | torch | sdpa-dense
    shape: str
    ms: float  # median
    gb_s: float  # bytes the op must move / time
    gflop_s: float
    bandwidth_fraction: float | None  # of the device's peak (GPU only)
    # Attention: median over rounds of this impl's time / the dense SDPA's in the same round (the
    # two alternate, so a machine whose speed drifts between runs moves both alike).
    vs_dense: float | None = None


class _Timer:
    """Median wall time of a callable over ``reps`` runs after a warm-up (and compile), in ms."""

    def __init__(self, device: torch.device, reps: int) -> None:
        self.device, self.reps = device, reps

    def _once(self, fn: Callable[[], object]) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        return (time.perf_counter() - t0) * 1e3

    def __call__(self, fn: Callable[[], object]) -> float:
        fn()
        return statistics.median(self._once(fn) for _ in range(self.reps))

    def interleaved(self, fns: dict[str, Callable[[], object]]) -> dict[str, list[float]]:
        """Each callable's times (ms), one run of each per round, the order turned every round."""
        for fn in fns.values():
            fn()
        names = list(fns)
        times: dict[str, list[float]] = {name: [] for name in names}
        for i in range(self.reps):
            for name in names[i % len(names) :] + names[: i % len(names)]:
                times[name].append(self._once(fns[name]))
        return times


def _lora_points(
    device: torch.device,
    dtype: torch.dtype,
    hidden: int,
    rank: int,
    tokens: int,
    adapters: int,
    prefill: bool,
    impls: list[str],
    measure,
    peak: float | None,
    mixed: bool = False,
) -> list[Point]:
    """``mixed``: a mixed decode step, slot 0's adapter merged and holding 3/4 of the tokens: the
    other tokens add their own delta and subtract slot 0's (two passes on the Triton path)."""
    from dlora.kernels.lora import LoraProjection, LoraSegments, LoraSlice, add_lora_torch

    sizes = [hidden, hidden, hidden]  # fused q|k|v of a Llama-7B-shaped layer
    g = torch.Generator().manual_seed(0)
    slices, off = [], 0
    for size in sizes:
        sl = LoraSlice(off, size, [], [], [])
        for _ in range(adapters):
            sl.a.append((torch.randn(rank, hidden, generator=g) / hidden**0.5).to(device, dtype))
            sl.b.append(torch.randn(size, rank, generator=g).to(device, dtype))
            sl.scale.append(2.0)
        slices.append(sl)
        off += size
    proj = LoraProjection(slices)
    proj.refresh(device)
    # Grouped by slot, as the engine orders every batch: at decode, even shares of the adapters;
    # at prefill, each adapter's prompts in one long segment.
    rng = random.Random(0)
    token_slots = sorted(rng.randrange(adapters) if prefill else i % adapters for i in range(tokens))
    minus_slots = None
    if mixed:
        token_slots = sorted(0 if i % 4 else 1 + i % (adapters - 1) for i in range(tokens))
        minus_slots = [-1 if s == 0 else 0 for s in token_slots]
        token_slots = [-1 if s == 0 else s for s in token_slots]
    x = torch.randn(tokens, hidden, generator=g).to(device, dtype)
    out = torch.zeros(tokens, off, device=device, dtype=dtype)
    elem = x.element_size()
    # Per pass: its adapters' weights once, its tokens' x, and their output read and written.
    passes = [token_slots] + ([minus_slots] if minus_slots else [])
    weights = sum(rank * hidden + size * rank for size in sizes)
    moved, flops = 0, 0
    for slots in passes:
        n = sum(s >= 0 for s in slots)
        moved += elem * (len({s for s in slots if s >= 0}) * weights + n * hidden + 2 * n * off)
        flops += 2 * n * rank * (hidden * len(sizes) + off)
    used = len({s for s in token_slots if s >= 0}) + bool(mixed)
    kernel = "lora mixed" if mixed else "lora prefill" if prefill else "lora decode"
    shape = f"K={hidden} r={rank} T={tokens} adapters={used}, fused qkv"
    points = []
    for impl in impls:
        if impl in ("triton", "triton-fused"):
            from dlora.kernels.lora_fused_triton import add_lora_fused
            from dlora.kernels.lora_triton import LoraPasses, add_lora_passes

            batch = LoraPasses.from_token_slots(token_slots, device, minus_slots)
            apply = add_lora_passes if impl == "triton" else add_lora_fused
            ms = measure(lambda: apply(out, x, proj, batch))
        else:
            segments = LoraSegments.from_token_slots(token_slots, None, minus_slots)
            ms = measure(lambda: add_lora_torch(out, x, proj, segments))
        gbs = moved / ms / 1e6
        points.append(Point(kernel, impl, shape, ms, gbs, flops / ms / 1e6, gbs / peak if peak else None))
    return points


def _attention_points(
    device: torch.device,
    dtype: torch.dtype,
    batch: int,
    ctx: int,
    heads: int,
    kv_heads: int,
    head_dim: int,
    impls: list[str],
    measure: _Timer,
    peak: float | None,
    block_size: int = 16,
    prefill: bool = False,
) -> list[Point]:
    """Decode (one new token per sequence) or prefill (every token of each sequence new, causal)."""
    from dlora.kernels.attention import build_attention_metadata, paged_attention_torch

    blocks = ctx // block_size
    perm = torch.randperm(batch * blocks, generator=torch.Generator().manual_seed(0)).tolist()
    tables = [perm[i * blocks : (i + 1) * blocks] for i in range(batch)]
    q_len = ctx if prefill else 1
    slots = [t[p // block_size] * block_size + p % block_size for t in tables for p in range(ctx - q_len, ctx)]
    g = torch.Generator().manual_seed(1)
    q = torch.randn(batch * q_len, heads, head_dim, generator=g).to(device, dtype)
    k = torch.randn(batch * ctx, kv_heads, head_dim, generator=g).to(device, dtype)
    v = torch.randn(batch * ctx, kv_heads, head_dim, generator=g).to(device, dtype)
    args = ([q_len] * batch, [ctx] * batch, tables, slots, block_size, device)
    scale = head_dim**-0.5
    elem = q.element_size()
    moved = elem * (2 * batch * ctx * kv_heads * head_dim + 2 * batch * q_len * heads * head_dim)
    flops = 4 * batch * heads * ctx * head_dim * (q_len + 1) // (2 if prefill else 1)  # causal: half the pairs
    shape = f"B={batch} ctx={ctx} heads={heads}/{kv_heads} D={head_dim}"
    kernel = "attention prefill" if prefill else "attention decode"
    fns: dict[str, Callable[[], object]] = {}
    for impl in impls:
        if impl == "triton":
            from dlora.kernels.attention_triton import build_paged_metadata, paged_attention_triton

            paged = build_paged_metadata(*args)
            fns[impl] = lambda: paged_attention_triton(q, k, v, paged, block_size, scale)
        elif impl == "torch":
            meta = build_attention_metadata(*args)
            fns[impl] = lambda: paged_attention_torch(q, k, v, meta, block_size, scale)
        else:  # the same keys and values laid out densely per sequence, gathered untimed
            idx = torch.tensor(tables, device=device)
            kd = k.unflatten(0, (-1, block_size))[idx].flatten(1, 2).transpose(1, 2).contiguous()
            vd = v.unflatten(0, (-1, block_size))[idx].flatten(1, 2).transpose(1, 2).contiguous()
            qd = q.unflatten(0, (batch, q_len)).transpose(1, 2)
            fns[impl] = lambda: F.scaled_dot_product_attention(
                qd, kd, vd, scale=scale, is_causal=prefill, enable_gqa=True
            )
    times = measure.interleaved(fns)
    dense = times.get("sdpa-dense")
    points = []
    for impl, ts in times.items():
        ms = statistics.median(ts)
        ratio = statistics.median(a / b for a, b in zip(ts, dense)) if dense and impl != "sdpa-dense" else None
        gbs = moved / ms / 1e6
        points.append(Point(kernel, impl, shape, ms, gbs, flops / ms / 1e6, gbs / peak if peak else None, ratio))
    return points


def run(args: argparse.Namespace) -> dict:
    cuda = torch.cuda.is_available()
    if not cuda:
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before the kernels import triton
    device = torch.device("cuda" if cuda else "cpu")
    name = torch.cuda.get_device_name() if cuda else machine()
    peak = args.peak_gbs or (next((v for k, v in PEAK_GBS.items() if k in name), None) if cuda else None)
    dtype = torch.float16 if cuda else torch.float32
    measure = _Timer(device, args.reps)
    real = ["triton", "torch"] if cuda else ["torch"]
    points: list[Point] = []

    def add(new: list[Point]) -> None:
        for p in new:
            frac = f"  {p.bandwidth_fraction:.0%} of peak" if p.bandwidth_fraction else ""
            print(f"{p.kernel:>16} {p.impl:>10} {p.shape:<42} {p.ms:9.3f} ms {p.gb_s:8.1f} GB/s{frac}", flush=True)
        points.extend(new)

    # Decode: the shrink and expand as one launch beside the pair (issue 15: "measure it").
    decode = [*real, "triton-fused"] if cuda else real
    for tokens in (32, 64, 128, 256):
        for adapters in (1, 8, 64):
            if adapters <= tokens and (cuda or tokens in (32, 256)):
                add(_lora_points(device, dtype, 4096, 16, tokens, adapters, False, decode, measure, peak))
    add(_lora_points(device, dtype, 4096, 16, 1024, 4, True, real, measure, peak))
    for tokens in (64, 256) if cuda else (32,):  # a mixed step beside its unmerged twin above
        add(_lora_points(device, dtype, 4096, 16, tokens, 8, False, real, measure, peak, mixed=True))
    for batch, ctx in ((8, 512), (64, 2048)) if cuda else ((8, 512),):
        for heads, kv_heads in ((32, 32), (32, 8)):
            add(
                _attention_points(device, dtype, batch, ctx, heads, kv_heads, 128, real + ["sdpa-dense"], measure, peak)
            )
    for batch, ctx in ((4, 512), (1, 2048)):  # whole prompts: a batch of short ones, one code-assistant-long
        for heads, kv_heads in ((32, 32), (32, 8)):
            impls = real + ["sdpa-dense"]
            add(_attention_points(device, dtype, batch, ctx, heads, kv_heads, 128, impls, measure, peak, prefill=True))
    if not cuda:  # the Triton path under the interpreter, at shapes it finishes quickly
        interp = _Timer(device, 1)
        add(_lora_points(device, dtype, 256, 16, 32, 8, False, ["triton", "triton-fused", "torch"], interp, None))
        add(_lora_points(device, dtype, 256, 16, 32, 8, False, ["triton", "torch"], interp, None, mixed=True))
        add(_attention_points(device, dtype, 4, 64, 4, 2, 16, ["triton", "torch"], interp, None))
    return {
        "machine": machine(),
        "date": today(),
        "device": name,
        "cuda": cuda,
        "dtype": str(dtype).split(".")[-1],
        "peak_gb_s": peak,
        "reps": args.reps,
        "points": [asdict(p) for p in points],
    }


def markdown(r: dict) -> str:
    where = (
        f"on **{r['device']}** (peak {r['peak_gb_s']:g} GB/s), {r['dtype']}, Triton native"
        if r["cuda"]
        else f"on **{r['machine']}** without a GPU, {r['dtype']}: torch paths at Llama-7B shapes on the CPU; the "
        "Triton rows ran under TRITON_INTERPRET=1 at small shapes (programs run one by one in Python: "
        "those times show the path runs, not its speed)"
    )
    lines = [
        f"Measured {r['date']} {where}. Median of {r['reps']} runs. GB/s counts the bytes the op must move "
        "(weights of the adapters in the batch, activations in and out; for attention the keys and values). "
        "An attention shape's implementations run in turn, one call each per round; × dense is the median "
        "over rounds of its time over the dense SDPA's in the same round.",
        "",
        "| kernel | impl | shape | ms | GB/s | GFLOP/s | of peak bandwidth | × dense SDPA |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for p in r["points"]:
        frac = f"{p['bandwidth_fraction']:.0%}" if p["bandwidth_fraction"] else "-"
        ratio = f"{p['vs_dense']:.2f}" if p.get("vs_dense") else "-"
        lines.append(
            f"| {p['kernel']} | {p['impl']} | {p['shape']} | {p['ms']:.3f} | {p['gb_s']:.1f} | "
            f"{p['gflop_s']:.1f} | {frac} | {ratio} |"
        )
    return "\n".join(lines)


def plot(r: dict) -> Figure:
    """Achieved bandwidth of each implementation per shape: LoRA kernels left, attention right."""
    fig, ax = figure(2)
    impls = list(dict.fromkeys(p["impl"] for p in r["points"]))
    height = 0.8 / max(1, len(impls))
    for a, family, title in zip(ax, ("lora", "attention"), ("LoRA shrink/expand", "Paged attention")):
        points = [p for p in r["points"] if p["kernel"].startswith(family)]
        shapes = list(dict.fromkeys((p["kernel"], p["shape"]) for p in points))
        labels = [f"{k.split()[-1]} {s.replace(', fused qkv', '').replace('adapters=', 'a=')}" for k, s in shapes]
        # Words every row shares (the rank, the head size) go to the title: they only widen the labels.
        common = set.intersection(*(set(label.split()) for label in labels)) if labels else set()
        labels = [" ".join(w for w in label.split() if w not in common) for label in labels]
        for i, impl in enumerate(impls):
            at = {(p["kernel"], p["shape"]): p["gb_s"] for p in points if p["impl"] == impl}
            ys = [y + i * height for y, s in enumerate(shapes) if s in at]
            if ys:  # one colour per implementation in both panels
                a.barh(ys, [at[s] for s in shapes if s in at], height, color=f"C{i}", label=impl)
        a.set_yticks([y + (len(impls) - 1) * height / 2 for y in range(len(shapes))], labels, fontsize=6)
        a.invert_yaxis()
        a.set(xlabel="achieved bandwidth (GB/s)", xscale="log")
        if r.get("peak_gb_s"):
            a.axvline(r["peak_gb_s"], color="grey", linestyle=":", label="device peak")
        a.xaxis.set_minor_formatter("")
        a.set_title(title + (f" ({' '.join(sorted(common))})" if common else ""), fontsize=9)
        if points:  # bars start from the decade below the slowest, so lengths compare on the log axis
            a.set_xlim(left=10 ** math.floor(math.log10(min(p["gb_s"] for p in points) / 2)))
            a.legend(fontsize=6)
    return fig


def run_bench_kernels(args: argparse.Namespace) -> int:
    result = run(args)
    save(result, args.json, args.benchmarks, "kernels", TITLE, markdown(result), plot=plot)
    return 0
