"""``model.config.model_digest``: what a gateway and a worker started apart must agree on."""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from transformers import AutoTokenizer

from dlora.model.config import ModelConfig, model_digest
from dlora.model.make_tiny import TinyOutput


def _digest(model: Path) -> str:
    return model_digest(ModelConfig.from_dir(model), AutoTokenizer.from_pretrained(model).get_vocab())


def test_a_copy_resaved_or_without_the_weights_agrees(tiny_llama: TinyOutput, tmp_path: Path) -> None:
    """A gateway's host may hold only the config and tokenizer, written by another release (and
    without generation_config.json, whose extra end-of-sequence ids a review found digested)."""
    copy = tmp_path / "gateway-copy"
    copy.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        if (tiny_llama.model / name).exists():
            shutil.copy(tiny_llama.model / name, copy / name)
    config = json.loads((copy / "config.json").read_text())
    (copy / "config.json").write_text(json.dumps(dict(reversed(config.items())), indent=4))  # re-saved
    assert _digest(copy) == _digest(tiny_llama.model) and len(_digest(copy)) == 16
    with_eos = tmp_path / "worker-copy"
    shutil.copytree(tiny_llama.model, with_eos)
    (with_eos / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 3]}))
    assert ModelConfig.from_dir(with_eos).eos_token_ids != ModelConfig.from_dir(copy).eos_token_ids
    assert _digest(with_eos) == _digest(copy)


def test_another_vocabulary_or_architecture_differs(
    tiny_llama: TinyOutput, tiny_qwen: TinyOutput, tmp_path: Path
) -> None:
    ours = _digest(tiny_llama.model)
    assert _digest(tiny_qwen.model) != ours
    wider = tmp_path / "wider"
    shutil.copytree(tiny_llama.model, wider)
    config = json.loads((wider / "config.json").read_text())
    (wider / "config.json").write_text(json.dumps(config | {"num_hidden_layers": config["num_hidden_layers"] + 1}))
    assert _digest(wider) != ours
    vocab = AutoTokenizer.from_pretrained(tiny_llama.model).get_vocab()
    a, b = sorted(vocab)[:2]
    swapped = vocab | {a: vocab[b], b: vocab[a]}  # two tokens' ids exchanged
    assert model_digest(ModelConfig.from_dir(tiny_llama.model), swapped) != ours


def _config(**changes: object) -> ModelConfig:
    rope = {"rope_theta": 1e4, "rope_type": "default"}
    base = ModelConfig("llama", 100, 64, 128, 2, 4, 2, 16, 1e-5, 512, False, False, rope=rope)
    return replace(base, **changes)


def test_the_digest_of_a_release_is_the_next_release_s() -> None:
    """Pinned: a gateway and workers of two releases meet in every rolling upgrade, and a digest
    that changed between them refused every request (503, another model)."""
    assert model_digest(_config(), {"a": 0, "b": 1}) == "88dc302b2d269011"
    assert model_digest(_config(o_bias=True, sliding_window=256, eos_token_ids=(2,)), {"a": 0}) != "88dc302b2d269011"


def test_a_field_added_to_the_config_changes_only_the_digests_of_models_that_set_it() -> None:
    """``o_bias`` added with its default False changed every model's digest; a field added later
    counts only off its default."""

    @dataclass(frozen=True)
    class Later(ModelConfig):
        new_norm: bool = False
        new_scales: list[float] = field(default_factory=list)

    vocab = {"a": 0, "b": 1}
    ours = model_digest(_config(), vocab)
    later = Later(**asdict(_config()))
    assert model_digest(later, vocab) == ours
    assert model_digest(replace(later, new_norm=True), vocab) != ours
    assert model_digest(replace(later, new_scales=[0.5]), vocab) != ours
