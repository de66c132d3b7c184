"""How one engine runs (``[worker.engine]`` in ``dlora.toml``). Pure and torch-free, so settings
load and check it in any process before a weight is read."""

from __future__ import annotations

import enum
import re

import msgspec

from dlora.model.adapter_files import AdapterLimits
from dlora.services.worker.policy.config import PolicyConfig

# What the device setting accepts, checked at load (torch is not imported there).
DEVICE = re.compile(r"auto|cpu|cuda(:\d+)?")
# The largest KV block, in tokens (vLLM's choices are 1 to 128, powers of two; ours alike, up to 256).
MAX_BLOCK_SIZE = 256


class DType(enum.StrEnum):
    AUTO = "auto"  # bfloat16 on a GPU, float32 on a CPU (as vLLM's "auto" serves half precision on GPUs)
    FLOAT32 = "float32"
    BFLOAT16 = "bfloat16"
    FLOAT16 = "float16"


class KernelPath(enum.StrEnum):
    AUTO = "auto"  # Triton on CUDA when it is installed, torch elsewhere
    TORCH = "torch"
    TRITON = "triton"  # on CPU only under TRITON_INTERPRET=1 (tests)


class EngineConfig(msgspec.Struct, kw_only=True, frozen=True, forbid_unknown_fields=True):
    """Names follow vLLM's engine arguments where one exists."""

    dtype: DType = DType.AUTO
    device: str = "auto"  # a torch device (cpu, cuda, cuda:1); auto: the first GPU if there is one, else cpu
    kernels: KernelPath = KernelPath.AUTO
    block_size: int = 16  # tokens per KV block
    num_blocks: int | None = None  # KV blocks; None: as many as kv_cache_bytes holds
    kv_cache_bytes: int = 256 << 20  # bytes of KV cache when num_blocks is None
    max_num_seqs: int = 64  # requests in one step
    # Tokens fed in one step, prefill chunks and decodes together (raised to max_model_len when
    # smaller and chunked prefill is off); 2048 as vLLM's default for an API server.
    max_num_batched_tokens: int = 2048
    # A prompt longer than the step's token budget left is prefilled in chunks beside the
    # decodes, so a long prompt does not stall every running stream (vLLM's chunked prefill).
    enable_chunked_prefill: bool = True
    # Full KV blocks are kept for later requests with the same prefix and adapter weights.
    enable_prefix_caching: bool = True
    max_model_len: int | None = None  # None: the model's max_position_embeddings
    max_loras: int = 8  # device slots for unmerged adapters, one adapter of any rank each
    # Adapters a worker keeps in host memory (vLLM's max_cpu_loras): past it, the one used least
    # lately and idle is dropped (loaded again from its files when asked for), and a read waits for
    # a request to end while that many have requests. At least max_loras.
    max_cpu_loras: int = 256
    # Decode steps on a GPU replay CUDA graphs (one per batch-size bucket up to max_num_seqs,
    # recorded on first use); true runs every step eagerly (vLLM's flag).
    enforce_eager: bool = False
    # The host schedules and launches each step while the device still runs the last one, taking
    # its sampled tokens on the device; outputs come one step later (vLLM's async scheduling).
    # Off by default until measured on a GPU (``make gpu-check`` times both); the host gains
    # nothing from it on a CPU, whose steps run as they are launched.
    async_scheduling: bool = False
    seed: int = 0  # for requests that sample without a seed of their own
    policy: PolicyConfig = PolicyConfig()
    # What an adapter may be (rank, file size, weight magnitude, scaling), checked when one is
    # loaded; the gateway checks its own copy at registration, keep the two the same.
    adapter_limits: AdapterLimits = AdapterLimits()

    def check(self) -> list[tuple[str, object, str]]:
        """Problems as (field, value, why); empty when the values are usable."""
        positive = ("block_size", "kv_cache_bytes", "max_num_seqs", "max_num_batched_tokens", "max_loras")
        bad: list[tuple[str, object, str]] = [
            (f, getattr(self, f), "must be >= 1") for f in positive if getattr(self, f) < 1
        ]
        if self.block_size >= 1 and (self.block_size & (self.block_size - 1) or self.block_size > MAX_BLOCK_SIZE):
            # the Triton attention kernel tiles a block by powers of two (it failed every request)
            bad.append(("block_size", self.block_size, f"must be a power of two up to {MAX_BLOCK_SIZE}"))
        if 1 <= self.max_num_batched_tokens < self.max_num_seqs:  # vLLM refuses it too
            bad.append(
                (
                    "max_num_batched_tokens",
                    self.max_num_batched_tokens,
                    f"must be >= max_num_seqs ({self.max_num_seqs}): each running sequence feeds a token a step",
                )
            )
        if not self.max_loras <= self.max_cpu_loras <= 4096:  # each is listed in the worker's stats
            bad.append(("max_cpu_loras", self.max_cpu_loras, f"must be in [max_loras ({self.max_loras}), 4096]"))
        bad += [
            (f, getattr(self, f), "must be >= 1 or null")
            for f in ("num_blocks", "max_model_len")
            if getattr(self, f) is not None and getattr(self, f) < 1
        ]
        if not DEVICE.fullmatch(self.device):
            bad.append(("device", self.device, "must be auto, cpu, or cuda with an optional index (cuda:1)"))
        if not -(1 << 63) <= self.seed < 1 << 63:  # as a request's (the engine stopped at start on it)
            bad.append(("seed", self.seed, "must be a 64-bit signed integer"))
        bad += [(f"adapter_limits.{f}", v, why) for f, v, why in self.adapter_limits.check()]
        return bad + [(f"policy.{f}", v, why) for f, v, why in self.policy.check()]
