"""The files of a model directory: which hold its weights (as transformers picks them), and a
digest of the ones that make it the model it is. No torch: the gateway reads this too."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

# What decides how text becomes token ids and what the weights compute. A gateway tokenizes and a
# worker runs; started apart (`dlora serve`, several hosts), one host's other revision of a model
# in the same path served tokens of one vocabulary to a model of another, without a word.
_IDENTITY_FILES = (
    "config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "model.safetensors.index.json",
)


class WeightsError(ValueError):
    """The checkpoint is missing a tensor or has one of the wrong shape."""


def weight_files(model_dir: Path) -> list[Path]:
    """The safetensors files that hold the checkpoint, as transformers picks them:
    ``model.safetensors``, else the shards ``model.safetensors.index.json`` names, else every
    ``*.safetensors``. Other files beside them (an older revision's shards, Mistral's
    ``consolidated.safetensors``) are not read: read, they mixed revisions or doubled the host
    memory loading takes.

    Raises:
        WeightsError: none found, or the index is unreadable or names a file that is not there.
    """
    single, index = model_dir / "model.safetensors", model_dir / "model.safetensors.index.json"
    if single.is_file():
        return [single]
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            names = sorted(set(weight_map.values()))
        except (ValueError, KeyError, TypeError, AttributeError):
            raise WeightsError(f"{index}: not a safetensors index (a JSON object with a weight_map)") from None
        files = [model_dir / n for n in names]
        if missing := [n for n, f in zip(names, files) if not f.is_file()]:
            raise WeightsError(f"{index} names shards that are not there: {', '.join(missing[:3])}")
        return files
    if not (files := sorted(model_dir.glob("*.safetensors"))):
        raise WeightsError(f"{model_dir}: no *.safetensors files (other weight formats are not loaded)")
    return files


def model_digest(model_dir: Path) -> str:
    """16 hex digits of a SHA-256 over ``model_dir``'s config and tokenizer files (their contents)
    and its weight files (``weight_files``: their names and sizes, not their bytes, gigabytes to
    read at each start). Equal digests: the same architecture, tokenizer and weight layout; weights
    retrained in place with the same shapes are not told apart. A directory whose weights cannot be
    listed is digested without them (the loader says what is wrong)."""
    h = hashlib.sha256()
    for name in _IDENTITY_FILES:
        path = model_dir / name
        if path.is_file():
            h.update(f"{name}\0{path.stat().st_size}\0".encode())
            h.update(path.read_bytes())
    try:
        for path in weight_files(model_dir):
            h.update(f"{path.name}\0{path.stat().st_size}\0".encode())
    except (WeightsError, OSError):
        pass
    return h.hexdigest()[:16]
