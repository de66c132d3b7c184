"""Load a Hugging Face Llama-family checkpoint (safetensors) into the engine's fused layout.

The engine runs q/k/v as one projection and gate/up as one, so each layer does four matmuls
instead of seven; ``TARGETS`` records where each of the seven HF projections sits inside the
fused weights, which is what LoRA (unmerged deltas and merging) addresses.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from dlora.common import log
from dlora.model.config import ModelConfig

logger = log.get("engine")


class WeightsError(ValueError):
    """The checkpoint is missing a tensor or has one of the wrong shape."""


@dataclass
class LayerWeights:
    input_norm: torch.Tensor  # (hidden,)
    qkv: torch.Tensor  # (q_size + 2 * kv_size, hidden): rows q | k | v
    qkv_bias: torch.Tensor | None  # (q_size + 2 * kv_size,): Qwen2's, Llama's with attention_bias
    o: torch.Tensor  # (hidden, q_size)
    o_bias: torch.Tensor | None  # (hidden,): Llama's with attention_bias
    post_norm: torch.Tensor  # (hidden,)
    gate_up: torch.Tensor  # (2 * intermediate, hidden): rows gate | up
    down: torch.Tensor  # (hidden, intermediate)


@dataclass
class ModelWeights:
    embed: torch.Tensor  # (vocab, hidden)
    layers: list[LayerWeights]
    norm: torch.Tensor  # (hidden,)
    lm_head: torch.Tensor  # (vocab, hidden); the same tensor as embed when tied


# Tensors some checkpoints store that are computed here: RoPE's tables (older Llama checkpoints'
# inv_freq; ColossalAI's cos_cached and sin_cached, which vLLM's llama.py skips alike).
_COMPUTED = ("rotary_emb.inv_freq", "rotary_emb.cos_cached", "rotary_emb.sin_cached")
_O_BIAS = " (config.json's attention_bias=true gives a Llama's o_proj a bias beside q/k/v's, as transformers)"


def weight_files(model_dir: Path) -> list[Path]:
    """The safetensors files that hold the checkpoint, as transformers picks them:
    ``model.safetensors``, else the shards ``model.safetensors.index.json`` names, else every
    ``*.safetensors``. Other files beside them (an older revision's shards, Mistral's
    ``consolidated.safetensors``) are not read: read, they mixed revisions or doubled the host
    memory loading takes.

    Raises:
        WeightsError: none found, or the index is unreadable or names a file that is not there.
    """
    single, index = model_dir / "model.safetensors", model_dir / "model.safetensors.index.json"
    if single.is_file():
        return [single]
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            names = sorted(set(weight_map.values()))
        except (ValueError, KeyError, TypeError, AttributeError):
            raise WeightsError(f"{index}: not a safetensors index (a JSON object with a weight_map)") from None
        files = [model_dir / n for n in names]
        if missing := [n for n, f in zip(names, files) if not f.is_file()]:
            raise WeightsError(f"{index} names shards that are not there: {', '.join(missing[:3])}")
        return files
    if not (files := sorted(model_dir.glob("*.safetensors"))):
        raise WeightsError(f"{model_dir}: no *.safetensors files (other weight formats are not loaded)")
    return files


def read_safetensors(model_dir: Path) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for f in weight_files(model_dir):
        with safe_open(str(f), framework="pt") as st:
            for name in st.keys():
                tensors[name] = st.get_tensor(name)
    return tensors


def load_weights(model_dir: str | Path, cfg: ModelConfig, dtype: torch.dtype, device: torch.device) -> ModelWeights:
    """``model_dir``'s checkpoint in the engine's layout, as ``dtype`` on ``device``.

    Raises:
        WeightsError: a tensor is missing or of the wrong shape, or the checkpoint holds tensors
            this architecture does not use (served without them, a quantized checkpoint's scales
            gave wrong tokens silently; vLLM refuses them too). As transformers and vLLM, a bias
            the config does not declare is left unread (logged), and RoPE's cached tables
            (``inv_freq``; ColossalAI's ``cos_cached`` / ``sin_cached``) are computed, not read.
    """
    raw = read_safetensors(Path(model_dir))

    def take(name: str, shape: tuple[int, ...], why: str = "") -> torch.Tensor:
        if name not in raw:
            raise WeightsError(f"{model_dir}: tensor {name!r} is missing{why}")
        t = raw.pop(name)
        if tuple(t.shape) != shape:
            raise WeightsError(f"{model_dir}: tensor {name!r} has shape {tuple(t.shape)}, expected {shape}")
        return t.to(device=device, dtype=dtype)

    h, v, q, kv, inter = cfg.hidden_size, cfg.vocab_size, cfg.q_size, cfg.kv_size, cfg.intermediate_size
    layers = []
    for i in range(cfg.num_layers):
        p = f"model.layers.{i}."
        qkv_bias = None
        if cfg.qkv_bias:
            qkv_bias = torch.cat(
                [take(p + f"self_attn.{n}_proj.bias", (s,)) for n, s in (("q", q), ("k", kv), ("v", kv))]
            )
        layers.append(
            LayerWeights(
                input_norm=take(p + "input_layernorm.weight", (h,)),
                qkv=torch.cat(
                    [take(p + f"self_attn.{n}_proj.weight", (s, h)) for n, s in (("q", q), ("k", kv), ("v", kv))]
                ),
                qkv_bias=qkv_bias,
                o=take(p + "self_attn.o_proj.weight", (h, q)),
                o_bias=take(p + "self_attn.o_proj.bias", (h,), _O_BIAS) if cfg.o_bias else None,
                post_norm=take(p + "post_attention_layernorm.weight", (h,)),
                gate_up=torch.cat([take(p + f"mlp.{n}_proj.weight", (inter, h)) for n in ("gate", "up")]),
                down=take(p + "mlp.down_proj.weight", (h, inter)),
            )
        )
    # A tied model's stored lm_head is its embeddings again, as vLLM reads it; one that differs,
    # transformers 5 reads (and does not tie, saying so): its logits, not the embeddings' (a helper:
    # logprobs 12 apart from the first token). Compared as stored, on the host: not a second
    # vocab x hidden copy on the device (a review: 1 GB for a 128k vocabulary in bf16).
    untied = cfg.tie_word_embeddings and {"lm_head.weight", "model.embed_tokens.weight"} <= raw.keys()
    untied = untied and not torch.equal(raw["lm_head.weight"], raw["model.embed_tokens.weight"])
    embed = take("model.embed_tokens.weight", (v, h))
    lm_head = embed if cfg.tie_word_embeddings and not untied else take("lm_head.weight", (v, h))
    if untied:
        logger.warning("tie_word_embeddings is true but lm_head.weight differs: read as its own, as transformers")
    norm = take("model.norm.weight", (h,))
    unused = sorted(n for n in raw if not n.endswith(_COMPUTED) and n != "lm_head.weight")
    if biases := [n for n in unused if n.endswith(".bias")]:
        logger.warning("biases config.json does not declare left unread", tensors=len(biases), first=biases[0])
    if unused := [n for n in unused if not n.endswith(".bias")]:
        raise WeightsError(
            f"{model_dir}: {len(unused)} tensors the {cfg.model_type} architecture does not use, "
            f"e.g. {', '.join(unused[:3])} (a quantized checkpoint's scales, or another architecture's weights)"
        )
    return ModelWeights(embed=embed, layers=layers, norm=norm, lm_head=lm_head)
