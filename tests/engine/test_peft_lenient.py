"""Where dlora was stricter than PEFT with no difference in the output: adapters peft itself loads
and serves as plain LoRA are served here, logits equal to peft's in one unmerged batch; where
peft's load fails, the adapter is refused naming why."""

from __future__ import annotations

import json
import shutil
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
from tests.engine.test_peft_configs import peft_logits, write_peft_adapter

Tensors = dict[str, torch.Tensor]


def _proj(layer: int, target: str) -> str:
    return f"base_model.model.model.layers.{layer}.self_attn.{target}"


def _pair(name: str) -> Tensors:
    """lora_A / lora_B of a k_proj (64 -> 32 in the tiny Llama; rank 4) named by ``name``."""
    return {name.format(x="A"): torch.full((4, 64), 0.3), name.format(x="B"): torch.full((32, 4), 0.3)}


# name -> (adapter_config.json fields over the source's, the weights file's edit); each variant
# holds several cases, as peft's load is the test's cost
SERVED: dict[str, tuple[dict, Callable[[Tensors], Tensors]]] = {
    # modules without weights: PEFT wraps them (ModulesToSaveWrapper) and saves and loads nothing;
    # a sequence-classification head the causal LM lacks: load_state_dict(strict=False) leaves it
    "modules_to_save": (
        {"modules_to_save": ["rotary_emb", "mlp.act_fn", "score"]},
        lambda t: {**t, "base_model.model.score.weight": torch.ones(2, 64)},
    ),
    # LoRA parts of projections outside target_modules: PEFT makes no LoRA layer there and reads
    # none of them, whatever adapter name or block they carry, however many copies, A without B; and the
    # head's weight as PEFT names it under its wrapper
    "untargeted": (
        {"modules_to_save": ["score"]},
        lambda t: {
            **t,
            **_pair(_proj(0, "k_proj") + ".lora_{x}.other.weight"),
            **_pair(_proj(1, "k_proj") + ".lora_{x}.weight"),
            _proj(1, "k_proj") + ".lora_A.default.weight": torch.zeros(4, 64),
            _proj(1, "o_proj") + ".lora_A.weight": torch.ones(4, 64),
            "base_model.model.model.layers.0.mlp.k_proj.lora_A.weight": torch.ones(4, 64),  # in the wrong block
            "base_model.model.score.modules_to_save.default.weight": torch.ones(2, 64),
        },
    ),
}


def _variant(source: Path, out: Path, fields: dict, edit: Callable[[Tensors], Tensors] | None = None) -> Path:
    path = shutil.copytree(source, out)
    config = json.loads((path / "adapter_config.json").read_text())
    (path / "adapter_config.json").write_text(json.dumps(config | fields))
    if edit is not None:
        weights = path / "adapter_model.safetensors"
        save_file(edit(load_file(weights)), weights)
    return path


def test_adapters_peft_serves_as_plain_lora_are_served_as_peft_serves_them(
    tiny_llama: TinyOutput, tmp_path: Path
) -> None:
    """h8's brief: modules_to_save naming a module without weights (rotary_emb), LoRA parts of a
    projection not in target_modules under another adapter's name or twice, and a head's
    ``score.weight`` for a module the base lacks were refused; peft serves each as plain LoRA
    (its logits equal the plain adapter's), and so does the engine, all in one batch. (Each case
    was refused alone before.)"""
    source = write_peft_adapter(tiny_llama, tmp_path / "source", r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    plain, e, paths = peft_logits(tiny_llama, source), engine(tiny_llama), {}
    for i, (name, (fields, edit)) in enumerate(SERVED.items()):
        paths[name] = _variant(source, tmp_path / str(i), fields, edit)
        e.register_adapter(name, paths[name])
    got = batch_logits(e, {name: name for name in paths})
    for name, path in paths.items():
        want = peft_logits(tiny_llama, path)
        assert close(want, plain), name  # peft serves it as the plain adapter
        assert close(got[name], want), name


def test_modules_to_save_peft_cannot_wrap_is_refused_naming_it(tiny_llama: TinyOutput, tmp_path: Path) -> None:
    """A LoRA layer's lora_dropout (a ModuleDict): peft's load fails ("modules_to_save cannot be
    applied to modules of type ModuleDict"); refused naming the field, not served."""
    path = _variant(tiny_llama.adapters["lora-0"], tmp_path / "a", {"modules_to_save": ["lora_dropout"]})
    base = AutoModelForCausalLM.from_pretrained(tiny_llama.model, dtype=torch.float32)
    with pytest.raises(TypeError, match="modules_to_save cannot be applied"):
        PeftModel.from_pretrained(base, path)
    with pytest.raises(AdapterError, match="modules_to_save 'lora_dropout'"):
        inspect_adapter("a", path, ModelConfig.from_dir(tiny_llama.model))
