"""Real checkpoints' layouts: the files and tensors the engine reads are the ones transformers
reads, and a tensor it would leave unread is refused, not served without (each of these served
wrong tokens silently)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from dlora.model.make_tiny import TinyOutput
from dlora.services.worker.engine.weights import WeightsError, load_weights
from tests.engine.helpers import make_engine, run_all, run_plan
from tests.engine.oracle import Oracle

PROMPT = [(7 * i + 3) % 500 for i in range(12)]


def _copy(tiny: TinyOutput, to: Path, **config: object) -> tuple[Path, dict[str, torch.Tensor]]:
    """``tiny``'s model copied to ``to`` with ``config`` set in its config.json; its tensors."""
    shutil.copytree(tiny.model, to)
    conf = json.loads((to / "config.json").read_text()) | config
    (to / "config.json").write_text(json.dumps(conf))
    return to, load_file(to / "model.safetensors")


def test_llama_attention_bias_gives_o_proj_a_bias_as_transformers(tiny_llama: TinyOutput, tmp_path: Path) -> None:
    """transformers' LlamaAttention (and vLLM's llama.py) give o_proj a bias beside q/k/v's under
    attention_bias; it was left unread and a Llama with one generated other tokens."""
    model_dir, tensors = _copy(tiny_llama, tmp_path / "llama", attention_bias=True)
    g = torch.Generator().manual_seed(5)
    for i in range(2):
        for proj in ("q", "k", "v", "o"):
            rows = tensors[f"model.layers.{i}.self_attn.{proj}_proj.weight"].shape[0]
            tensors[f"model.layers.{i}.self_attn.{proj}_proj.bias"] = 0.5 * torch.randn(rows, generator=g)
    save_file(tensors, model_dir / "model.safetensors")
    name = sorted(tiny_llama.adapters)[0]
    tiny = TinyOutput(model=model_dir, adapters_dir=tiny_llama.adapters_dir, adapters={name: tiny_llama.adapters[name]})
    oracle = Oracle(tiny)
    expected = {"base": oracle.generate(None, PROMPT, 8), "lora": oracle.generate(name, PROMPT, 8)}
    engine = make_engine(tiny)
    assert run_all(engine, {"base": (None, PROMPT), "lora": (name, PROMPT)}, 8) == expected
    merged, _ = run_plan(make_engine(tiny, policy="dlora"), {"lora": (name, PROMPT)}, 8, [(name, False)])
    assert merged["lora"] == expected["lora"]  # merging leaves the bias alone


def test_only_the_shards_the_index_names_are_read(tiny_llama: TinyOutput, tmp_path: Path) -> None:
    """An older revision's shard beside the index's, or Mistral's consolidated.safetensors beside
    the HF shards: every *.safetensors was read (the last name won: a mix of revisions served; or
    twice the host memory)."""
    model_dir, tensors = _copy(tiny_llama, tmp_path / "sharded")
    (model_dir / "model.safetensors").unlink()
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for shard, keys in shards.items():
        save_file({k: tensors[k] for k in keys}, model_dir / shard)
    index = {"metadata": {}, "weight_map": {k: shard for shard, keys in shards.items() for k in keys}}
    (model_dir / "model.safetensors.index.json").write_text(json.dumps(index))
    stale = {k: torch.zeros_like(t) for k, t in tensors.items()}
    save_file(stale, model_dir / "model-00003-of-00003.safetensors")  # sorts last: it won
    save_file(stale, model_dir / "consolidated.safetensors")
    cfg = make_engine(tiny_llama).model_config
    weights = load_weights(model_dir, cfg, torch.float32, torch.device("cpu"))
    assert torch.equal(weights.embed, tensors["model.embed_tokens.weight"])
    assert torch.equal(weights.layers[1].down, tensors["model.layers.1.mlp.down_proj.weight"])

    (model_dir / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(WeightsError, match="names shards that are not there: model-00002-of-00002"):
        load_weights(model_dir, cfg, torch.float32, torch.device("cpu"))
    (model_dir / "model.safetensors.index.json").write_text("[]")
    with pytest.raises(WeightsError, match="not a safetensors index"):
        load_weights(model_dir, cfg, torch.float32, torch.device("cpu"))


def test_tensors_the_architecture_does_not_use_are_refused(tiny_llama: TinyOutput, tmp_path: Path) -> None:
    """An fp8 checkpoint's weight_scale tensors (its config's quantization_config taken away), or
    an o_proj bias a config without attention_bias does not declare, were left unread and served
    wrong tokens; RoPE's cached inv_freq of older checkpoints is not a weight and is let be."""
    model_dir, tensors = _copy(tiny_llama, tmp_path / "scaled")
    cfg = make_engine(tiny_llama).model_config
    tensors["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(4)
    save_file(tensors, model_dir / "model.safetensors")
    load_weights(model_dir, cfg, torch.float32, torch.device("cpu"))
    extra = {
        "model.layers.0.self_attn.q_proj.weight_scale": torch.ones(()),
        "model.layers.1.self_attn.o_proj.bias": torch.zeros(cfg.hidden_size),
    }
    save_file(tensors | extra, model_dir / "model.safetensors")
    with pytest.raises(WeightsError, match="2 tensors the llama architecture as configured does not use, e.g. model"):
        load_weights(model_dir, cfg, torch.float32, torch.device("cpu"))
