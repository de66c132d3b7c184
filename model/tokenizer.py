"""The base model's tokenizer, read from its folder."""

from __future__ import annotations

import json
from importlib import metadata
from pathlib import Path
from typing import Any


def load_tokenizer(folder: str | Path) -> Any:
    """The tokenizer in ``folder`` (transformers' ``AutoTokenizer``; where ``_direct`` knows the
    class that would give, that class directly: the same tokenizer, without torch).

    Raises:
        ValueError: none that transformers can read, in one line naming the folder (transformers'
            own message spans lines about backends and sentencepiece and names no folder)."""
    try:
        if (name := _direct(Path(folder))) is not None:
            import transformers  # (its classes import lazily: only that one's module)

            tokenizer = getattr(transformers, name).from_pretrained(folder)
        else:
            from transformers import AutoTokenizer  # here: 0.9 s to import, and the simulator needs none

            tokenizer = AutoTokenizer.from_pretrained(folder)
    except (OSError, ValueError) as e:
        first = next((line.strip() for line in str(e).splitlines() if line.strip()), "")
        detail = "" if first.endswith(":") else f" ({first})"  # a first line that only begins a list: left out
        raise ValueError(_none_in(folder) + detail) from None
    # transformers 5 builds a tokenizer from tokenizer_config.json alone where its vocabulary files
    # are missing: its special tokens only, every text encoded to no ids (an output counted 0 tokens)
    if len(tokenizer) <= len(set(tokenizer.all_special_ids)):
        raise ValueError(_none_in(folder) + " (its vocabulary files are missing: only special tokens)")
    return tokenizer


# What transformers writes as a Llama folder's tokenizer class (5: the first; 4, and Llama 3's own
# checkpoints: the second); AutoTokenizer loads either as transformers 5's TokenizersBackend.
_GENERIC_CLASSES = {"TokenizersBackend", "PreTrainedTokenizerFast"}
_GENERIC = "PreTrainedTokenizerFast"  # (transformers 5's alias of TokenizersBackend)
# Model type -> the classes a folder of it may declare that are loaded directly, and the class
# AutoTokenizer (transformers 5's ``tokenization_auto``) loads them as. Llama: no class of its own,
# so the generic one it declares. Qwen2: its own, ``Qwen2Tokenizer``, whatever the folder declares
# (qwen2 is among its MODELS_WITH_INCORRECT_HUB_TOKENIZER_CLASS), which rebuilds the tokenizer with
# its own normalizer and pre-tokenizer: the generic class would not be the same tokenizer. Mistral:
# ``MistralCommonBackend`` only where mistral-common is installed and the folder holds a
# ``tekken.json``; else the generic one, over the ``LlamaTokenizerFast`` Mistral's folders declare.
# Qwen2's and Mistral's under transformers 5 only (pyproject allows 4): 4's AutoTokenizer loads them
# as Qwen2TokenizerFast and LlamaTokenizerFast (a BOS added), where its ``Qwen2Tokenizer`` is the
# slow class (no ``tokenizer.json`` read, no ``backend_tokenizer``) and the generic one adds none.
_DIRECT: dict[str, tuple[set[str], str]] = {
    "llama": (_GENERIC_CLASSES, _GENERIC),
    "qwen2": ({"Qwen2Tokenizer", "Qwen2TokenizerFast"} | _GENERIC_CLASSES, "Qwen2Tokenizer"),
    "mistral": ({"LlamaTokenizerFast"} | _GENERIC_CLASSES, _GENERIC),
}
_SINCE_5 = {"qwen2", "mistral"}


def _transformers_major() -> int:
    """The installed transformers' major version, read from its metadata (importing it costs)."""
    return int(metadata.version("transformers").split(".", 1)[0])


def _direct(folder: Path, major: int | None = None) -> str | None:
    """The transformers class AutoTokenizer would load ``folder``'s tokenizer as, where ``_DIRECT``
    names it: the folder's ``config.json`` of a model type there, a ``tokenizer_config.json``
    declaring one of that type's classes and no remote code (``auto_map``), a ``tokenizer.json``,
    and no ``tekken.json`` (mistral-common's, which AutoTokenizer may prefer). Such a folder is
    loaded as that class directly: AutoTokenizer's module imports torch (through transformers'
    configuration_utils), 11.6 of the 16.5 s a gateway took for its tokenizer on a busy 2-core host,
    and the gateway runs no model. None otherwise, and for anything unreadable here (AutoTokenizer
    says what). ``major``: transformers' major version (None: the installed one's)."""
    try:
        config = json.loads((folder / "config.json").read_text())
        declared = json.loads((folder / "tokenizer_config.json").read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(config, dict) or not isinstance(declared, dict) or "auto_map" in declared:
        return None
    model_type = str(config.get("model_type"))
    if model_type in _SINCE_5 and (major or _transformers_major()) < 5:
        return None
    entry = _DIRECT.get(model_type)
    if entry is None or declared.get("tokenizer_class") not in entry[0] or (folder / "tekken.json").exists():
        return None
    return entry[1] if (folder / "tokenizer.json").is_file() else None


def _none_in(folder: str | Path) -> str:
    return (
        f"the model folder {folder} holds no tokenizer transformers can read (tokenizer.json, or "
        "tokenizer_config.json with its vocabulary files)"
    )
