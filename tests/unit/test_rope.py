"""RoPE frequencies match transformers' for every scaling variant served."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from dlora.kernels.rope import apply_rope
from dlora.model.config import ModelConfig, ModelConfigError
from dlora.services.worker.engine.rope import Rope, inv_freq_and_scale

SCALINGS = {
    "default": None,
    "linear": {"rope_type": "linear", "factor": 4.0},
    "dynamic": {"rope_type": "dynamic", "factor": 2.0},
    "llama3": {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64,
    },
    "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64},
    # without the pretraining length: max_position_embeddings, as transformers fills it in (a
    # worker crashed on a KeyError at start-up)
    "yarn-no-original": {"rope_type": "yarn", "factor": 4.0},
    "llama3-no-original": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0},
    "yarn-mscale": {
        "rope_type": "yarn",
        "factor": 4.0,
        "original_max_position_embeddings": 64,
        "mscale": 0.707,
        "mscale_all_dim": 1.0,
        "beta_fast": 16,
    },
}


def configs(scaling):
    raw = dict(
        hidden_size=128,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=64,
        num_hidden_layers=1,
        vocab_size=32,
        max_position_embeddings=256,
        rope_theta=5000.0,
    )
    hf = LlamaConfig(**raw, rope_scaling=scaling)
    ours = ModelConfig.from_dict({"model_type": "llama", **raw, "rope_scaling": scaling})
    return hf, ours


@pytest.mark.parametrize("name", SCALINGS)
def test_inverse_frequencies_match_transformers(name: str) -> None:
    hf, ours = configs(SCALINGS[name])
    kind = ours.rope["rope_type"]
    for seq_len in (None, 1000):
        if kind == "default":  # transformers keeps the plain formula inside each model's rotary module
            dim = ours.head_dim
            expected, scale = 1.0 / (5000.0 ** (torch.arange(0, dim, 2).float() / dim)), 1.0
        else:
            expected, scale = ROPE_INIT_FUNCTIONS[kind](hf, None, seq_len=seq_len)
        got, got_scale = inv_freq_and_scale(ours, seq_len=seq_len)
        torch.testing.assert_close(got, expected.float(), atol=0, rtol=1e-6)
        assert got_scale == pytest.approx(scale)


# A small llama config without RoPE settings.
SMALL = dict(
    model_type="llama", hidden_size=64, num_attention_heads=4, intermediate_size=64, num_hidden_layers=1, vocab_size=32
)


def test_old_and_new_config_spellings_agree() -> None:
    raw = SMALL
    old = ModelConfig.from_dict({**raw, "rope_theta": 500.0, "rope_scaling": {"type": "linear", "factor": 2.0}})
    new = ModelConfig.from_dict({**raw, "rope_parameters": {"rope_theta": 500.0, "rope_type": "linear", "factor": 2.0}})
    assert old.rope == new.rope


def test_both_spellings_that_disagree_are_refused_and_agreeing_ones_taken() -> None:
    """transformers reads rope_scaling alone when both are there (rope_theta from the top level, else
    10000); merged, a transformers 5 config with Qwen2.5's YaRN block added ran at another theta (a
    helper: wrong from the first token). Both saying the same is fine."""
    v5 = {"rope_theta": 1e6, "rope_type": "default"}
    for raw in (
        {**SMALL, "rope_parameters": v5, "rope_scaling": {"type": "yarn", "factor": 4.0}},
        {**SMALL, "rope_parameters": v5, "rope_scaling": {"rope_type": "default"}, "rope_theta": 5e5},
    ):
        with pytest.raises(ModelConfigError, match="rope_parameters and rope_scaling disagree on (factor|rope_theta)"):
            ModelConfig.from_dict(raw)
    linear = {"rope_type": "linear", "factor": 2.0}
    same = {**SMALL, "rope_parameters": {**linear, "rope_theta": 5e5}, "rope_scaling": linear, "rope_theta": 5e5}
    assert ModelConfig.from_dict(same).rope["rope_theta"] == 5e5
    # the same block under both, the theta at the top (a review: refused on the theta one side lacked)
    identical = {**SMALL, "rope_parameters": linear, "rope_scaling": dict(linear), "rope_theta": 5e5}
    assert ModelConfig.from_dict(identical).rope["rope_theta"] == 5e5
    # a pretraining length transformers fills in as max_position_embeddings, said on one side only
    yarn = {"rope_type": "yarn", "factor": 4.0}
    implicit = {**SMALL, "max_position_embeddings": 64, "rope_scaling": yarn}
    implicit["rope_parameters"] = {**yarn, "original_max_position_embeddings": 64}
    assert ModelConfig.from_dict(implicit).rope["original_max_position_embeddings"] == 64


def test_unknown_scaling_is_refused_by_name() -> None:
    ours = ModelConfig.from_dict(
        {
            "model_type": "llama",
            "hidden_size": 64,
            "num_attention_heads": 4,
            "intermediate_size": 64,
            "num_hidden_layers": 1,
            "vocab_size": 32,
            "rope_scaling": {"rope_type": "longrope", "factor": 2.0},
        }
    )
    with pytest.raises(ModelConfigError, match="longrope"):
        inv_freq_and_scale(ours)


def test_rotation_preserves_norm_and_position_zero_is_identity() -> None:
    _, ours = configs(None)
    rope = Rope(ours, torch.device("cpu"))
    x = torch.randn(3, 2, ours.head_dim)
    cos, sin = rope.cos_sin(torch.tensor([0, 5, 100]))
    y = apply_rope(x, cos, sin)
    torch.testing.assert_close(y[0], x[0])
    torch.testing.assert_close(y.norm(dim=-1), x.norm(dim=-1))


def test_the_pretraining_length_beside_the_rope_settings_wins_and_a_missing_factor_is_named() -> None:
    """Phi-3 keeps original_max_position_embeddings beside rope_scaling; transformers takes it over
    the one inside. A scaling without the field it needs is refused at load, naming it."""
    raw = {**SMALL, "max_position_embeddings": 256}
    yarn = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64}
    cfg = ModelConfig.from_dict({**raw, "original_max_position_embeddings": 128, "rope_scaling": yarn})
    assert cfg.rope["original_max_position_embeddings"] == 128
    deepseek = {"rope_type": "yarn", "factor": None, "original_max_position_embeddings": 64}  # from the lengths
    torch.testing.assert_close(
        inv_freq_and_scale(ModelConfig.from_dict({**raw, "rope_scaling": deepseek}))[0],
        inv_freq_and_scale(ModelConfig.from_dict({**raw, "rope_scaling": {**deepseek, "factor": 4.0}}))[0],
    )
    for scaling, field in (
        ({"rope_type": "linear"}, "factor"),
        ({"rope_type": "yarn"}, "factor"),  # transformers refuses it too (it was served unscaled)
        ({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0}, "high_freq_factor"),
    ):
        with pytest.raises(ModelConfigError, match=field):
            ModelConfig.from_dict({**raw, "rope_scaling": scaling})


def test_the_longest_max_model_len_follows_a_linear_or_yarn_scaling_as_vllm_derives_it() -> None:
    """A review: refusing max_model_len above context_length refused Qwen2.5 with its YaRN block
    (max_position_embeddings 32,768, factor 4), which vLLM serves at 131,072."""
    yarn = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}
    qwen = ModelConfig.from_dict({**SMALL, "max_position_embeddings": 32768, "rope_scaling": yarn})
    assert qwen.context_length() == 32768 and qwen.longest_supported() == 131072
    linear = ModelConfig.from_dict(
        {**SMALL, "max_position_embeddings": 2048, "rope_scaling": {"type": "linear", "factor": 2.0}}
    )
    assert linear.longest_supported() == 4096
    assert ModelConfig.from_dict({**SMALL, "max_position_embeddings": 2048}).longest_supported() == 2048
