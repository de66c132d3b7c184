"""``model.files.model_digest``: what makes two model directories the same served model."""

from __future__ import annotations

import shutil
from pathlib import Path

from dlora.model.files import model_digest


def _model(root: Path) -> Path:
    root.mkdir()
    (root / "config.json").write_text('{"model_type": "llama", "vocab_size": 256}')
    (root / "tokenizer.json").write_text('{"model": {"vocab": {"a": 0}}}')
    (root / "model.safetensors").write_bytes(b"\0" * 64)
    return root


def test_copies_agree_and_what_is_not_read_does_not_count(tmp_path: Path) -> None:
    one = _model(tmp_path / "one")
    two = tmp_path / "two"
    shutil.copytree(one, two)
    assert model_digest(one) == model_digest(two) and len(model_digest(one)) == 16
    (two / "model-00001-of-00002.safetensors").write_bytes(b"\1" * 10)  # an older revision's shard
    (two / "README.md").write_text("notes")
    assert model_digest(two) == model_digest(one)


def test_another_tokenizer_config_or_weight_layout_differs(tmp_path: Path) -> None:
    one = _model(tmp_path / "one")
    base = model_digest(one)
    for name, content in (("tokenizer.json", b'{"model": {"vocab": {"b": 0}}}'), ("config.json", b"{}")):
        other = tmp_path / name
        shutil.copytree(one, other)
        (other / name).write_bytes(content)
        assert model_digest(other) != base, name
    resized = tmp_path / "resized"
    shutil.copytree(one, resized)
    (resized / "model.safetensors").write_bytes(b"\0" * 65)
    assert model_digest(resized) != base


def test_a_directory_without_weights_is_digested_not_refused(tmp_path: Path) -> None:
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "config.json").write_text("{}")
    assert len(model_digest(bare)) == 16  # the loader says what is missing
