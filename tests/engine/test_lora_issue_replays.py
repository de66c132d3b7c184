"""Public vLLM, SGLang and LoRAX bug reports about LoRA adapters, replayed against the engine with
adapters written by peft itself: each is served as transformers + peft computes it, or refused
with the reason named (never served as something else)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from dlora.common.messages import SamplingParams
from dlora.model.adapters import AdapterError, inspect_adapter
from dlora.model.config import ModelConfig
from dlora.model.make_tiny import TinyOutput
from dlora.services.worker.engine import EngineConfig, LLMEngine
from dlora.services.worker.policy import PolicyConfig
from tests.engine.helpers import kv_bytes_enough
from tests.engine.test_peft_configs import ALL, PROMPT, peft_logits, write_peft_adapter

OTHER_PROMPT = [7, 8, 9, 250, 31]


def engine(tiny: TinyOutput) -> LLMEngine:
    """Unmerged steps: every request of a step in one batch, whatever its adapter."""
    config = EngineConfig(
        policy=PolicyConfig(name="unmerged-only"), kv_cache_bytes=kv_bytes_enough(tiny), dtype="float32"
    )
    return LLMEngine(str(tiny.model), config)


def batch_logits(e: LLMEngine, adapters: dict[str, str]) -> dict[str, torch.Tensor]:
    """The prefill logits of ``PROMPT`` for each request id -> adapter, all in one step."""
    for rid, adapter in adapters.items():
        e.add_request(rid, prompt_token_ids=PROMPT, params=SamplingParams(max_tokens=1), adapter=adapter)
    e.step()
    assert set(e.last_logits) == set(adapters)
    return dict(e.last_logits)


def close(got: torch.Tensor, want: torch.Tensor) -> bool:
    return torch.allclose(got, want, atol=1e-4, rtol=1e-4)


def test_half_precision_adapter_files_match_peft(tiny_llama: TinyOutput, tmp_path: Path) -> None:
    """vllm-project/vllm-metal PR #690 (a BF16 PEFT adapter failed to load: its loader read the
    tensors through NumPy, which has no bfloat16) and turboderp/exllama #170 (BF16 QLoRA adapters
    refused): weights saved in bf16 and fp16 are read and served as peft serves them, in one batch."""
    e, paths = engine(tiny_llama), {}
    for dtype in (torch.bfloat16, torch.float16):
        paths[str(dtype)] = path = write_peft_adapter(
            tiny_llama, tmp_path / str(dtype), r=8, lora_alpha=16, target_modules=ALL
        )
        weights = path / "adapter_model.safetensors"
        save_file({k: v.to(dtype) for k, v in load_file(weights).items()}, weights)
        e.register_adapter(str(dtype), path)
    got = batch_logits(e, {name: name for name in paths})
    for name, path in paths.items():
        assert close(got[name], peft_logits(tiny_llama, path)), name


def test_rslora_scale_follows_rank_pattern_and_alpha_pattern(tiny_llama: TinyOutput, tmp_path: Path) -> None:
    """sgl-project/sglang #40835, vllm-project/vllm #10798 (PR #6909) and predibase/lorax PR #299:
    ``use_rslora`` ignored, each module's delta sqrt(r) times too weak. The scale is
    lora_alpha / sqrt(r) with each module's own r and alpha from rank_pattern and alpha_pattern, as
    peft's update_layer computes it."""
    patterns = {"rank_pattern": {"v_proj": 4, r"layers\.1\.mlp\.up_proj": 2}, "alpha_pattern": {"down_proj": 32}}
    path = write_peft_adapter(
        tiny_llama, tmp_path / "rs", r=16, lora_alpha=8, target_modules=ALL, use_rslora=True, **patterns
    )
    e = engine(tiny_llama)
    e.register_adapter("rs", path)
    assert close(batch_logits(e, {"r": "rs"})["r"], peft_logits(tiny_llama, path))


def test_adapters_of_disjoint_targets_and_ranks_in_one_batch(tiny_llama: TinyOutput, tmp_path: Path) -> None:
    """vllm-project/vllm #55193 (an adapter on MLP modules only, served under a target filter of
    attention modules: accepted and applied to nothing, the base model's output) and
    sgl-project/sglang #7808 (an adapter loaded at runtime of a higher rank than those loaded before
    it, into buffers sized for them): an attention-only rank-4 adapter served first, then an
    MLP-only rank-64 one registered, both in one batch beside the base, each as peft serves it."""
    attn = write_peft_adapter(tiny_llama, tmp_path / "attn", r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    mlp = write_peft_adapter(
        tiny_llama, tmp_path / "mlp", seed=1, r=64, lora_alpha=16, target_modules=["gate_proj", "up_proj", "down_proj"]
    )
    e = engine(tiny_llama)
    e.register_adapter("attn", attn)
    e.add_request("warm", prompt_token_ids=OTHER_PROMPT, params=SamplingParams(max_tokens=2), adapter="attn")
    while e.has_unfinished():
        e.step()
    e.register_adapter("mlp", mlp)
    got = batch_logits(e, {"a": "attn", "m": "mlp", "b": None})
    assert close(got["a"], peft_logits(tiny_llama, attn))
    assert close(got["m"], peft_logits(tiny_llama, mlp))
    assert not close(got["m"], got["b"])  # the MLP adapter applied, not the base's output


def test_fields_that_save_no_tensor_here_are_plain_lora(tiny_llama: TinyOutput, tmp_path: Path) -> None:
    """vllm-project/vllm PR #5733's review (a check refusing adapters by their bias setting alone
    "is causing blanket lora failures") and PR #14978 (modules_to_save refused by the field alone):
    on a Llama, which has no biases, bias "all" or "lora_only" saves nothing but the LoRA weights,
    and a modules_to_save name the model lacks (a classification template's "score") saves nothing;
    peft serves such adapters as plain LoRA, and so are they served here (they were refused)."""
    cases = {"all": {"bias": "all"}, "lora_only": {"bias": "lora_only"}, "score": {"modules_to_save": ["score"]}}
    e, paths = engine(tiny_llama), {}
    for seed, (name, fields) in enumerate(cases.items()):
        paths[name] = path = write_peft_adapter(
            tiny_llama, tmp_path / name, seed=seed, r=8, lora_alpha=16, target_modules=ALL, **fields
        )
        assert all("lora_" in key for key in load_file(path / "adapter_model.safetensors"))
        e.register_adapter(name, path)
    got = batch_logits(e, {name: name for name in cases})
    for name, path in paths.items():
        assert close(got[name], peft_logits(tiny_llama, path)), name


@pytest.mark.parametrize(
    ("fields", "named"),
    [
        ({"bias": "all"}, "is a bias"),
        ({"bias": "lora_only"}, "is a bias"),
        ({"modules_to_save": ["lm_head"]}, "modules_to_save"),
        ({"modules_to_save": ["input_layernorm"]}, "modules_to_save"),
        ({"modules_to_save": ["score", "norm"]}, "modules_to_save 'norm'"),  # PEFT: a name ending in it
        ({"use_dora": True}, "DoRA"),
        ({"target_modules": ["q_proj", "embed_tokens"]}, "embed_tokens or lm_head"),
    ],
)
def test_tensors_peft_would_load_over_the_base_are_refused_by_name(
    tiny_qwen: TinyOutput, tmp_path: Path, fields: dict, named: str
) -> None:
    """vllm-project/vllm #9280 (modules_to_save embed_tokens and lm_head), vLLM's "does not yet
    support DoRA" and sgl-project/sglang PR #8222 (LoRA on embed_tokens): what PEFT would load over
    the base model (the Qwen2 base's q/k/v biases under bias "all" or "lora_only", whole modules,
    DoRA magnitudes, embedding LoRA) is refused naming it, never served as plain LoRA."""
    fields = {"target_modules": ["q_proj", "o_proj"]} | fields
    path = write_peft_adapter(tiny_qwen, tmp_path / "a", r=4, lora_alpha=8, **fields)
    with pytest.raises(AdapterError, match=named):
        inspect_adapter("a", path, ModelConfig.from_dir(tiny_qwen.model))


def test_one_adapters_files_under_two_names_and_without_peft_type(tiny_llama: TinyOutput, tmp_path: Path) -> None:
    """sgl-project/sglang #13771 (the same adapter loaded twice under different names; SGLang
    warns) and vllm-project/vllm PR #53461 (an adapter_config.json without ``peft_type`` raised a
    KeyError: a 500, and the other resolvers never tried): both names serve the adapter, and a copy
    whose config lacks peft_type is read as LoRA (the only type served, every field that changes
    the output there), side by side in one batch, each equal to peft's output."""
    path = tiny_llama.adapters["lora-2"]
    untyped = shutil.copytree(path, tmp_path / "untyped")
    config = json.loads((untyped / "adapter_config.json").read_text())
    assert config.pop("peft_type") == "LORA"
    (untyped / "adapter_config.json").write_text(json.dumps(config))
    e = engine(tiny_llama)
    for name, files in (("first", path), ("second", path), ("untyped", untyped)):
        e.register_adapter(name, files)
    got = batch_logits(e, {"1": "first", "2": "second", "u": "untyped"})
    want = peft_logits(tiny_llama, path)
    assert all(close(logits, want) for logits in got.values())


def test_modules_to_save_names_are_matched_as_peft_matches_them(tiny_llama: TinyOutput, tmp_path: Path) -> None:
    """PEFT wraps every module whose name ends in one of modules_to_save (``_set_trainable``): ""
    ends them all and "lora_A" the LoRA layers' own parts, so both are refused; a config of
    50,000 names the base lacks (hostile: a megabyte) is plain LoRA, each name looked up once."""
    cfg = ModelConfig.from_dir(tiny_llama.model)
    path = shutil.copytree(tiny_llama.adapters["lora-0"], tmp_path / "a")
    config = json.loads((path / "adapter_config.json").read_text())
    for names, refused in (([""], True), (["lora_A"], True), ([f"head{i}" for i in range(50_000)], False)):
        (path / "adapter_config.json").write_text(json.dumps(config | {"modules_to_save": names}))
        if refused:
            with pytest.raises(AdapterError, match="modules_to_save"):
                inspect_adapter("a", path, cfg)
        else:
            assert inspect_adapter("a", path, cfg).modules


def test_modules_to_save_names_keep_lora_off_the_modules_their_regex_matches(
    tiny_llama: TinyOutput, tmp_path: Path
) -> None:
    r"""PEFT's ``check_target_module_exists`` puts no LoRA on a module that a modules_to_save name
    matches as the regex ``(^|.*\.)NAME($|\..*)``, so the file's weights there go unread, though
    ``_set_trainable`` (a name's literal end) wraps nothing: a '.' standing for the '_' of q_proj,
    and an alternation, are served as peft serves them; a name its ``re`` cannot compile fails
    PEFT's load, and is refused naming it."""
    source = write_peft_adapter(tiny_llama, tmp_path / "source", r=8, lora_alpha=16, target_modules=ALL)
    config = json.loads((source / "adapter_config.json").read_text())
    plain, e, paths = peft_logits(tiny_llama, source), engine(tiny_llama), {}
    for name, saved in {"dot": ["layers.1.self_attn.q.proj"], "alternation": ["v_proj|score"]}.items():
        paths[name] = path = shutil.copytree(source, tmp_path / name)
        (path / "adapter_config.json").write_text(json.dumps(config | {"modules_to_save": saved}))
        e.register_adapter(name, path)
    got = batch_logits(e, {name: name for name in paths})
    for name, path in paths.items():
        want = peft_logits(tiny_llama, path)
        assert close(got[name], want) and not close(want, plain), name
    (path / "adapter_config.json").write_text(json.dumps(config | {"modules_to_save": ["score("]}))
    with pytest.raises(AdapterError, match=r"modules_to_save name 'score\(' is not a valid regex"):
        inspect_adapter("bad", path, ModelConfig.from_dir(tiny_llama.model))


def test_every_module_of_the_peft_model_named_in_modules_to_save_is_refused(
    tiny_llama: TinyOutput, tmp_path: Path
) -> None:
    """Each module of the model PEFT builds (LoRA on every projection), named in modules_to_save:
    PEFT wraps it whole over the base's, or fails to load (a LoRA layer's lora_dropout.default,
    lora_embedding_A / _B and lora_magnitude_vector, which dlora served); refused naming it. A
    module without weights outside the LoRA layers (rotary_emb, act_fn) PEFT wraps and loads
    nothing into: plain LoRA, served (``test_peft_lenient``)."""
    base = AutoModelForCausalLM.from_pretrained(tiny_llama.model, dtype=torch.float32)
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=ALL)).base_model.model
    cfg, path = ModelConfig.from_dir(tiny_llama.model), shutil.copytree(tiny_llama.adapters["lora-0"], tmp_path / "a")
    config = json.loads((path / "adapter_config.json").read_text())
    served = set()
    for module, part in model.named_modules(remove_duplicate=False):
        (path / "adapter_config.json").write_text(json.dumps(config | {"modules_to_save": [module]}))
        if "lora_" not in module and not any(True for _ in part.parameters()):
            served.add(module.rsplit(".", 1)[-1])
            assert inspect_adapter("a", path, cfg).modules, module
            continue
        with pytest.raises(AdapterError, match="modules_to_save"):
            inspect_adapter("a", path, cfg)
    assert served == {"rotary_emb", "act_fn"}
