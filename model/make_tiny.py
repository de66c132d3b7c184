"""Make a random Llama-family model and PEFT adapters offline, deterministically for a seed.

The model directory is a normal Hugging Face one (config.json, model.safetensors, a byte-level BPE
tokenizer), so transformers, peft and the engine all load it as they would a real checkpoint.
Weights are scaled so activations stay O(1) and logits are well separated: greedy decoding then
has no near-ties, and engine and oracle agree token for token in fp32.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from dlora.model.adapter_files import AdapterLimits

PRESETS = {
    # For tests: builds and runs in well under a second.
    "tiny": dict(
        hidden_size=64,
        intermediate_size=176,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=512,
        max_position_embeddings=512,
    ),
    # For GPU benchmarks: a 7B model's widths (Llama-2-7B's hidden and intermediate sizes, with
    # Llama-3-8B's 8 KV heads for GQA), four layers: each layer's step costs what a 7B layer's does,
    # and the model is made in seconds (about 1B parameters, 3.9 GB of fp32 on disk).
    "7b": dict(
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=4,
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab_size=32000,
        max_position_embeddings=4096,
    ),
    # For CPU benchmarks: about 100M parameters.
    "small": dict(
        hidden_size=768,
        intermediate_size=3072,
        num_hidden_layers=12,
        num_attention_heads=12,
        num_key_value_heads=4,
        vocab_size=2048,
        max_position_embeddings=2048,
    ),
}
TARGET_SETS = [
    ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    ["q_proj", "v_proj", "down_proj"],
    ["k_proj", "o_proj", "gate_proj", "up_proj"],
]
_SYLLABLES = "ka lo re mi su ta ne vo ri da po le si mu ga no be fi tu za ch sh th qu ar en in on er al".split()


@dataclass(frozen=True)
class TinyOutput:
    model: Path
    adapters_dir: Path
    adapters: dict[str, Path]


def make_tokenizer(out: Path, vocab_size: int, seed: int) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    rng = random.Random(seed)
    words = ["".join(rng.choices(_SYLLABLES, k=rng.randint(1, 4))) for _ in range(3000)]
    corpus = [" ".join(rng.choices(words, k=12)) + rng.choice([".", "!", "?", ","]) for _ in range(4000)]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<pad>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer=trainer)
    fast = PreTrainedTokenizerFast(  # type: ignore[no-untyped-call]  # transformers leaves it untyped
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    )
    fast.save_pretrained(out)


def make_model(out: Path, preset: str = "tiny", arch: str = "llama", seed: int = 0) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    shape = PRESETS[preset]
    make_tokenizer(out, shape["vocab_size"], seed)
    g = torch.Generator().manual_seed(seed)
    h, inter, layers = shape["hidden_size"], shape["intermediate_size"], shape["num_hidden_layers"]
    heads, kv_heads, vocab = shape["num_attention_heads"], shape["num_key_value_heads"], shape["vocab_size"]
    head_dim = h // heads
    qwen = arch == "qwen2"

    def linear(out_f: int, in_f: int, gain: float = 1.0) -> torch.Tensor:
        return torch.randn(out_f, in_f, generator=g) * (gain / math.sqrt(in_f))

    def norm(n: int) -> torch.Tensor:
        return 1.0 + 0.1 * torch.randn(n, generator=g)

    # A tied head reads logits off the embeddings, so they stay small next to the layers' outputs
    # (else the residual of the input token wins and greedy decoding repeats it).
    embed_std = 0.1 if qwen else 1.0
    t: dict[str, torch.Tensor] = {"model.embed_tokens.weight": embed_std * torch.randn(vocab, h, generator=g)}
    for i in range(layers):
        p = f"model.layers.{i}."
        t[p + "input_layernorm.weight"] = norm(h)
        t[p + "post_attention_layernorm.weight"] = norm(h)
        for name, n_out in (("q", heads * head_dim), ("k", kv_heads * head_dim), ("v", kv_heads * head_dim)):
            t[p + f"self_attn.{name}_proj.weight"] = linear(n_out, h)
            if qwen:
                t[p + f"self_attn.{name}_proj.bias"] = 0.1 * torch.randn(n_out, generator=g)
        t[p + "self_attn.o_proj.weight"] = linear(h, heads * head_dim, gain=4.0)
        t[p + "mlp.gate_proj.weight"] = linear(inter, h)
        t[p + "mlp.up_proj.weight"] = linear(inter, h)
        t[p + "mlp.down_proj.weight"] = linear(h, inter, gain=4.0)
    t["model.norm.weight"] = norm(h)
    if not qwen:  # Qwen2 ties the LM head to the embeddings; Llama keeps its own
        t["lm_head.weight"] = linear(vocab, h, gain=3.0)
    save_file({k: v.contiguous() for k, v in t.items()}, str(out / "model.safetensors"))

    config = {
        "architectures": ["Qwen2ForCausalLM" if qwen else "LlamaForCausalLM"],
        "model_type": arch,
        **shape,
        "head_dim": head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0,
        "tie_word_embeddings": qwen,
        "attention_bias": qwen,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "pad_token_id": 0,
        "torch_dtype": "float32",
    }
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    (out / "generation_config.json").write_text(
        json.dumps({"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}, indent=2) + "\n"
    )
    return out


def make_adapter(out: Path, model_dir: Path, rank: int, index: int, seed: int) -> Path:
    """One PEFT LoRA directory with non-zero random A and B over a cycle of target sets."""
    cfg = json.loads((model_dir / "config.json").read_text())
    h, inter = cfg["hidden_size"], cfg["intermediate_size"]
    q, kv = cfg["num_attention_heads"] * cfg["head_dim"], cfg["num_key_value_heads"] * cfg["head_dim"]
    shapes = {
        "q_proj": (q, h),
        "k_proj": (kv, h),
        "v_proj": (kv, h),
        "o_proj": (h, q),
        "gate_proj": (inter, h),
        "up_proj": (inter, h),
        "down_proj": (h, inter),
    }
    targets = TARGET_SETS[index % len(TARGET_SETS)]
    # Never equal to r, as real adapters often are; at rank 1 twice it (half was 0: a division by zero)
    alpha = 2 * rank if index % 2 == 0 or rank == 1 else rank // 2
    use_rslora = index % 4 == 3
    scale = alpha / math.sqrt(rank) if use_rslora else alpha / rank
    g = torch.Generator().manual_seed(seed * 1000 + index + 1)
    tensors = {}
    for i in range(cfg["num_hidden_layers"]):
        for name in targets:
            n_out, n_in = shapes[name]
            block = "self_attn" if name in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"
            key = f"base_model.model.model.layers.{i}.{block}.{name}"
            tensors[f"{key}.lora_A.weight"] = torch.randn(rank, n_in, generator=g) / math.sqrt(n_in)
            # Sized so the adapter moves each projection's output by ~30%: adapters change the text.
            tensors[f"{key}.lora_B.weight"] = torch.randn(n_out, rank, generator=g) * (0.3 / (math.sqrt(rank) * scale))
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / "adapter_model.safetensors"))
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        # Relative (metadata only: nothing here loads it), so the same seed writes the same bytes
        # wherever the output goes.
        "base_model_name_or_path": os.path.relpath(model_dir, out),
        "r": rank,
        "lora_alpha": alpha,
        "lora_dropout": 0.0,
        "use_rslora": use_rslora,
        "target_modules": targets,
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
    }
    (out / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")
    return out


def make_tiny(
    out: str | Path,
    preset: str = "tiny",
    arch: str = "llama",
    num_adapters: int = 4,
    ranks: list[int] | None = None,
    seed: int = 0,
) -> TinyOutput:
    """Write OUT/model and OUT/adapters/lora-<i>; the same arguments always give the same files.

    Raises:
        ValueError: an unknown preset or arch, a rank below 1 or above ``max_lora_rank`` (512),
            a negative ``num_adapters``.
        OSError: ``out`` cannot be written (a file, a read-only place)."""
    if preset not in PRESETS:
        raise ValueError(f"preset {preset!r}: expected one of {sorted(PRESETS)}")
    if arch not in ("llama", "qwen2"):
        raise ValueError(f"arch {arch!r}: expected llama or qwen2")
    ranks = ranks or [8, 16, 32]
    if any(r < 1 for r in ranks):
        raise ValueError(f"ranks must be >= 1, got {ranks}")
    if num_adapters and (too_high := [r for r in ranks if r > (limit := AdapterLimits().max_lora_rank)]):
        # written, every engine at its default would refuse them (and rank 100,000 is a GB of file)
        raise ValueError(f"ranks {too_high} are above max_lora_rank={limit}, the most an engine loads by default")
    if num_adapters < 0:
        raise ValueError(f"num_adapters must be >= 0, got {num_adapters}")
    out = Path(out)
    model = make_model(out / "model", preset, arch, seed)
    adapters_dir = out / "adapters"
    adapters = {
        f"lora-{i}": make_adapter(adapters_dir / f"lora-{i}", model, ranks[i % len(ranks)], i, seed)
        for i in range(num_adapters)
    }
    # Adapters an earlier run into the same folder made beyond these: the folder holds what was asked.
    for stale in adapters_dir.glob("lora-*"):  # its own names only: lora-<number>
        if stale.name[5:].isdigit() and stale.name not in adapters and (stale / "adapter_config.json").exists():
            shutil.rmtree(stale)
    return TinyOutput(model=model, adapters_dir=adapters_dir, adapters=adapters)
