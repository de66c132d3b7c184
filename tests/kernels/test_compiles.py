"""The Triton kernels compile once per tile shape, never per batch size or context length (issue
15): a step of a new size must not wait for a compile. On a GPU the variants Triton holds are
counted (make gpu-check); everywhere, each launch's specialization key is computed by Triton's own
rule (the interpreter compiles nothing, so that is what a machine without a GPU can check)."""

from __future__ import annotations

import contextlib
import inspect
import random
from collections.abc import Iterator

import pytest
import torch

from dlora.kernels import attention_triton, exponential_triton, lora_fused_triton, lora_triton, norm_triton, rope_triton
from dlora.kernels.attention_triton import build_paged_metadata
from dlora.kernels.lora_triton import LoraBatch, LoraBlocks, LoraPasses
from tests.kernels import test_attention_kernels, test_lora_kernels
from tests.kernels.conftest import cuda_only, device


def compiled(kernel: object) -> int:
    """Variants Triton holds of ``kernel``, over every device (its per-device kernel caches)."""
    return sum(len(cache[0]) for cache in kernel.device_caches.values())  # type: ignore[attr-defined]


@cuda_only
def test_lora_kernels_compile_once_per_tile_shape() -> None:
    rng = random.Random(0)
    proj = test_lora_kernels.projection(256, [256, 64], test_lora_kernels.MIXED_RANKS, torch.bfloat16)
    kernels = (lora_triton._shrink_kernel, lora_triton._expand_kernel)
    before = [compiled(k) for k in kernels]
    shapes = set()
    for batch in (1, 2, 3, 5, 8, 13, 16, 17, 31, 33, 64, 100, 200, 257):
        slots = test_lora_kernels.popularity("uniform", batch, rng)
        meta = LoraBatch.from_token_slots(slots, torch.device("cuda"))
        assert meta is not None and proj.tables is not None
        shapes.add(LoraBlocks.choose(meta, proj.tables))
        test_lora_kernels.check(proj, slots, torch.bfloat16, 256)
    assert all(compiled(k) - b <= len(shapes) for k, b in zip(kernels, before))


@cuda_only
def test_attention_kernels_compile_once_whatever_the_batch_and_context() -> None:
    rng = random.Random(1)
    kernels = (attention_triton._decode_kernel, attention_triton._prefill_kernel)
    before = [compiled(k) for k in kernels]
    for batch in (1, 2, 5, 16, 33, 64):
        ctx = [rng.randint(1, 600) for _ in range(batch)]
        test_attention_kernels.check([1] * batch, ctx, 8, 2, 64, dtype=torch.bfloat16, seed=batch)
        q_lens = [rng.randint(2, 40) for _ in range(max(1, batch // 8))]
        ctx = [q + rng.randint(0, 300) for q in q_lens]
        test_attention_kernels.check(q_lens, ctx, 8, 2, 64, dtype=torch.bfloat16, seed=batch)
    assert all(compiled(k) - b <= 1 for k, b in zip(kernels, before))


# ---- Without a GPU: each launch's specialization key, by Triton's own rule ------------------
# Triton compiles a kernel once per key: its constexpr values, its launch options, and for every
# other argument what ``specialize_impl`` makes of it (an int: 1, a multiple of 16, or neither;
# a pointer: 16-byte aligned or not), unless the kernel names it in ``do_not_specialize``. The
# launches below are recorded, not run (their outputs are not read), so the interpreter's
# slowness does not bound how many batch sizes and context lengths are tried.


def _do_not_specialize(kernel: object) -> set[int | str]:
    # Names or positions, as given (some Triton versions convert names to positions).
    given = getattr(kernel, "do_not_specialize", None)
    if given is None:
        given = getattr(kernel, "kwargs", {}).get("do_not_specialize")
    return set(given or ())


def specialization(kernel: object, args: tuple, kwargs: dict) -> tuple:
    """The key Triton compiles ``kernel`` under for a launch with ``args`` and ``kwargs``."""
    spec = pytest.importorskip("triton._C.libtriton").native_specialize_impl  # Triton >= 3.5 (pyproject)
    from triton.backends.compiler import BaseBackend

    params = inspect.signature(kernel.fn).parameters  # type: ignore[attr-defined]
    options = tuple(sorted((k, v) for k, v in kwargs.items() if k not in params))
    bound = inspect.signature(kernel.fn).bind(*args, **{k: v for k, v in kwargs.items() if k in params})  # type: ignore[attr-defined]
    bound.apply_defaults()  # positions are the signature's, as Triton's binder counts them
    skip = _do_not_specialize(kernel)
    key = []
    for i, (name, value) in enumerate(bound.arguments.items()):
        if "constexpr" in str(params[name].annotation):
            key.append((name, value))
        else:
            key.append((name, spec(BaseBackend, value, False, i not in skip and name not in skip, True)))
    return (*key, *options)


@contextlib.contextmanager
def recorded(*kernels: object) -> Iterator[dict[str, list[tuple]]]:
    """Within it, launches of ``kernels`` record their specialization key (by kernel name) and do
    not run."""
    keys: dict[str, list[tuple]] = {}
    with pytest.MonkeyPatch.context() as mp:
        for kernel in kernels:

            def run(*args, grid, warmup, _kernel=kernel, **kwargs) -> None:  # type: ignore[no-untyped-def]
                keys.setdefault(_kernel.fn.__name__, []).append(specialization(_kernel, args, kwargs))

            mp.setattr(kernel, "run", run)
        yield keys


@pytest.mark.parametrize("rule", ["as here", "gpu"])
def test_lora_kernels_specialize_once_per_tile_shape(rule: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Batches of 1 to 257 tokens over mixed-rank adapters: one key per tile shape chosen, whatever
    the batch size or how it splits over adapters. ``gpu``: the tiles a GPU's rule chooses (split-K
    included), here too, for the launches are not run."""
    if rule == "gpu":
        monkeypatch.setattr(lora_triton, "interpreting", lambda: False)
        monkeypatch.setattr(lora_fused_triton, "interpreting", lambda: False)
    rng = random.Random(0)
    k = 2048  # wide enough for the GPU rule to split K where a batch gives few programs
    proj = test_lora_kernels.projection(k, [256, 64], test_lora_kernels.MIXED_RANKS, torch.float32)
    assert proj.tables is not None
    kernels = (lora_triton._shrink_kernel, lora_triton._expand_kernel, lora_fused_triton._fused_kernel)
    by_tiles: dict[tuple[LoraBlocks, int], dict[str, set[tuple]]] = {}
    for batch in (1, 2, 3, 5, 8, 13, 16, 17, 24, 31, 32, 33, 48, 64, 100, 200, 257):
        for pattern in ("uniform", "identical", "skewed"):
            slots = test_lora_kernels.popularity(pattern, batch, rng)
            passes = LoraPasses.from_token_slots(slots, device())
            if passes is None:
                continue
            (meta,) = passes.passes
            x = torch.zeros(batch, k, device=device())
            out = torch.zeros(batch, 320, device=device())
            with recorded(*kernels) as keys:
                lora_triton.add_lora_triton(out, x, proj, meta)
                lora_fused_triton.add_lora_fused(out, x, proj, passes)
            fused_m = 16 if meta.max_group_len <= 16 else 32  # add_lora_fused's tokens per program
            tiles = (LoraBlocks.choose(meta, proj.tables, k), fused_m)
            for name, launch_keys in keys.items():
                by_tiles.setdefault(tiles, {}).setdefault(name, set()).update(launch_keys)
    assert len(by_tiles) <= 12  # a GPU rule: 3 token tiles x split-K 1-8; the interpreter: 4 token tiles
    for tiles, keys in by_tiles.items():
        counts = {name: len(k) for name, k in keys.items()}
        assert counts == dict.fromkeys(("_shrink_kernel", "_expand_kernel", "_fused_kernel"), 1), (tiles, counts)


def test_attention_kernels_specialize_once_whatever_the_batch_and_context() -> None:
    """Decodes and prefills of any batch and context length (block tables 1 to 38 blocks wide):
    one key for each kernel."""
    rng = random.Random(1)
    heads, kv_heads, head_dim, block_size = 8, 2, 64, 16
    keys: dict[str, set[tuple]] = {}
    for batch in (1, 2, 5, 16, 17, 33, 64):
        for q_lens in ([1] * batch, [rng.randint(2, 40) for _ in range(max(1, batch // 8))]):
            ctx = [n + rng.randint(0, 600) for n in q_lens]
            tables, slots, pool = [], [], 0
            for n, c in zip(q_lens, ctx):
                tables.append(list(range(pool, pool + -(-c // block_size))))
                pool += len(tables[-1])
                slots += [tables[-1][p // block_size] * block_size + p % block_size for p in range(c - n, c)]
            meta = build_paged_metadata(q_lens, ctx, tables, slots, block_size, device())
            q = torch.zeros(sum(q_lens), heads, head_dim, device=device())
            cache = torch.zeros(pool * block_size, kv_heads, head_dim, device=device())
            with recorded(attention_triton._decode_kernel, attention_triton._prefill_kernel) as launched:
                attention_triton.paged_attention_triton(q, cache, cache.clone(), meta, block_size, head_dim**-0.5)
            for name, launch_keys in launched.items():
                keys.setdefault(name, set()).update(launch_keys)
    assert set(keys) == {"_decode_kernel", "_prefill_kernel"}
    assert all(len(k) == 1 for k in keys.values()), {name: len(k) for name, k in keys.items()}


def test_norm_and_rope_kernels_specialize_once_whatever_the_batch() -> None:
    heads, kv_heads, head_dim = 4, 2, 32
    kernels = (norm_triton._rms_norm_kernel, norm_triton._silu_and_mul_kernel, rope_triton._rope_and_cache_kernel)
    keys: dict[str, set[tuple]] = {}
    for tokens in (1, 2, 7, 16, 17, 32, 100, 257):
        x, weight = torch.zeros(tokens, 128, device=device()), torch.ones(128, device=device())
        qkv = torch.zeros(tokens, (heads + 2 * kv_heads) * head_dim, device=device())
        cos = sin = torch.zeros(tokens, head_dim, device=device())
        cache = torch.zeros(512, kv_heads, head_dim, device=device())
        slots = torch.arange(tokens, device=device())
        with recorded(*kernels) as launched:
            norm_triton.rms_norm_triton(x, weight, 1e-6)
            norm_triton.add_rms_norm_triton(x, x.clone(), weight, 1e-6)
            norm_triton.silu_and_mul_triton(torch.zeros(tokens, 256, device=device()))
            rope_triton.rope_and_cache_triton(qkv, cos, sin, cache, cache.clone(), slots, heads, kv_heads)
        for name, launch_keys in launched.items():
            keys.setdefault(name, set()).update(launch_keys)
    # The norm compiles twice: with the residual added (ADD) and without.
    assert {name: len(k) for name, k in keys.items()} == {
        "_rms_norm_kernel": 2,
        "_silu_and_mul_kernel": 1,
        "_rope_and_cache_kernel": 1,
    }


def test_the_samplers_draws_specialize_once_whatever_the_rows() -> None:
    """One key per vocabulary and output (draws or uniforms), for any number of sampled rows."""
    keys: set[tuple] = set()
    for rows in (1, 2, 7, 16, 33, 64, 257):
        with recorded(exponential_triton._exponential_kernel) as launched:
            exponential_triton.exponentials_triton(torch.arange(rows, device=device()), 32000)
        keys.update(launched["_exponential_kernel"])
    assert len(keys) == 1, keys
