"""``dlora bench tune-lora``: the LoRA shrink and expand timed over candidate tiles on this GPU, at a
model's fused projections and decode batches, the fastest written to ``dlora_kernels/tuned/<device>.json``
(``dlora_kernels/lora_tuning.py``), which the engine then reads. Commit the file: it is the table for
every later run on that device. ``make gpu-check`` runs it first.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import torch

from dlora.kernels.lora import LoraProjection, LoraSlice
from dlora.kernels.lora_triton import LoraBatch, LoraBlocks, lora_expand, lora_shrink
from dlora.kernels.lora_tuning import TUNED, Shape, bucket, device_file
from dlora.loadgen.bench_common import today

# Shrink: input features per loop step x programs sharing K; expand: output columns per program.
SHRINK = [{"k": k, "split_k": s} for k in (64, 128) for s in (1, 2, 4, 8, 16)]
EXPAND = [{"n": n} for n in (32, 64, 128)]
PRESETS = {"7b": (4096, 32, 8, 128, 11008)}  # hidden, heads, KV heads, head_dim, intermediate


def projections(hidden: int, heads: int, kv_heads: int, head_dim: int, inter: int) -> dict[str, tuple[int, list[int]]]:
    """A Llama layer's fused projections: name -> (input features, slice sizes)."""
    kv = kv_heads * head_dim
    return {
        "qkv": (hidden, [heads * head_dim, kv, kv]),
        "o": (heads * head_dim, [hidden]),
        "gate_up": (hidden, [inter, inter]),
        "down": (inter, [hidden]),
    }


def _timer(device: torch.device) -> Callable[[Callable[[], object]], float]:
    """Milliseconds per call: Triton's do_bench (median) on a GPU; one timed call elsewhere (the
    interpreter: tests only, its times meaningless, so no warm-up call either)."""
    if device.type == "cuda":
        from triton.testing import do_bench

        return lambda fn: float(do_bench(fn, warmup=5, rep=20, return_mode="median"))

    def once(fn: Callable[[], object]) -> float:
        start = time.perf_counter()
        fn()
        return (time.perf_counter() - start) * 1e3

    return once


def tune_shape(
    in_features: int,
    sizes: list[int],
    rank: int,
    tokens: int,
    groups: int,
    dtype: torch.dtype,
    device: torch.device,
    shrink: list[dict[str, int]] = SHRINK,
    expand: list[dict[str, int]] = EXPAND,
) -> tuple[Shape, dict[str, int], dict[str, float]]:
    """The fastest tiles for a decode batch of ``groups`` adapters of ``rank`` with ``tokens`` tokens
    each: (its shape, the tiles, {default_ms, tuned_ms} for shrink + expand)."""
    g = torch.Generator().manual_seed(0)
    slices, offset = [], 0
    for size in sizes:
        sl = LoraSlice(offset, size, [], [], [])
        for _ in range(groups):
            sl.a.append((torch.randn(rank, in_features, generator=g) / in_features**0.5).to(device, dtype))
            sl.b.append((torch.randn(size, rank, generator=g) / rank**0.5).to(device, dtype))
            sl.scale.append(1.0)
        slices.append(sl)
        offset += size
    proj = LoraProjection(slices)
    proj.refresh(device)
    tables = proj.tables
    assert tables is not None
    batch = LoraBatch.from_token_slots(sorted(i % groups for i in range(tokens * groups)), device)
    assert batch is not None
    x = torch.randn(tokens * groups, in_features, generator=g).to(device, dtype)
    out = torch.zeros(tokens * groups, offset, device=device, dtype=dtype)
    timed = _timer(device)
    default = LoraBlocks.rule(batch, tables)  # what the engine runs without a table

    def shrink_ms(b: LoraBlocks) -> float:
        return timed(lambda: lora_shrink(x, tables, batch, b))

    def expand_ms(b: LoraBlocks) -> float:
        y = lora_shrink(x, tables, batch, b)
        return timed(lambda: lora_expand(out, y, tables, batch, b))

    # The rule's own tiles compete too: a table must never make a step slower than no table.
    own_shrink, own_expand = {"k": default.k, "split_k": default.split_k}, {"n": default.n}
    fits = [c for c in [own_shrink, *shrink] if c["k"] * c["split_k"] <= in_features]
    best_shrink = min(fits, key=lambda c: shrink_ms(replace(default, **c)))
    chosen = replace(default, **best_shrink)
    best_expand = min([own_expand, *expand], key=lambda c: expand_ms(replace(chosen, **c)))
    chosen = replace(chosen, **best_expand)
    shape = Shape(in_features, len(sizes), max(sizes), rank, bucket(tokens), bucket(groups))
    times = {
        "default_ms": shrink_ms(default) + expand_ms(default),
        "tuned_ms": shrink_ms(chosen) + expand_ms(chosen),
    }
    tiles = {f: getattr(chosen, f) for f in ("k", "split_k", "n")}
    return shape, tiles, times


def tune(
    preset: str,
    tokens: list[int],
    groups: list[int],
    rank: int,
    dtype: torch.dtype,
    device: torch.device,
    folder: Path = TUNED,
    **candidates: list[dict[str, int]],
) -> Path:
    """Tune every fused projection of ``preset`` (or ``tiny``: small shapes for tests) at each
    (tokens, groups) and merge the results into the device's table, written after each shape (a
    run cut short keeps what it measured); its path."""
    dims = PRESETS.get(preset, (64, 4, 2, 16, 96))
    rank = max(16, bucket(rank))
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    path = device_file(name, folder)
    table = json.loads(path.read_text()) if path.exists() else {"entries": {}, "timings": {}}
    for proj, (k, sizes) in projections(*dims).items():
        for t in tokens:
            for n in groups:
                shape, tiles, times = tune_shape(k, sizes, rank, t, n, dtype, device, **candidates)
                table["entries"][shape.key] = tiles
                table["timings"][shape.key] = times
                print(f"{proj:>8} {shape.key}: {tiles}  {times['default_ms']:.3f} -> {times['tuned_ms']:.3f} ms")
                table.update(device=name, triton=_triton_version(), torch=torch.__version__, date=today())
                table["dtype"] = str(dtype).removeprefix("torch.")
                folder.mkdir(parents=True, exist_ok=True)
                # Whole or not at all: gpu-check kills a run at its time bound, maybe mid-write.
                partial = path.with_suffix(".json.partial")
                partial.write_text(json.dumps(table, indent=1, sort_keys=True) + "\n")
                os.replace(partial, path)
    return path


def _triton_version() -> str:
    import triton

    return str(triton.__version__)


def run_tune_lora(args: argparse.Namespace) -> int:
    if not torch.cuda.is_available():
        print("dlora bench tune-lora: needs a CUDA device (the interpreter's times mean nothing)")
        return 2
    path = tune(
        args.preset,
        [int(t) for t in args.tokens.split(",")],
        [int(g) for g in args.groups.split(",")],
        args.rank,
        getattr(torch, args.dtype),
        torch.device("cuda"),
        Path(args.out) if args.out else TUNED,
    )
    print(f"wrote {path}")
    return 0
