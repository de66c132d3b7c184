"""Real checkpoints' layouts: the files and tensors the engine reads are the ones transformers
reads, and a tensor it would leave unread is refused, not served without (each of these served
wrong tokens silently)."""

from __future__ import annotations

import dataclasses
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
    # model.safetensors beside the index wins, as transformers reads it (the parity oracle)
    save_file(stale, model_dir / "model.safetensors")
    assert not load_weights(model_dir, cfg, torch.float32, torch.device("cpu")).embed.any()
    (model_dir / "model.safetensors").unlink()

    (model_dir / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(WeightsError, match="names shards that are not there: model-00002-of-00002"):
        load_weights(model_dir, cfg, torch.float32, torch.device("cpu"))
    (model_dir / "model.safetensors.index.json").write_text("[]")
    with pytest.raises(WeightsError, match="not a safetensors index"):
        load_weights(model_dir, cfg, torch.float32, torch.device("cpu"))


def test_tensors_the_architecture_does_not_use_are_refused(tiny_llama: TinyOutput, tmp_path: Path) -> None:
    """An fp8 checkpoint's weight_scale tensors (its config's quantization_config taken away) were
    left unread and served wrong tokens. RoPE's cached tables (older checkpoints' inv_freq,
    ColossalAI's cos_cached / sin_cached) are not weights, and a bias the config does not declare is
    left unread, as transformers and vLLM leave it (a review: both were refused)."""
    model_dir, tensors = _copy(tiny_llama, tmp_path / "scaled")
    cfg = make_engine(tiny_llama).model_config
    rope = ("inv_freq", "cos_cached", "sin_cached")
    harmless = {f"model.layers.0.self_attn.rotary_emb.{name}": torch.ones(4) for name in rope}
    harmless["model.layers.1.self_attn.o_proj.bias"] = torch.zeros(cfg.hidden_size)
    save_file(tensors | harmless, model_dir / "model.safetensors")
    weights = load_weights(model_dir, cfg, torch.float32, torch.device("cpu"))
    assert weights.layers[1].o_bias is None
    scale = {"model.layers.0.self_attn.q_proj.weight_scale": torch.ones(())}
    save_file(tensors | harmless | scale, model_dir / "model.safetensors")
    unused = "1 tensors the llama architecture does not use, e.g. model.layers.0.self_attn.q_proj.weight_scale"
    with pytest.raises(WeightsError, match=unused):
        load_weights(model_dir, cfg, torch.float32, torch.device("cpu"))
    # Declared and missing: said why it is looked for (transformers fills zeros; vLLM refuses too)
    biased = dataclasses.replace(cfg, o_bias=True)
    save_file(tensors, model_dir / "model.safetensors")
    with pytest.raises(WeightsError, match="o_proj.bias' is missing .config.json's attention_bias=true"):
        load_weights(model_dir, biased, torch.float32, torch.device("cpu"))


def test_a_tied_model_whose_stored_lm_head_differs_reads_it_as_transformers(
    tiny_llama: TinyOutput, tmp_path: Path
) -> None:
    """transformers 5 does not tie embeddings and an lm_head.weight that differs (it says so) and
    reads the stored one; here it was dropped as vLLM drops it, logprobs 12 apart (a helper). One
    equal to the embeddings is the usual tied checkpoint, read once."""
    model_dir, tensors = _copy(tiny_llama, tmp_path / "tied", tie_word_embeddings=True)
    embed = tensors["model.embed_tokens.weight"]
    tensors["lm_head.weight"] = embed + 0.5 * torch.randn(embed.shape, generator=torch.Generator().manual_seed(3))
    save_file(tensors, model_dir / "model.safetensors")
    name = sorted(tiny_llama.adapters)[0]  # (the oracle is a PEFT model: one adapter, unused)
    tiny = TinyOutput(model=model_dir, adapters_dir=tiny_llama.adapters_dir, adapters={name: tiny_llama.adapters[name]})
    assert run_all(make_engine(tiny), {"r": (None, PROMPT)}, 8)["r"] == Oracle(tiny).generate(None, PROMPT, 8)
    tensors["lm_head.weight"] = embed.clone()
    save_file(tensors, model_dir / "model.safetensors")
    weights = load_weights(str(model_dir), make_engine(tiny).model_config, torch.float32, torch.device("cpu"))
    assert weights.lm_head is weights.embed
