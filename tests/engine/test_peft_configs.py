"""adapter_config.json read as PEFT reads it: adapters written by peft itself, under every config
field that changes the math, give the engine the same logits as peft (or are refused with the
field named)."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM

from dlora.common.messages import SamplingParams
from dlora.model.make_tiny import TinyOutput
from dlora.services.worker.engine import EngineConfig, LLMEngine
from dlora.services.worker.engine.lora import AdapterError, load_adapter
from dlora.services.worker.policy import Mode, PolicyConfig, StepDecision
from tests.engine.helpers import kv_bytes_enough

PROMPT = [5, 40, 41, 300, 17, 99, 3]
ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
MODULES = [f"model.layers.{i}.{'self_attn' if t in ALL[:4] else 'mlp'}.{t}" for i in range(2) for t in ALL]
ALPHAS = {m: float(i + 1) for i, m in enumerate(MODULES)}

CONFIGS = {
    # the issue's example: one key for two modules; PEFT matches (.*\.)?(k_proj|o_proj)$
    "alpha_pattern alternation": dict(r=8, lora_alpha=16, target_modules=ALL, alpha_pattern={"k_proj|o_proj": 128}),
    "rank_pattern and alpha_pattern by layer": dict(
        r=8,
        lora_alpha=8,
        target_modules=ALL,
        rank_pattern={r"layers\.1\.mlp\.up_proj": 4, "v_proj": 16},
        alpha_pattern={r"layers\.0\..*": 32},
    ),
    "target_modules as a regex": dict(r=8, lora_alpha=16, target_modules=r".*\.(q_proj|down_proj)"),
    "all-linear": dict(r=4, lora_alpha=8, target_modules="all-linear"),
    "layers_to_transform": dict(
        r=8, lora_alpha=16, target_modules=ALL, layers_to_transform=[1], layers_pattern="layers"
    ),
    "layers_to_transform as an int": dict(
        r=8, lora_alpha=16, target_modules=["v_proj", "up_proj"], layers_to_transform=0
    ),
    "exclude_modules": dict(r=8, lora_alpha=16, target_modules=ALL, exclude_modules=["o_proj", "gate_proj"]),
    "exclude_modules as a regex": dict(
        r=8, lora_alpha=16, target_modules=ALL, exclude_modules=r".*layers\.0\.self_attn\..*"
    ),
    # a module named in full escapes layers_to_transform (peft's check_target_module_exists; the
    # layer-0 q_proj weights were dropped, vLLM #10798's kind)
    "a full name beside layers_to_transform": dict(
        r=8, lora_alpha=16, target_modules=["model.layers.0.self_attn.q_proj", "v_proj"], layers_to_transform=[1]
    ),
    "use_rslora": dict(r=16, lora_alpha=8, target_modules=ALL, use_rslora=True),
    # module names as keys (EVA writes one per module): matched without a regex engine, as re would
    "EVA's per-module keys": dict(
        r=8, lora_alpha=8, target_modules=ALL, rank_pattern=dict(zip(MODULES, range(2, 16))), alpha_pattern=ALPHAS
    ),
    "a key whose dot stands for another character": dict(
        r=8, lora_alpha=16, target_modules=ALL, rank_pattern={"layers.1.self_attn.q.proj": 4}
    ),
    "target_modules one module's name": dict(r=8, lora_alpha=16, target_modules="model.layers.0.self_attn.q_proj"),
    "fan_in_fan_out on Linear (PEFT drops it)": dict(r=8, lora_alpha=16, target_modules=ALL, fan_in_fan_out=True),
}


def write_peft_adapter(tiny: TinyOutput, out: Path, seed: int = 0, **config) -> Path:
    """An adapter saved by peft itself from the base model, its A and B random (B starts at zero)."""
    base = AutoModelForCausalLM.from_pretrained(tiny.model, dtype=torch.float32)
    with warnings.catch_warnings():  # fan_in_fan_out on Linear: peft warns and drops it
        warnings.simplefilter("ignore")
        model = get_peft_model(base, LoraConfig(**config))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    with warnings.catch_warnings():  # embedding layers targeted: peft says it saves them whole
        warnings.simplefilter("ignore")
        model.save_pretrained(out)
    return out


@torch.inference_mode()
def peft_logits(tiny: TinyOutput, path: Path) -> torch.Tensor:
    base = AutoModelForCausalLM.from_pretrained(tiny.model, dtype=torch.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = PeftModel.from_pretrained(base, path).eval()
    return model(input_ids=torch.tensor([PROMPT])).logits[0, -1].float()


def engine_logits(tiny: TinyOutput, path: Path, policy: str) -> torch.Tensor:
    engine = LLMEngine(
        str(tiny.model), EngineConfig(policy=PolicyConfig(name=policy), kv_cache_bytes=kv_bytes_enough(tiny))
    )
    engine.register_adapter("x", path)
    engine.add_request("r", prompt_token_ids=PROMPT, params=SamplingParams(max_tokens=1), adapter="x")
    engine.step()
    return engine.last_logits["r"]


@pytest.mark.parametrize("case", CONFIGS)
def test_peft_written_adapters_match_peft(tiny_llama: TinyOutput, tmp_path: Path, case: str) -> None:
    path = write_peft_adapter(tiny_llama, tmp_path / "adapter", **CONFIGS[case])
    expected = peft_logits(tiny_llama, path)
    base = AutoModelForCausalLM.from_pretrained(tiny_llama.model, dtype=torch.float32)
    with torch.inference_mode():
        plain = base(input_ids=torch.tensor([PROMPT])).logits[0, -1]
    assert (expected - plain).abs().max() > 1e-2  # the adapter matters, so the comparison proves something
    for policy in ("unmerged-only", "merged-only"):
        got = engine_logits(tiny_llama, path, policy)
        assert torch.allclose(got, expected, atol=1e-4, rtol=1e-4), (case, policy, (got - expected).abs().max())


NARROWED = {
    "layers_to_transform": {"layers_to_transform": [1], "layers_pattern": "layers"},
    "exclude_modules": {"exclude_modules": ["o_proj", "up_proj"]},
    "target_modules regex": {"target_modules": r".*\.(q_proj|down_proj)"},
    "layers_to_transform as an int": {"layers_to_transform": 0},
    "target_modules left out (PEFT's default: q_proj, v_proj)": {"target_modules": None},
}


@pytest.mark.parametrize("case", NARROWED)
def test_weights_the_config_does_not_select_are_ignored_as_peft_ignores_them(
    tiny_llama: TinyOutput, tmp_path: Path, case: str
) -> None:
    """A file holding weights for every module under a config that selects fewer: peft adapts only
    the selected modules, so the engine must too (peft-written files alone hold only selected ones)."""
    path = write_peft_adapter(tiny_llama, tmp_path / "a", r=8, lora_alpha=16, target_modules=ALL)
    conf = json.loads((path / "adapter_config.json").read_text())
    (path / "adapter_config.json").write_text(json.dumps({**conf, **NARROWED[case]}))
    expected = peft_logits(tiny_llama, path)
    everything = engine_logits(
        tiny_llama,
        write_peft_adapter(tiny_llama, tmp_path / "b", r=8, lora_alpha=16, target_modules=ALL),
        "unmerged-only",
    )
    assert (expected - everything).abs().max() > 1e-3  # the narrowing matters
    assert torch.allclose(engine_logits(tiny_llama, path, "unmerged-only"), expected, atol=1e-4, rtol=1e-4)


def test_scales_follow_peft_for_the_issue_example(tiny_llama: TinyOutput, engine_cfg, tmp_path: Path) -> None:
    path = write_peft_adapter(tiny_llama, tmp_path / "a", **CONFIGS["alpha_pattern alternation"])
    adapter = load_adapter("x", path, engine_cfg)
    assert adapter.weights[(0, "o_proj")].scale == 16.0 and adapter.weights[(0, "k_proj")].scale == 16.0
    assert adapter.weights[(0, "q_proj")].scale == 2.0


REFUSED = {
    "lora_bias": ({"lora_bias": True}, "lora_bias"),
    "layer_replication": ({"layer_replication": [[0, 2]]}, "layer_replication"),
    "trainable tokens": ({"trainable_token_indices": [1, 2]}, "trainable tokens"),
    "target_parameters": ({"target_parameters": ["mlp.experts.gate_up_proj"]}, "target_parameters"),
    "aLoRA": ({"alora_invocation_tokens": [5, 6]}, "activated LoRA"),
    "an unknown variant": ({"use_something_new": True}, "use_something_new, which dlora does not know"),
    "a bad regex": ({"target_modules": "(q_proj"}, "not a valid regex"),
    "nothing targeted": ({"target_modules": ["nonexistent"]}, "none of its weights"),
    "layers as text": ({"layers_to_transform": "abc"}, "layers_to_transform must be"),
    "a numeric layers_pattern": ({"layers_pattern": 5}, "layers_pattern must be"),
    "a text alpha": ({"alpha_pattern": {"q_proj": "x"}}, "must be a positive number"),
    "a fractional rank": ({"rank_pattern": {"q_proj": 2.5}}, "must be a positive integer"),
    "layers with a regex target": ({"target_modules": "all-linear", "layers_to_transform": [0]}, "peft refuses it"),
    "a layers_pattern alone": ({"layers_pattern": "layers"}, "peft refuses it"),
}


@pytest.mark.parametrize("case", REFUSED)
def test_fields_that_change_the_math_and_are_not_served_are_refused(
    tiny_llama: TinyOutput, engine_cfg, tmp_path: Path, case: str
) -> None:
    path = write_peft_adapter(tiny_llama, tmp_path / "a", r=8, lora_alpha=16, target_modules=ALL)
    conf = json.loads((path / "adapter_config.json").read_text())
    changes, fragment = REFUSED[case]
    (path / "adapter_config.json").write_text(json.dumps({**conf, **changes}))
    with pytest.raises(AdapterError, match=fragment):
        load_adapter("x", path, engine_cfg)


def _rewrite_weights(path: Path, rename=lambda k: k, drop=lambda k: False) -> None:  # type: ignore[no-untyped-def]
    from safetensors.torch import load_file, save_file

    tensors = load_file(path / "adapter_model.safetensors")
    save_file({rename(k): v for k, v in tensors.items() if not drop(k)}, path / "adapter_model.safetensors")


@pytest.mark.parametrize(
    ("rename", "fragment"),
    [
        (lambda k: k.replace(".lora_A.weight", ".lora_A.other.weight"), "carries the adapter name 'other'"),
        (lambda k: k.replace("self_attn.q_proj", "mlp.q_proj"), "q_proj is under self_attn"),
    ],
    ids=["another adapter's name", "another parent"],
)
def test_weights_under_names_peft_does_not_load_are_refused(
    tiny_llama: TinyOutput,
    engine_cfg,
    tmp_path: Path,
    rename,
    fragment: str,  # type: ignore[no-untyped-def]
) -> None:
    """A trial: tensors renamed lora_A.foo.weight, or with self_attn and mlp swapped, are not loaded
    by any of PEFT's paths (the base model's output), and dlora served the adapter's."""
    path = write_peft_adapter(tiny_llama, tmp_path / "a", r=8, lora_alpha=16, target_modules=ALL)
    _rewrite_weights(path, rename=rename)
    with pytest.raises(AdapterError, match=fragment):
        load_adapter("x", path, engine_cfg)
    default = write_peft_adapter(tiny_llama, tmp_path / "b", r=8, lora_alpha=16, target_modules=ALL)
    _rewrite_weights(default, rename=lambda k: k.replace(".weight", ".default.weight"))  # PEFT loads these
    assert torch.allclose(
        engine_logits(tiny_llama, default, "unmerged-only"), peft_logits(tiny_llama, default), atol=1e-4, rtol=1e-4
    )


def test_selected_modules_without_weights_are_refused_when_peft_would_leave_them_random(
    tiny_llama: TinyOutput, engine_cfg, tmp_path: Path
) -> None:
    """A trial: the config selects v_proj, the file has no v_proj weights and init_lora_weights is
    false: PEFT leaves those at nn.Linear's random start, dlora served a zero delta. With PEFT's
    other initialisations lora_B starts at zero, so the missing module adds nothing: served."""
    path = write_peft_adapter(tiny_llama, tmp_path / "a", r=8, lora_alpha=16, target_modules=ALL)
    _rewrite_weights(path, drop=lambda k: "v_proj" in k)
    load_adapter("x", path, engine_cfg)  # init_lora_weights true: a zero delta, as PEFT's
    conf = json.loads((path / "adapter_config.json").read_text())
    (path / "adapter_config.json").write_text(json.dumps({**conf, "init_lora_weights": False}))
    with pytest.raises(AdapterError, match=r"selects model\.layers\.0\.self_attn\.v_proj .*init_lora_weights false"):
        load_adapter("x", path, engine_cfg)


def test_lora_on_the_embeddings_is_refused_saying_so(tiny_llama: TinyOutput, engine_cfg, tmp_path: Path) -> None:
    path = write_peft_adapter(tiny_llama, tmp_path / "a", r=8, lora_alpha=16, target_modules=["q_proj", "embed_tokens"])
    with pytest.raises(AdapterError, match="is for embed_tokens or lm_head .*which is not served"):
        load_adapter("x", path, engine_cfg)


def test_the_all_linear_shorthand_is_read_in_any_case(tiny_llama: TinyOutput, tmp_path: Path) -> None:
    """PEFT saves all-linear expanded; a config written by hand as "ALL-LINEAR" PEFT still reads as
    the shorthand, and dlora refused it as selecting nothing (a trial)."""
    path = write_peft_adapter(tiny_llama, tmp_path / "a", r=8, lora_alpha=16, target_modules=ALL)
    conf = json.loads((path / "adapter_config.json").read_text())
    (path / "adapter_config.json").write_text(json.dumps({**conf, "target_modules": "ALL-LINEAR"}))
    got = engine_logits(tiny_llama, path, "unmerged-only")
    assert torch.allclose(got, peft_logits(tiny_llama, path), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("kernels", ["torch", "triton"])
def test_per_module_ranks_in_one_fused_projection_match_peft_in_mixed_steps(
    tiny_llama: TinyOutput, tmp_path: Path, kernels: str
) -> None:
    """A helper's trial found these right; kept so they stay so. rank_pattern gives q, k and v, which
    the engine runs as one fused projection, ranks 8, 2 and 32 (gate_proj 1), served beside another
    adapter in mixed steps: one merged, the other's delta added and the merged one's subtracted, on the
    Triton kernels' per-slot address tables too. The earlier cases above run one adapter unmerged
    or merged alone, which never reaches a slice of another rank in the same launch."""
    patterned = write_peft_adapter(
        tiny_llama,
        tmp_path / "a",
        seed=0,
        r=8,
        lora_alpha=0.5,
        target_modules=ALL,
        rank_pattern={"k_proj": 2, "v_proj": 32, "gate_proj": 1},
        alpha_pattern={r"layers\.1\..*": 0.25},
    )
    plain = write_peft_adapter(
        tiny_llama,
        tmp_path / "b",
        seed=1,
        r=4,
        lora_alpha=0.5,
        target_modules=["q_proj", "v_proj", "down_proj"],
        use_rslora=True,
    )
    engine = LLMEngine(str(tiny_llama.model), EngineConfig(kernels=kernels, kv_cache_bytes=kv_bytes_enough(tiny_llama)))
    assert engine.kernels.name == kernels
    for name, path in (("a", patterned), ("b", plain)):
        engine.register_adapter(name, path)
        engine.add_request(name, prompt_token_ids=PROMPT, params=SamplingParams(max_tokens=4), adapter=name)
    steps: dict[str, list[torch.Tensor]] = {"a": [], "b": []}
    tokens: dict[str, list[int]] = {"a": [], "b": []}
    modes = set()
    for merged in ("a", "b", "a", "b"):  # each merged in turn, the other beside it
        decision = StepDecision(merged, ["a", "b"], mixed=True)
        for out in engine.step(decision):
            steps[out.request_id].append(engine.last_logits[out.request_id])
            tokens[out.request_id] += out.new_token_ids
        modes.add(decision.mode)
    assert not engine.has_unfinished() and modes == {Mode.MIXED}
    for name, path in (("a", patterned), ("b", plain)):
        base = AutoModelForCausalLM.from_pretrained(tiny_llama.model, dtype=torch.float32)
        with warnings.catch_warnings(), torch.inference_mode():
            warnings.simplefilter("ignore")
            model = PeftModel.from_pretrained(base, path).eval()
            ids = torch.tensor([PROMPT + tokens[name][:-1]])
            expected = model(input_ids=ids).logits[0, len(PROMPT) - 1 :]
        got = torch.stack(steps[name])
        assert torch.allclose(got, expected, atol=1e-4, rtol=1e-4), (name, (got - expected).abs().max())
