"""``model.config.model_digest``: what a gateway and a worker started apart must agree on."""

from __future__ import annotations

import json
import shutil
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
