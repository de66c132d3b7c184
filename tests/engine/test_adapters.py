"""Adapters: validated against the base, refused with a reason, slots LRU, merge exact."""

from __future__ import annotations

import json
import shlex
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from dlora.common.messages import SamplingParams
from dlora.model.make_tiny import TinyOutput
from dlora.services.worker.engine.lora import AdapterError, load_adapter
from tests.engine.helpers import make_engine, run_all


def _copy(tiny: TinyOutput, tmp_path: Path, name: str = "lora-0") -> Path:
    dst = tmp_path / name
    shutil.copytree(tiny.adapters[name], dst)
    return dst


def _edit_config(path: Path, **changes) -> None:
    conf = json.loads((path / "adapter_config.json").read_text())
    conf.update(changes)
    (path / "adapter_config.json").write_text(json.dumps(conf))


def _edit_tensors(path: Path, fn) -> None:
    tensors = load_file(str(path / "adapter_model.safetensors"))
    save_file({k: v.contiguous() for k, v in fn(tensors).items()}, str(path / "adapter_model.safetensors"))


def test_scaling_and_ranks_follow_the_config(tiny_llama: TinyOutput, engine_cfg) -> None:
    for name, path in tiny_llama.adapters.items():
        conf = json.loads((path / "adapter_config.json").read_text())
        adapter = load_adapter(name, path, engine_cfg)
        r, alpha = conf["r"], conf["lora_alpha"]
        expected = alpha / r**0.5 if conf["use_rslora"] else alpha / r
        assert adapter.rank == r and alpha != r
        assert all(w.scale == pytest.approx(expected) for w in adapter.weights.values())
        assert adapter.target_names == set(conf["target_modules"])
    assert any(json.loads((p / "adapter_config.json").read_text())["use_rslora"] for p in tiny_llama.adapters.values())


def test_alpha_pattern_overrides_per_module(tiny_llama: TinyOutput, engine_cfg, tmp_path: Path) -> None:
    path = _copy(tiny_llama, tmp_path)
    _edit_config(path, alpha_pattern={"q_proj": 3})
    adapter = load_adapter("x", path, engine_cfg)
    assert adapter.weights[(0, "q_proj")].scale == pytest.approx(3 / adapter.rank)
    assert adapter.weights[(0, "v_proj")].scale != adapter.weights[(0, "q_proj")].scale


BAD = {
    "missing config": (lambda p: (p / "adapter_config.json").unlink(), "not found"),
    "pickle only": (
        lambda p: (p / "adapter_model.safetensors").rename(p / "adapter_model.bin"),
        "only safetensors",
    ),
    "broken json": (lambda p: (p / "adapter_config.json").write_text("{"), "not valid JSON"),
    "dora": (lambda p: _edit_config(p, use_dora=True), "DoRA"),
    "wrong r": (lambda p: _edit_config(p, r=4), "r=4"),
    "no alpha": (lambda p: _edit_config(p, lora_alpha=None), "lora_alpha"),
    "modules_to_save": (lambda p: _edit_config(p, modules_to_save=["lm_head"]), "modules_to_save"),
    "wrong shape": (
        lambda p: _edit_tensors(p, lambda t: {k: (v[:, :-1] if "q_proj.lora_A" in k else v) for k, v in t.items()}),
        "do not fit",
    ),
    "only A": (lambda p: _edit_tensors(p, lambda t: {k: v for k, v in t.items() if "lora_B" not in k}), "not both"),
    "embedding": (
        lambda p: _edit_tensors(p, lambda t: {**t, "base_model.model.lm_head.lora_A.weight": torch.zeros(8, 64)}),
        "lm_head",
    ),
    "layer the base lacks": (
        lambda p: _edit_tensors(p, lambda t: {k.replace("layers.1.", "layers.7."): v for k, v in t.items()}),
        "has 2 layers",
    ),
    "garbage file": (lambda p: (p / "adapter_model.safetensors").write_bytes(b"not a safetensors file"), "cannot read"),
    # saved unconverted: trained against the residual base its initialisation made (a user's trial)
    "pissa": (lambda p: _edit_config(p, init_lora_weights="pissa_niter_4"), "changes the base model's weights"),
    "olora": (lambda p: _edit_config(p, init_lora_weights="olora"), "path_initial_model_for_weight_conversion"),
}


@pytest.mark.parametrize("init", ["gaussian", "eva", "orthogonal", False])
def test_initialisations_that_leave_the_base_alone_are_served(
    tiny_llama: TinyOutput, engine_cfg, tmp_path: Path, init
) -> None:
    path = _copy(tiny_llama, tmp_path)
    _edit_config(path, init_lora_weights=init)
    assert load_adapter("ok", path, engine_cfg).rank > 0


def test_peft_changes_the_base_as_it_loads_an_unconverted_pissa_adapter(tiny_llama: TinyOutput, tmp_path: Path) -> None:
    """Why dlora refuses one: the oracle, transformers + peft, rewrites the base layer's weight as
    it loads it (PiSSA's residual), which one base shared by many adapters cannot do."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    path = _copy(tiny_llama, tmp_path)
    _edit_config(path, init_lora_weights="pissa")
    model = AutoModelForCausalLM.from_pretrained(tiny_llama.model, torch_dtype=torch.float32)
    before = model.model.layers[0].self_attn.q_proj.weight.detach().clone()
    peft = PeftModel.from_pretrained(model, path)
    after = peft.base_model.model.model.layers[0].self_attn.q_proj.base_layer.weight
    assert not torch.equal(before, after)


@pytest.mark.parametrize("case", BAD)
def test_bad_adapters_are_refused_with_a_reason(tiny_llama: TinyOutput, engine_cfg, tmp_path: Path, case: str) -> None:
    path = _copy(tiny_llama, tmp_path)
    breaker, fragment = BAD[case]
    breaker(path)
    with pytest.raises(AdapterError, match=fragment):
        load_adapter("bad", path, engine_cfg)


def test_a_pickled_adapter_is_refused_with_how_to_convert_it_and_the_way_given_works(
    tiny_llama: TinyOutput, engine_cfg, tmp_path: Path
) -> None:
    """PEFT's ``adapter_model.bin`` (``save_pretrained(safe_serialization=False)``: ``torch.save``
    of the state dict), which vLLM loads: refused, as it was, but saying how to convert it (the
    message said only "only safetensors are loaded"), and the command it gives makes it load."""
    path = _copy(tiny_llama, tmp_path)
    weights = path / "adapter_model.safetensors"
    torch.save(load_file(str(weights)), path / "adapter_model.bin")
    weights.unlink()
    with pytest.raises(AdapterError) as refused:
        load_adapter("pickled", path, engine_cfg)
    said = str(refused.value)
    assert "only safetensors are loaded" in said and "save_pretrained(dir, safe_serialization=True)" in said
    python, flag, code = shlex.split(said.split("where torch is installed: ", 1)[1])  # as a shell reads it
    assert (python, flag) == ("python3", "-c")
    exec(code, {})  # what `python -c` runs, here (a process of its own spent seconds importing torch)
    converted = load_adapter("pickled", path, engine_cfg)
    original = load_adapter("lora-0", tiny_llama.adapters["lora-0"], engine_cfg)
    assert converted.weights.keys() == original.weights.keys()
    assert all(torch.equal(converted.weights[k].a, w.a) for k, w in original.weights.items())
    assert all(torch.equal(converted.weights[k].b, w.b) for k, w in original.weights.items())


def test_unregister_and_reuse_slots(tiny_llama: TinyOutput) -> None:
    engine = make_engine(tiny_llama, max_loras=2)
    names = list(tiny_llama.adapters)
    requests = {f"r{i}": (name, [5, 6, 7]) for i, name in enumerate(names)}
    run_all(engine, requests, 3)
    assert engine.stats.adapter_loads == len(names)
    assert engine.stats.adapter_evictions == len(names) - 2
    engine.unregister_adapter(names[0])
    with pytest.raises(AdapterError):
        engine.unregister_adapter(names[0])
    assert names[0] not in engine.adapters


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_merge_unmerge_is_bit_exact_after_1000_cycles(tiny_llama: TinyOutput, dtype: str, device: str) -> None:
    """Half precision makes W + s·BA round; restoring must still give the original bits."""
    engine = make_engine(tiny_llama, dtype=dtype, device=device)
    layers = engine.merger.weights.layers
    before = [[t.clone() for t in (lw.qkv, lw.o, lw.gate_up, lw.down)] for lw in layers]
    names = list(tiny_llama.adapters)
    for i in range(1000):
        engine.merger.merge(engine.adapters[names[i % len(names)]])
        if i == 0:
            assert not torch.equal(layers[0].qkv, before[0][0])
        engine.merger.unmerge()
    for lw, orig in zip(layers, before):
        for t, o in zip((lw.qkv, lw.o, lw.gate_up, lw.down), orig):
            assert torch.equal(t, o)


def test_merged_engine_is_exact_when_back_to_unmerged(tiny_llama: TinyOutput) -> None:
    engine = make_engine(tiny_llama, policy="merged-only")
    layers = engine.merger.weights.layers
    before = [lw.gate_up.clone() for lw in layers]
    requests = {f"r{i}": (name, [9, 8, 7]) for i, name in enumerate(tiny_llama.adapters)}
    run_all(engine, requests, 4)
    engine.step(decision=None)  # idle: nothing to run
    engine.merger.unmerge()
    assert all(torch.equal(lw.gate_up, b) for lw, b in zip(layers, before))
    assert engine.stats.merge_seconds > 0 and engine.stats.unmerge_seconds > 0


def test_a_merge_uses_a_and_b_already_in_the_adapters_device_slot(tiny_llama: TinyOutput) -> None:
    """An adapter resident in a device slot (an unmerged step loaded it) is merged from there:
    the switch loads nothing, takes no slot of its own, and gives what merging from host memory
    gives (fp32)."""
    engine = make_engine(tiny_llama)
    name = next(iter(tiny_llama.adapters))
    engine.add_request("r", prompt_token_ids=[9, 8, 7], params=SamplingParams(max_tokens=2), adapter=name)
    engine.step()  # unmerged: loads the slot
    loads, resident = engine.stats.adapter_loads, engine.slots.resident
    assert engine.slots.slot_of(name) is not None
    engine.switch(name)
    assert engine.stats.adapter_loads == loads and engine.slots.resident == resident
    from_slot = [lw.qkv.clone() for lw in engine.merger.weights.layers]
    engine.switch(None)
    engine.merger.merge(engine.adapters[name])  # from host memory
    assert all(torch.equal(lw.qkv, m) for lw, m in zip(engine.merger.weights.layers, from_slot))
    engine.merger.unmerge()


def test_a_merge_that_fails_part_way_leaves_the_base_weights_untouched(tiny_llama: TinyOutput) -> None:
    engine = make_engine(tiny_llama)
    layers = engine.merger.weights.layers
    before = [[t.clone() for t in (lw.qkv, lw.o, lw.gate_up, lw.down)] for lw in layers]
    adapter = engine.adapters[next(iter(tiny_llama.adapters))]
    broken = dict(adapter.weights)
    key = list(broken)[len(broken) // 2]
    broken[key] = type(broken[key])(a=broken[key].a[:, :3], b=broken[key].b, scale=broken[key].scale)  # wrong shape
    with pytest.raises(RuntimeError):
        engine.merger.merge(type(adapter)(adapter.name, adapter.path, broken, adapter.digest))
    assert engine.merger.merged is None
    for lw, orig in zip(layers, before):
        assert all(torch.equal(t, o) for t, o in zip((lw.qkv, lw.o, lw.gate_up, lw.down), orig))


def test_the_engine_loads_within_its_configured_adapter_limits(tiny_llama: TinyOutput) -> None:
    """[worker.engine.adapter_limits] reaches the loader: a worker refuses what its limits refuse."""
    from dlora.model.adapters import AdapterLimits

    bare = TinyOutput(tiny_llama.model, tiny_llama.adapters_dir, {})
    engine = make_engine(bare, adapter_limits=AdapterLimits(max_lora_rank=16))
    ranks = {name: json.loads((p / "adapter_config.json").read_text())["r"] for name, p in tiny_llama.adapters.items()}
    for name, path in tiny_llama.adapters.items():
        if ranks[name] <= 16:
            engine.register_adapter(name, path)
        else:
            with pytest.raises(AdapterError, match=f"rank {ranks[name]} is above max_lora_rank=16"):
                engine.register_adapter(name, path)
    assert set(engine.adapters) == {n for n, r in ranks.items() if r <= 16} and max(ranks.values()) > 16


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_a_large_scale_is_applied_after_the_shrink_as_peft_applies_it(
    tiny_llama: TinyOutput, tmp_path: Path, dtype: str
) -> None:
    """Within the limits (weights ≤ 1e4, scale ≤ 1e3), A of 20s and B of 1e-5s at scale 1000 change
    the output by little. The torch path folded the scale into A in the slot's dtype, so x·(s·A)
    went past fp16's 65,504 and the request failed "logits not finite", where PEFT in fp16,
    (x·A)·B·s, and the Triton path (fp32 shrink, scale at the end, as vLLM's punica) serve it. The
    oracle is PEFT in fp32 (in bf16 PEFT rounds (x·A)·B before the scale and drifts from it)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    path = _copy(tiny_llama, tmp_path)
    _edit_config(path, r=8, lora_alpha=8000.0, use_rslora=False, rank_pattern={}, alpha_pattern={})
    g = torch.Generator().manual_seed(0)
    _edit_tensors(
        path, lambda t: {k: torch.randn(v.shape, generator=g) * (20.0 if "lora_A" in k else 1e-5) for k, v in t.items()}
    )
    prompt = [5, 40, 41, 300, 17, 9]
    base = AutoModelForCausalLM.from_pretrained(tiny_llama.model, dtype=torch.float32)
    peft = PeftModel.from_pretrained(base, path).eval()
    with torch.inference_mode():
        ids = torch.tensor([prompt])
        want = peft.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False)
    engine = make_engine(tiny_llama, dtype=dtype)
    engine.register_adapter("large-scale", path)
    engine.add_request("x", prompt_token_ids=prompt, params=SamplingParams(max_tokens=6), adapter="large-scale")
    got, errors = [], []
    while engine.has_unfinished():
        for o in engine.step():
            got += o.new_token_ids
            errors += [o.error] if o.error else []
    assert errors == [] and got == want[0, len(prompt) :].tolist()
