"""The Llama-family forward pass over one step's flat batch of new tokens.

Every sequence in the step contributes its new tokens (a whole prompt at prefill, one token at
decode) to one flat (T, hidden) batch; attention reads each sequence's past from the paged KV
cache, and unmerged LoRA adds per-segment deltas after each projection.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from dlora.kernels.backend import Kernels
from dlora.model.config import ModelConfig
from dlora.services.worker.engine.kv_cache import KVCache
from dlora.services.worker.engine.rope import Rope
from dlora.services.worker.engine.slots import DeviceLoras
from dlora.services.worker.engine.weights import ModelWeights


@dataclass
class StepInputs:
    """Tensors for one forward pass, built once per step."""

    input_ids: torch.Tensor  # (T,) int64
    positions: torch.Tensor  # (T,) int64
    seq_lens: torch.Tensor  # (T,) int64: context length of each token's sequence after this step
    last_index: torch.Tensor  # (B,) int64: flat index of each sequence's last new token
    attention: Any  # the kernel path's attention metadata
    lora: Any  # the kernel path's LoRA metadata; None: no token adds or subtracts a LoRA delta
    # (E,) int64: more flat indices whose normed hidden states follow the B rows (prompt logprobs)
    extra_index: torch.Tensor | None = None


class LlamaModel:
    def __init__(
        self, cfg: ModelConfig, weights: ModelWeights, kv: KVCache, loras: DeviceLoras, kernels: Kernels
    ) -> None:
        self.cfg, self.weights, self.kv, self.loras, self.kernels = cfg, weights, kv, loras, kernels
        self.rope = Rope(cfg, weights.embed.device)
        self.scale = cfg.head_dim**-0.5

    def _proj(
        self,
        x: torch.Tensor,
        w: torch.Tensor,
        layer: int,
        fused: str,
        inp: StepInputs,
        bias: torch.Tensor | None = None,
    ) -> torch.Tensor:
        out = F.linear(x, w, bias)
        if inp.lora is not None:
            self.kernels.add_lora(out, x, self.loras.layers[layer][fused], inp.lora)
        return out

    def forward(self, inp: StepInputs) -> torch.Tensor:
        """Logits (B, vocab) in fp32 at each sequence's last new token."""
        return self.logits(self.last_hidden(inp))

    @torch.inference_mode()
    def logits(self, last: torch.Tensor) -> torch.Tensor:
        """(B, hidden) normed hidden states -> (B, vocab) fp32 logits."""
        return F.linear(last, self.weights.lm_head).float()

    @torch.inference_mode()
    def last_hidden(self, inp: StepInputs) -> torch.Tensor:
        """The final norm's output (B, hidden) at each sequence's last new token (then at each of
        ``extra_index``, (B + E, hidden)): everything but the
        LM head, whose (B, vocab) output a CUDA graph would otherwise keep a buffer of per bucket."""
        cfg, kv, ops = self.cfg, self.kv, self.kernels
        eps, layers = cfg.rms_norm_eps, self.weights.layers
        # The residual stream h; each sublayer's output is added to it in the same launch as the
        # next norm (add_rms_norm), the last one after the loop.
        h = self.weights.embed[inp.input_ids]
        x = ops.rms_norm(h, layers[0].input_norm, eps)
        cos, sin = self.rope.cos_sin(inp.positions, inp.seq_lens)
        for i, lw in enumerate(layers):
            qkv = self._proj(x, lw.qkv, i, "qkv", inp, lw.qkv_bias)
            # Rotated queries back; rotated keys and the values into the cache.
            q = ops.rope_and_cache(
                qkv, cos, sin, kv.k[i], kv.v[i], inp.attention.slots, cfg.num_heads, cfg.num_kv_heads
            )
            attn = self.kernels.paged_attention(q, kv.k[i], kv.v[i], inp.attention, kv.block_size, self.scale)
            x, h = ops.add_rms_norm(self._proj(attn.flatten(1), lw.o, i, "o", inp, lw.o_bias), h, lw.post_norm, eps)
            gate_up = self._proj(x, lw.gate_up, i, "gate_up", inp)
            down = self._proj(ops.silu_and_mul(gate_up), lw.down, i, "down", inp)
            if i + 1 < len(layers):
                x, h = ops.add_rms_norm(down, h, layers[i + 1].input_norm, eps)
            else:
                h = h + down
        rows = inp.last_index if inp.extra_index is None else torch.cat((inp.last_index, inp.extra_index))
        return ops.rms_norm(h[rows], self.weights.norm, eps)
