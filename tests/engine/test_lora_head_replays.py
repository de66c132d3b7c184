"""Weights of modules outside the layers' projections in an adapter file, as peft itself treats them
and as vLLM and its users report them: a sequence-classification head's own LoRA (a module the
causal LM lacks) is served as peft serves it, plain LoRA; a whole weight of a module the base has
(the final norm) peft loads over the base's, which no adapter may do here: refused naming it."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from dlora.model.adapters import AdapterError, inspect_adapter
from dlora.model.config import ModelConfig
from dlora.model.make_tiny import TinyOutput
from tests.engine.test_lora_issue_replays import batch_logits, close, engine
from tests.engine.test_peft_configs import peft_logits, write_peft_adapter
from tests.engine.test_peft_lenient import Tensors, _variant


def _head_lora(name: str) -> Tensors:
    """A LoRA pair on a 2-label head (64 -> 2 on the tiny Llama; rank 4) named ``name``."""
    return {name.format(x="A"): torch.full((4, 64), 0.3), name.format(x="B"): torch.full((2, 4), 0.3)}


def test_a_classification_heads_lora_is_left_unloaded_as_peft_leaves_it(tiny_llama: TinyOutput, tmp_path: Path) -> None:
    """vllm-project/vllm PR #53555 and #7441 (sequence-classification adapters: LoRA on the layers and a
    ``score`` head; vLLM refuses the head's tensors, "expected target modules ... but received
    ['score']"): served on the causal LM, peft makes no LoRA layer on a module the model lacks and
    leaves ``score.lora_A`` / ``lora_B`` unloaded without a word, serving the layers' LoRA (logits
    equal to the plain adapter's); so does the engine, whatever adapter name the head's keys carry,
    in one batch (h7's brief: refused, "not a LoRA weight of q_proj ...")."""
    source = write_peft_adapter(tiny_llama, tmp_path / "source", r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    plain, e, paths = peft_logits(tiny_llama, source), engine(tiny_llama), {}
    heads = {
        "score": "base_model.model.score.lora_{x}.weight",
        "named": "base_model.model.score.lora_{x}.default.weight",
        "bare": "score.lora_{x}.weight",  # (transformers' naming, without the prefix)
    }
    for name, key in heads.items():
        paths[name] = _variant(source, tmp_path / name, {}, lambda t, key=key: {**t, **_head_lora(key)})
        e.register_adapter(name, paths[name])
    got = batch_logits(e, {name: name for name in paths})
    for name in ("score", "named"):
        assert close(peft_logits(tiny_llama, paths[name]), plain), name  # peft: the plain adapter
    for name in paths:
        assert close(got[name], plain), name
    # The head's LoRA alone: peft loads nothing, the base model under the adapter's name (vLLM
    # #55193's kind): refused, as before
    alone = _variant(source, tmp_path / "alone", {}, lambda t: _head_lora(heads["score"]))
    with pytest.raises(AdapterError, match="holds no LoRA weights"):
        inspect_adapter("alone", alone, ModelConfig.from_dir(tiny_llama.model))


def test_a_whole_final_norm_peft_loads_over_the_base_is_refused_naming_it(
    tiny_llama: TinyOutput, tmp_path: Path
) -> None:
    """h7's brief: ``base_model.model.model.norm.weight`` in an adapter file. peft loads it over the
    base model's final norm (``load_state_dict(strict=False)`` finds the key), saying nothing, so
    its output is not the plain adapter's; vLLM refuses it ("is unsupported LoRA weight"). The
    base's weights are every adapter's here: refused, naming the tensor and why (it was refused as
    "not a LoRA weight", which told nothing of peft loading it)."""
    source = write_peft_adapter(tiny_llama, tmp_path / "source", r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    base = AutoModelForCausalLM.from_pretrained(tiny_llama.model, dtype=torch.float32)
    norm = base.model.norm.weight.detach().clone()
    key = "base_model.model.model.norm.weight"
    path = _variant(source, tmp_path / "norm", {}, lambda t: {**t, key: norm * 2})
    assert not close(peft_logits(tiny_llama, path), peft_logits(tiny_llama, source))  # peft loads it
    with pytest.raises(AdapterError, match=rf"tensor '{key}' is a whole weight of a module of the base model"):
        inspect_adapter("norm", path, ModelConfig.from_dir(tiny_llama.model))
