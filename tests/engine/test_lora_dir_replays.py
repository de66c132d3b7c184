"""Public vLLM, SGLang and LoRAX reports about the directories LoRA adapters come in and what they
carry, of kinds ``test_lora_issue_replays`` and ``test_lora_format_replays`` do not replay: a
trainer's files beside the adapter's, whole embeddings of a resized vocabulary, a config selecting
no module the file has weights for, and the prefix cache shared by adapters and the base. Each
adapter is written by peft itself; served, it equals what transformers + peft computes; refused,
the reason names what peft would have done instead."""

from __future__ import annotations

import json
import shlex
import shutil
import warnings
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from dlora.model.adapters import AdapterError, inspect_adapter
from dlora.model.config import ModelConfig
from dlora.model.make_tiny import TinyOutput
from tests.engine.helpers import make_engine, run_all
from tests.engine.test_lora_issue_replays import batch_logits, close, engine
from tests.engine.test_peft_configs import ALL, PROMPT, peft_logits, write_peft_adapter

# Files each report's adapter directory held beside adapter_config.json and the weights (their
# contents made up: nothing reads them)
EXTRA_FILES = {
    # predibase/lorax #51: a fine-tuning service's output, loaded from a local directory
    "lorax-51": ["README.md", "finetune_args.json", "info.json", "trainer_log_history.jsonl", "train_output.json"],
    # predibase/lorax #155: a Hub repository's copy (its LFS attributes, the Trainer's arguments)
    "lorax-155": [".gitattributes", "README.md", "training_args.bin"],
    # sgl-project/sglang PR #17905: added_tokens.json copied from the base's tokenizer (ids < vocab)
    "sglang-17905": ["added_tokens.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"],
    # vllm-project/vllm #2816: new_embeddings.safetensors, vLLM's extra-vocabulary file (peft reads none)
    "vllm-2816": ["new_embeddings.safetensors"],
    # vllm-project/vllm #8315: the base's config saved beside the adapter by the training script
    "vllm-8315": ["pretrain_model_config.json", "optimizer.pt", "scheduler.pt", "rng_state.pth", "trainer_state.json"],
}


def test_adapter_directories_holding_other_files_are_served_as_peft_serves_them(
    tiny_llama: TinyOutput, tmp_path: Path
) -> None:
    """predibase/lorax #51 and #155, sgl-project/sglang PR #17905, vllm-project/vllm #2816 and
    #8315: adapter directories as trainers and the Hub leave them, other files beside the adapter's
    (a tokenizer with added_tokens.json, vLLM's new_embeddings.safetensors, a pickled Trainer
    state; every report's in one directory). peft reads adapter_config.json and the weights alone;
    so does dlora (no pickle beside them is opened), and it is served as peft serves it."""
    path = write_peft_adapter(tiny_llama, tmp_path / "a", r=8, lora_alpha=16, target_modules=ALL)
    for name in {name for files in EXTRA_FILES.values() for name in files}:
        pickled = name.endswith((".bin", ".pt", ".pth"))
        (path / name).write_bytes(b"\x80\x04not a pickle to open" if pickled else b"{}")
    e = engine(tiny_llama)
    e.register_adapter("a", path)
    assert close(batch_logits(e, {"r": "a"})["r"], peft_logits(tiny_llama, path))


@pytest.mark.parametrize("key", ["base_model.model.model.embed_tokens.weight", "base_model.model.lm_head.weight"])
def test_whole_embeddings_of_a_resized_vocabulary_are_refused_naming_them(
    tiny_llama: TinyOutput, tmp_path: Path, key: str
) -> None:
    """vllm-project/vllm #4520 ("my adapter safetensors file contains embeddings, as they were
    updated") and #2816 (embed_tokens and lm_head in the adapter's weights): the whole matrices of a
    vocabulary grown by a few added tokens. peft's load fails on their shape ("size mismatch");
    refused naming the tensor and why, as the gateway and the worker both read it."""
    path = write_peft_adapter(tiny_llama, tmp_path / "a", r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    cfg = ModelConfig.from_dir(tiny_llama.model)
    weights = path / "adapter_model.safetensors"
    save_file({**load_file(weights), key: torch.zeros(cfg.vocab_size + 6, cfg.hidden_size)}, weights)
    base = AutoModelForCausalLM.from_pretrained(tiny_llama.model, dtype=torch.float32)
    with pytest.raises(RuntimeError, match="size mismatch"):
        PeftModel.from_pretrained(base, path)
    with pytest.raises(AdapterError, match=rf"tensor '{key}' is for embed_tokens or lm_head .*resized vocabulary"):
        inspect_adapter("a", path, cfg)


def test_an_adapter_whose_config_selects_none_of_its_weights_is_refused_not_served_as_the_base(
    tiny_llama: TinyOutput, tmp_path: Path
) -> None:
    """vllm-project/vllm #55193 (an adapter targeting no module LoRA is served on returned the base
    model's output byte for byte, the request answered as the adapter's): weights on q_proj and
    v_proj under a config whose target_modules name down_proj. peft puts a zero LoRA on down_proj,
    leaves the file's weights unread and serves the base model under the adapter's name; refused
    here, saying that none of its weights is on a selected module."""
    path = write_peft_adapter(tiny_llama, tmp_path / "a", r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    config = json.loads((path / "adapter_config.json").read_text())
    (path / "adapter_config.json").write_text(json.dumps(config | {"target_modules": ["down_proj"]}))
    base = AutoModelForCausalLM.from_pretrained(tiny_llama.model, dtype=torch.float32)
    with torch.inference_mode():
        plain = base(input_ids=torch.tensor([PROMPT])).logits[0, -1]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert close(peft_logits(tiny_llama, path), plain)  # peft: the base model's output
    with pytest.raises(AdapterError, match="none of its weights is on a module its target_modules"):
        inspect_adapter("a", path, ModelConfig.from_dir(tiny_llama.model))


def test_a_prefix_cached_under_one_adapter_is_hit_by_no_other_adapter_nor_the_base(tiny_llama: TinyOutput) -> None:
    """vllm-project/vllm #3264 (automatic prefix caching hashed blocks by their tokens alone, so a
    prompt cached under one LoRA was hit by another, or the base, which read the first adapter's
    KV): one prompt under an adapter, then under another and the base, neither hitting the first's
    blocks and each equal to peft's logits; the first adapter again hits its own."""
    e = make_engine(tiny_llama, block_size=4)
    prompt, first, second = PROMPT, *sorted(tiny_llama.adapters)[:2]  # (its first 4 tokens: a whole block)
    base = AutoModelForCausalLM.from_pretrained(tiny_llama.model, dtype=torch.float32)
    with torch.inference_mode():
        want = {None: base(input_ids=torch.tensor([prompt])).logits[0, -1]}
    for name in (first, second):
        want[name] = peft_logits(tiny_llama, tiny_llama.adapters[name])

    def logits(rid: str, adapter: str | None) -> torch.Tensor:
        run_all(e, {rid: (adapter, prompt)}, 1)  # (its prefill the only step: its logits are the last)
        return e.last_logits[rid]

    assert close(logits("a", first), want[first])
    hits = e.stats.prefix_cache_hits
    for rid, adapter in (("b", second), ("base", None)):
        assert close(logits(rid, adapter), want[adapter]), adapter
        assert e.stats.prefix_cache_hits == hits, adapter
    assert close(logits("again", first), want[first])
    assert e.stats.prefix_cache_hits > hits


def test_an_adapter_of_another_base_is_judged_by_its_shapes_not_its_base_models_name(
    tiny_llama: TinyOutput, tmp_path: Path
) -> None:
    """vllm-project/vllm #12106 (an adapter trained on Qwen2-VL-7B served on the 72B "gives valid
    response without error"): peft compares no names, and loads an adapter whose config names
    another base (``base_model_name_or_path``) where its shapes fit, as served here, equal to
    peft's; one whose shapes are another model's peft fails to load ("size mismatch"), and dlora
    refuses naming the module and both shapes, never serving it."""
    path = write_peft_adapter(tiny_llama, tmp_path / "named", r=8, lora_alpha=16, target_modules=ALL)
    config = json.loads((path / "adapter_config.json").read_text())
    (path / "adapter_config.json").write_text(json.dumps(config | {"base_model_name_or_path": "Qwen/Qwen2-VL-7B"}))
    e = engine(tiny_llama)
    e.register_adapter("named", path)
    assert close(batch_logits(e, {"r": "named"})["r"], peft_logits(tiny_llama, path))
    wider = shutil.copytree(path, tmp_path / "wider")
    weights = wider / "adapter_model.safetensors"
    save_file({k: torch.cat([v, v], 1) if ".lora_A." in k else v for k, v in load_file(weights).items()}, weights)
    base = AutoModelForCausalLM.from_pretrained(tiny_llama.model, dtype=torch.float32)
    with pytest.raises(RuntimeError, match="size mismatch"):
        PeftModel.from_pretrained(base, wider)
    with pytest.raises(
        AdapterError, match=r"layer 0 down_proj: lora_A \(8, 352\) / lora_B \(64, 8\) do not fit the base \(176 -> 64\)"
    ):
        inspect_adapter("wider", wider, ModelConfig.from_dir(tiny_llama.model))


def test_a_pickled_pt_adapter_is_refused_with_how_to_convert_it(tiny_llama: TinyOutput, tmp_path: Path) -> None:
    """vLLM reads ``adapter_model.pt`` as it reads PEFT's ``adapter_model.bin`` (torch.load of the
    state dict); one holding only the .pt was told that adapter_model.safetensors is not found, not
    that its weights are a pickle and how to convert them, as a .bin is told: now it is, and the
    command given makes it load, the same adapter."""
    path = shutil.copytree(tiny_llama.adapters["lora-0"], tmp_path / "pt")
    weights = path / "adapter_model.safetensors"
    torch.save(load_file(weights), path / "adapter_model.pt")
    weights.unlink()
    cfg = ModelConfig.from_dir(tiny_llama.model)
    with pytest.raises(AdapterError, match=r"only .*adapter_model\.pt \(a pickle\)") as refused:
        inspect_adapter("pt", path, cfg)
    _, _, code = shlex.split(str(refused.value).split("where torch is installed: ", 1)[1])
    exec(code, {})  # what `python3 -c` runs
    assert (
        inspect_adapter("pt", path, cfg).modules
        == inspect_adapter("lora-0", tiny_llama.adapters["lora-0"], cfg).modules
    )
