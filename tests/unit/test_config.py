import json
from pathlib import Path

import pytest

from dlora.model.config import ModelConfig, ModelConfigError, sampling_defaults, served_name

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
        ({"hidden_size": None}, "missing field 'hidden_size'"),
        # Each crashed with a bare Python error (ZeroDivisionError, AttributeError, ...), or served.
        ({"num_attention_heads": 0}, "num_attention_heads must be an integer of at least 1, got 0"),
        ({"hidden_size": "sixty-four"}, "hidden_size must be an integer"),
        ({"num_hidden_layers": True}, "num_hidden_layers must be an integer"),
        ({"max_position_embeddings": 0}, "max_position_embeddings must be"),
        ({"hidden_size": 66}, "hidden_size=66 is not a multiple of num_attention_heads=4"),
        ({"rms_norm_eps": "1e-6"}, "rms_norm_eps must be a number"),
        ({"rope_scaling": "linear"}, "rope_scaling must be a JSON object"),
        ({"rope_theta": "1e6"}, "rope_theta must be a positive number"),
        ({"rope_scaling": {"rope_type": "linear", "factor": "2"}}, "factor must be a positive number"),
        ({"eos_token_id": "abc"}, "eos_token_id must be a token id"),
        ({"bos_token_id": [1]}, "bos_token_id must be a token id"),
        # Quantized checkpoints: their scales went unread and a random model served (vLLM serves them).
        ({"quantization_config": {"quant_method": "fp8"}}, "quantization_config .quant_method 'fp8'. is not served"),
        ({"quantization_config": {"quant_method": "awq", "bits": 4}}, "quant_method 'awq'"),
        ({"compression_config": {"format": "float-quantized"}}, "compression_config"),
    ],
)
def test_unservable_configs_name_the_field(change: dict, fragment: str) -> None:
    raw = {**RAW, **change}
    raw = {k: v for k, v in raw.items() if v is not None}
    with pytest.raises(ModelConfigError, match=fragment):
        ModelConfig.from_dict(raw)


def test_a_config_that_is_not_an_object_is_refused(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("[1, 2]")
    with pytest.raises(ModelConfigError, match="config.json: expected a JSON object, got list"):
        ModelConfig.from_dir(tmp_path)


def test_fields_left_out_take_transformers_defaults_per_family() -> None:
    """A Mistral config.json without max_position_embeddings served a 2,048-token context, where
    transformers' MistralConfig reads 131,072 (Qwen2Config 32,768, LlamaConfig 2,048); KV heads left
    out are 8 there, 32 in Qwen2Config, the attention heads in LlamaConfig."""
    bare = {k: v for k, v in RAW.items() if k != "num_key_value_heads"} | {"num_attention_heads": 64}
    expected = {"llama": (2048, 64), "mistral": (131_072, 8), "qwen2": (32_768, 32)}
    for family, (positions, kv_heads) in expected.items():
        cfg = ModelConfig.from_dict(bare | {"model_type": family, "head_dim": 8})
        assert (cfg.max_position_embeddings, cfg.num_kv_heads) == (positions, kv_heads), family


def test_attention_biases_are_read_as_transformers_reads_each_family() -> None:
    """Llama's attention_bias gives q, k, v and o_proj a bias (o_proj's was dropped: wrong tokens);
    Qwen2's q/k/v always have one whatever attention_bias says; Mistral's never."""
    llama = ModelConfig.from_dict(RAW | {"model_type": "llama", "attention_bias": True})
    assert (llama.qkv_bias, llama.o_bias) == (True, True)
    plain = ModelConfig.from_dict(RAW | {"model_type": "llama"})
    assert (plain.qkv_bias, plain.o_bias) == (False, False)
    qwen = ModelConfig.from_dict(RAW | {"attention_bias": False})
    assert (qwen.qkv_bias, qwen.o_bias) == (True, False)
    mistral = ModelConfig.from_dict(RAW | {"model_type": "mistral", "attention_bias": True})
    assert (mistral.qkv_bias, mistral.o_bias) == (False, False)


def test_a_window_limits_the_context_only_where_some_layer_uses_it() -> None:
    """transformers: Llama has no window; Qwen2's is used with use_sliding_window, on layers from
    max_window_layers (default 28) on; Mistral's whenever set."""
    window = {"sliding_window": 32, "max_position_embeddings": 4096}
    assert ModelConfig.from_dict(RAW | window | {"model_type": "llama"}).context_length() == 4096
    assert ModelConfig.from_dict(RAW | window | {"model_type": "mistral"}).context_length() == 32
    assert ModelConfig.from_dict(RAW | window).context_length() == 4096  # use_sliding_window false
    qwen = RAW | window | {"use_sliding_window": True}
    assert ModelConfig.from_dict(qwen).context_length() == 4096  # 2 layers, all below 28
    assert ModelConfig.from_dict(qwen | {"max_window_layers": 2}).context_length() == 4096
    assert ModelConfig.from_dict(qwen | {"max_window_layers": 1}).context_length() == 32


def test_the_served_name_of_a_relative_directory_is_its_own(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`--model .` named the base model "" (every request for it a 404)."""
    (tmp_path / "m").mkdir()
    monkeypatch.chdir(tmp_path / "m")
    assert (served_name("."), served_name("../m/"), served_name(tmp_path / "m")) == ("m", "m", "m")
    assert served_name(".", "llama-8b") == "llama-8b"


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
    # generation_config.json's own, where it names some: config.json's then are not (transformers'
    # generate, vLLM); without them, config.json's.
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": 74}))
    assert ModelConfig.from_dir(tmp_path).eos_token_ids == (74,)
    (tmp_path / "generation_config.json").write_text(json.dumps({"temperature": 0.6}))
    assert ModelConfig.from_dir(tmp_path).eos_token_ids == (2,)
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": []}))  # the tokenizer's alone
    assert ModelConfig.from_dir(tmp_path).eos_token_ids == ()
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
    bads = ({"temperature": "hot"}, {"top_p": 1.5}, {"top_k": 2.5}, {"max_new_tokens": 0}, {"min_p": True})
    for bad in (*bads, {"repetition_penalty": 0}, {"top_k": 1 << 64}):  # what every request would then be refused for
        (tmp_path / "generation_config.json").write_text(json.dumps(bad))
        with pytest.raises(ModelConfigError, match=f"generation_config.json: {next(iter(bad))} must be"):
            sampling_defaults(tmp_path)
    # a request's range, RANGES', not one of its own: top_p 0 (greedy, as a request's) was refused
    (tmp_path / "generation_config.json").write_text(json.dumps({"top_p": 0}))
    assert sampling_defaults(tmp_path) == {"top_p": 0}
    # any finite penalty above 0, as a request's (vLLM's bound): 250 was refused at start
    (tmp_path / "generation_config.json").write_text(json.dumps({"repetition_penalty": 250.0}))
    assert sampling_defaults(tmp_path) == {"repetition_penalty": 250.0}
