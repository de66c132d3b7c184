"""Models whose config carries RoPE scaling generate what transformers generates."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from dlora.common.messages import SamplingParams
from dlora.model.make_tiny import TinyOutput
from tests.engine.helpers import make_engine, run_all

SCALINGS = {
    "linear": ({"rope_type": "linear", "factor": 2.0}, 512),
    # Short max_position_embeddings so the prompt runs past it and the NTK rescaling is exercised.
    "dynamic": ({"rope_type": "dynamic", "factor": 4.0}, 16),
    "llama3": (
        {
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 16,
        },
        512,
    ),
    "yarn": ({"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16}, 512),
}


@pytest.mark.parametrize("name", SCALINGS)
def test_scaled_rope_matches_transformers(tiny_llama: TinyOutput, tmp_path: Path, name: str) -> None:
    scaling, max_pos = SCALINGS[name]
    model_dir = tmp_path / "model"
    shutil.copytree(tiny_llama.model, model_dir)
    conf = json.loads((model_dir / "config.json").read_text())
    conf.update(rope_scaling=scaling, max_position_embeddings=max_pos)
    (model_dir / "config.json").write_text(json.dumps(conf))
    prompt = [(7 * i + 3) % 500 for i in range(24)]

    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    with torch.inference_mode():
        ids = torch.tensor([prompt])
        # Logits first: transformers' dynamic NTK keeps the frequencies of the longest sequence seen.
        expected_logits = hf(input_ids=ids).logits[0, -1]
        expected = hf.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False)

    tiny = TinyOutput(model=model_dir, adapters_dir=tiny_llama.adapters_dir, adapters={})
    engine = make_engine(tiny)
    # Past its native context dynamic NTK rotates by the length at writing: no cached or chunked KV.
    assert (engine.blocks.enable_prefix_caching, engine.limits.chunked_prefill) == ((name != "dynamic",) * 2)
    assert run_all(engine, {"r": (None, prompt)}, 8)["r"] == expected[0, len(prompt) :].tolist()
    engine.add_request("p", prompt_token_ids=prompt)
    engine.step()
    torch.testing.assert_close(engine.last_logits["p"].cpu(), expected_logits, atol=1e-4, rtol=0)


def test_mistral_config_is_served_up_to_its_window(tiny_llama: TinyOutput, tmp_path: Path) -> None:
    model_dir = tmp_path / "mistral"
    shutil.copytree(tiny_llama.model, model_dir)
    conf = json.loads((model_dir / "config.json").read_text())
    conf.update(model_type="mistral", architectures=["MistralForCausalLM"], sliding_window=64)
    (model_dir / "config.json").write_text(json.dumps(conf))
    prompt = [(5 * i + 1) % 500 for i in range(20)]
    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    with torch.inference_mode():
        ids = torch.tensor([prompt])
        expected = hf.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False)
    engine = make_engine(TinyOutput(model=model_dir, adapters_dir=tiny_llama.adapters_dir, adapters={}))
    assert engine.max_model_len == 64
    assert run_all(engine, {"r": (None, prompt)}, 8)["r"] == expected[0, len(prompt) :].tolist()


def test_dynamic_ntk_continues_as_generate_after_a_preemption_and_a_resume(
    tiny_llama: TinyOutput, tmp_path: Path
) -> None:
    """A recompute (preempted for KV) or a resume (a move, a recovery) rotated every key by the
    context at that step; generate rotated the prompt's at the prompt's length and each later key
    at its own: tokens diverged after the recompute, and at once after a resume (a helper)."""
    model_dir = tmp_path / "model"
    shutil.copytree(tiny_llama.model, model_dir)
    conf = json.loads((model_dir / "config.json").read_text())
    conf.update(rope_scaling={"rope_type": "dynamic", "factor": 2.0}, max_position_embeddings=32)
    (model_dir / "config.json").write_text(json.dumps(conf))
    prompts = {rid: [(7 * i + 3 + k) % 500 for i in range(36)] for k, rid in enumerate("ab")}
    expected = {}
    with torch.inference_mode():
        for rid, prompt in prompts.items():
            # a model each: transformers' dynamic NTK keeps the frequencies of the longest sequence it saw
            hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
            ids = torch.tensor([prompt])
            out = hf.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=20, do_sample=False)
            expected[rid] = out[0, len(prompt) :].tolist()
    tiny = TinyOutput(model=model_dir, adapters_dir=tiny_llama.adapters_dir, adapters={})
    tight = make_engine(tiny, block_size=4, num_blocks=24)  # both cannot decode to the end: one is recomputed
    assert run_all(tight, {rid: (None, p) for rid, p in prompts.items()}, 20) == expected
    assert tight.stats.preemptions >= 1
    engine = make_engine(tiny)
    resumed = SamplingParams(max_tokens=20, ignore_eos=True)
    engine.add_request("r", prompt_token_ids=prompts["a"], resume_token_ids=expected["a"][:6], params=resumed)
    tokens = list(expected["a"][:6])
    while engine.has_unfinished():
        tokens += [t for o in engine.step() for t in o.new_token_ids]
    assert tokens == expected["a"]


def test_a_mistral_config_without_sliding_window_takes_transformers_default() -> None:
    """MistralConfig defaults the window to 4096; the engine read a missing key as none, and from
    position 4097 on its logprobs differed (a helper). null still means none."""
    from dlora.model.config import ModelConfig

    # (KV heads given: MistralConfig's default, 8, does not divide 4)
    raw = dict(
        model_type="mistral", hidden_size=64, num_attention_heads=4, num_key_value_heads=2, intermediate_size=64,
        num_hidden_layers=1, vocab_size=32, max_position_embeddings=8192,
    )  # fmt: skip
    assert ModelConfig.from_dict(raw).sliding_window == 4096
    assert ModelConfig.from_dict({**raw, "sliding_window": None}).sliding_window is None
