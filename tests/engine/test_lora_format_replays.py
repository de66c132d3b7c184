"""More public vLLM, SGLang and LoRAX reports about LoRA adapters, of kinds not replayed in
``test_lora_issue_replays``: how target_modules is written, the tensors' key names, and the config
fields a real report's adapter carries. Each adapter is written by peft itself and served as
transformers + peft computes it (logits equal, in one unmerged batch), or refused naming the
tensor where peft would load none of it and serve the base model unsaid."""

from __future__ import annotations

import json
import shutil
import warnings
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from dlora.model.adapters import AdapterError, inspect_adapter
from dlora.model.config import ModelConfig
from dlora.model.make_tiny import TinyOutput
from tests.engine.test_lora_issue_replays import batch_logits, close, engine
from tests.engine.test_peft_configs import ALL, PROMPT, peft_logits, write_peft_adapter


def _renamed(source: Path, out: Path, rename: Callable[[str], str]) -> Path:
    """A copy of ``source`` whose weights' keys are ``rename``d."""
    path = shutil.copytree(source, out)
    weights = path / "adapter_model.safetensors"
    save_file({rename(k): v for k, v in load_file(weights).items()}, weights)
    return path


@torch.inference_mode()
def _base_logits(tiny: TinyOutput) -> torch.Tensor:
    base = AutoModelForCausalLM.from_pretrained(tiny.model, dtype=torch.float32)
    return base(input_ids=torch.tensor([PROMPT])).logits[0, -1].float()


def test_target_modules_written_with_layer_prefixes(tiny_llama: TinyOutput, tmp_path: Path) -> None:
    """sgl-project/sglang #12627 (target_modules naming modules with their layer prefix,
    ``model.layers.0.self_attn.q_proj``, raised a TypeError as the adapter loaded): PEFT reads a
    list's entry as a full name or a dotted suffix, so a full name, a layer-prefixed suffix and a
    plain name side by side select what PEFT selects, and the adapter is served as peft serves it."""
    targets = ["model.layers.0.self_attn.q_proj", "layers.1.mlp.down_proj", "v_proj"]
    path = write_peft_adapter(tiny_llama, tmp_path / "a", r=8, lora_alpha=16, target_modules=targets)
    spec = inspect_adapter("a", path, ModelConfig.from_dir(tiny_llama.model))
    assert set(spec.modules) == {(0, "q_proj"), (1, "down_proj"), (0, "v_proj"), (1, "v_proj")}
    e = engine(tiny_llama)
    e.register_adapter("a", path)
    assert close(batch_logits(e, {"r": "a"})["r"], peft_logits(tiny_llama, path))


def test_all_linear_on_a_base_with_tied_embeddings(tiny_qwen: TinyOutput, tmp_path: Path) -> None:
    """sgl-project/sglang PR #18634 (a PEFT adapter whose target_modules is the string
    "all-linear" crashed SGLang's loading, and LoRA on a tied lm_head of Qwen2.5 was silently
    lost): on the Qwen2-shaped base, whose lm_head is its embeddings, "all-linear" is every
    projection of every layer and not the output head (PEFT excludes it), served as peft serves
    it, the q/k/v biases of the base kept."""
    path = write_peft_adapter(tiny_qwen, tmp_path / "a", r=4, lora_alpha=8, target_modules="all-linear")
    spec = inspect_adapter("a", path, ModelConfig.from_dir(tiny_qwen.model))
    assert {t for _, t in spec.modules} == set(ALL)
    e = engine(tiny_qwen)
    e.register_adapter("a", path)
    got, want = batch_logits(e, {"r": "a"})["r"], peft_logits(tiny_qwen, path)
    assert close(got, want) and not close(want, _base_logits(tiny_qwen))


def test_keys_without_the_peft_prefix_are_read_as_transformers_reads_them(
    tiny_llama: TinyOutput, tmp_path: Path
) -> None:
    """vllm-project/vllm PR #17196 and PR #17793 (LoRA weights saved without the
    ``base_model.model.`` prefix, as transformers names the modules, were sliced to wrong module
    names, and the name mapping was skipped for them): transformers' ``load_adapter`` reads such
    keys into the base's modules, and so are they served, beside the prefixed file in one batch,
    each equal to what transformers computes (peft's PeftModel leaves them unloaded)."""
    source = write_peft_adapter(tiny_llama, tmp_path / "source", r=8, lora_alpha=16, target_modules=ALL)
    paths = {
        "prefixed": source,
        "model.": _renamed(source, tmp_path / "bare", lambda k: k.removeprefix("base_model.model.")),
        "layers.": _renamed(source, tmp_path / "layers", lambda k: k.removeprefix("base_model.model.model.")),
    }
    e = engine(tiny_llama)
    for name, path in paths.items():
        e.register_adapter(name, path)
    got = batch_logits(e, {name: name for name in paths})
    for name, path in paths.items():
        base = AutoModelForCausalLM.from_pretrained(tiny_llama.model, dtype=torch.float32)
        base.load_adapter(str(path))
        with torch.inference_mode():
            want = base(input_ids=torch.tensor([PROMPT])).logits[0, -1].float()
        assert close(got[name], want), name
    assert close(got["prefixed"], peft_logits(tiny_llama, source))


@pytest.mark.parametrize(
    ("report", "rename"),
    [
        # vllm-project/vllm PR #42668: extracted adapters' keys with the base weight's suffix
        # before the LoRA one (q_proj.weight.lora_A.weight)
        ("weight suffix", lambda k: k.replace(".lora_", ".weight.lora_")),
        # predibase/lorax #546: mistral-finetune's consolidated names (layers.N.attention.wq)
        (
            "mistral-finetune",
            lambda k: (
                k.removeprefix("base_model.model.model.")
                .replace("self_attn.q_proj", "attention.wq")
                .replace("self_attn.v_proj", "attention.wv")
            ),
        ),
    ],
)
def test_keys_peft_loads_nothing_from_are_refused_naming_the_tensor(
    tiny_llama: TinyOutput, tmp_path: Path, report: str, rename: Callable[[str], str]
) -> None:
    """vllm-project/vllm PR #42668 (``q_proj.weight.lora_A.weight`` keys) and predibase/lorax
    #546 (mistral-finetune's ``layers.N.attention.wq`` names): peft's PeftModel loads none of
    these tensors and serves the base model with a warning of missing keys; here the adapter is
    refused naming the first such tensor, never served as the base under the adapter's name."""
    source = write_peft_adapter(tiny_llama, tmp_path / "source", r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    path = _renamed(source, tmp_path / "renamed", rename)
    base = AutoModelForCausalLM.from_pretrained(tiny_llama.model, dtype=torch.float32)
    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        peft = PeftModel.from_pretrained(base, path)
    assert any("missing adapter keys" in str(w.message) for w in said), report
    with torch.inference_mode():
        assert close(peft(input_ids=torch.tensor([PROMPT])).logits[0, -1], _base_logits(tiny_llama))
    with pytest.raises(AdapterError, match=r"tensor '.*' is not a LoRA weight of q_proj"):
        inspect_adapter("a", path, ModelConfig.from_dir(tiny_llama.model))


def test_a_reports_config_with_dropout_and_fields_of_no_effect(tiny_llama: TinyOutput, tmp_path: Path) -> None:
    """vllm-project/vllm #10446 (a DeepSeek adapter_config.json posted in the report: lora_dropout
    0.01, loftq_config {}, megatron_core "megatron.core", layer_replication null, inference_mode
    true, fan_in_fan_out false, use_dora false, rank_pattern {} ...): every field of that config
    but its target names, on the tiny Llama's projections, is served as peft serves it in eval
    (dropout off at inference), not refused for fields it does not need."""
    path = write_peft_adapter(tiny_llama, tmp_path / "a", r=8, lora_alpha=16, lora_dropout=0.01, target_modules=ALL)
    config = json.loads((path / "adapter_config.json").read_text())
    reported = {
        "alpha_pattern": {},
        "auto_mapping": None,
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "init_lora_weights": True,
        "layer_replication": None,
        "layers_pattern": None,
        "layers_to_transform": None,
        "loftq_config": {},
        "megatron_config": None,
        "megatron_core": "megatron.core",
        "modules_to_save": None,
        "peft_type": "LORA",
        "rank_pattern": {},
        "revision": None,
        "use_dora": False,
        "use_rslora": False,
    }
    (path / "adapter_config.json").write_text(json.dumps(config | reported))
    e = engine(tiny_llama)
    e.register_adapter("a", path)
    assert close(batch_logits(e, {"r": "a"})["r"], peft_logits(tiny_llama, path))
