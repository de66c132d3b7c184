import json
from pathlib import Path

import pytest

from dlora.model.config import ModelConfig, ModelConfigError, sampling_defaults

RAW = dict(
    model_type="qwen2",
    hidden_size=64,
    num_attention_heads=4,
    num_key_value_heads=2,
    intermediate_size=128,
    num_hidden_layers=2,
    vocab_size=100,
    eos_token_id=[2, 5],
)


def test_reads_qwen2_defaults() -> None:
    cfg = ModelConfig.from_dict(RAW)
    assert cfg.qkv_bias and cfg.head_dim == 16 and cfg.kv_size == 32 and cfg.eos_token_ids == (2, 5)
    assert cfg.rope == {"rope_theta": 10000.0, "rope_type": "default"}


@pytest.mark.parametrize(
    "change,fragment",
    [
        ({"model_type": "gpt2"}, "gpt2"),
        ({"num_key_value_heads": 3}, "multiple"),
        ({"hidden_act": "gelu"}, "gelu"),
        ({"hidden_size": None}, "hidden_size"),
    ],
)
def test_unservable_configs_name_the_field(change: dict, fragment: str) -> None:
    raw = {**RAW, **change}
    raw = {k: v for k, v in raw.items() if v is not None}
    with pytest.raises(ModelConfigError, match=fragment):
        ModelConfig.from_dict(raw)


def test_missing_and_broken_files(tmp_path: Path) -> None:
    with pytest.raises(ModelConfigError, match="not found"):
        ModelConfig.from_dir(tmp_path)
    (tmp_path / "config.json").write_text("{nope")
    with pytest.raises(ModelConfigError, match="not valid JSON"):
        ModelConfig.from_dir(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(RAW))
    assert ModelConfig.from_dir(tmp_path).vocab_size == 100


def test_generation_config_names_more_end_of_sequence_ids(tmp_path: Path) -> None:
    """vLLM #4180's kind: Llama 3 Instruct's <|eot_id|> is in generation_config.json only."""
    (tmp_path / "config.json").write_text(json.dumps(RAW | {"eos_token_id": 2}))
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 74]}))
    assert ModelConfig.from_dir(tmp_path).eos_token_ids == (2, 74)
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": ["</s>"]}))
    with pytest.raises(ModelConfigError, match="eos_token_id must be a token id"):
        ModelConfig.from_dir(tmp_path)
    (tmp_path / "generation_config.json").write_text("[2]")
    with pytest.raises(ModelConfigError, match="generation_config.json: expected a JSON object"):
        ModelConfig.from_dir(tmp_path)


def test_generation_config_gives_the_sampling_defaults_vllm_takes_from_it(tmp_path: Path) -> None:
    """vLLM's --generation-config auto: temperature, top_p, top_k, min_p, repetition_penalty and
    max_new_tokens (as max_tokens), each where it differs from transformers' own default."""
    assert sampling_defaults(tmp_path) == {}  # no generation_config.json
    qwen = {"temperature": 0.7, "top_p": 0.8, "top_k": 20, "repetition_penalty": 1.05, "do_sample": True}
    (tmp_path / "generation_config.json").write_text(json.dumps(qwen | {"bos_token_id": 1, "max_new_tokens": 64}))
    expected = {"temperature": 0.7, "top_p": 0.8, "top_k": 20, "repetition_penalty": 1.05, "max_tokens": 64}
    assert sampling_defaults(tmp_path) == expected
    # transformers' defaults are not read as the model's (vLLM reads the file's diff from them)
    (tmp_path / "generation_config.json").write_text(json.dumps({"top_k": 50, "temperature": 1.0, "min_p": 0.05}))
    assert sampling_defaults(tmp_path) == {"min_p": 0.05}
    bads = ({"temperature": "hot"}, {"top_p": 0}, {"top_k": 2.5}, {"max_new_tokens": 0}, {"min_p": True})
    for bad in (*bads, {"repetition_penalty": 0.005}):  # what every request would then be refused for
        (tmp_path / "generation_config.json").write_text(json.dumps(bad))
        with pytest.raises(ModelConfigError, match=f"generation_config.json: {next(iter(bad))} must be"):
            sampling_defaults(tmp_path)
