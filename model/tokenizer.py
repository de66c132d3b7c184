"""The base model's tokenizer, read from its folder."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def load_tokenizer(folder: str | Path) -> Any:
    """The tokenizer in ``folder`` (transformers' ``AutoTokenizer``; where that would give the
    generic fast class, ``_generic``, that class directly: the same tokenizer, without torch).

    Raises:
        ValueError: none that transformers can read, in one line naming the folder (transformers'
            own message spans lines about backends and sentencepiece and names no folder)."""
    try:
        if _generic(Path(folder)):
            from transformers import PreTrainedTokenizerFast  # (transformers 5's TokenizersBackend)

            tokenizer = PreTrainedTokenizerFast.from_pretrained(folder)
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


def _generic(folder: Path) -> bool:
    """Whether AutoTokenizer would load ``folder``'s tokenizer as transformers' generic fast one: a
    ``llama`` config (AutoTokenizer maps that type to no class of its own, where it overrides the
    declared class of some others, qwen2's and mistral's among them), a ``tokenizer_config.json``
    declaring that class and no remote code (``auto_map``), and a ``tokenizer.json``. Such a folder
    is loaded as that class directly: AutoTokenizer's module imports torch (through transformers'
    configuration_utils), 11.6 of the 16.5 s a gateway took for its tokenizer on a busy 2-core host,
    and the gateway runs no model. Anything unreadable here: False (AutoTokenizer says what)."""
    try:
        config = json.loads((folder / "config.json").read_text())
        declared = json.loads((folder / "tokenizer_config.json").read_text())
    except (OSError, ValueError):
        return False
    return (
        isinstance(config, dict)
        and config.get("model_type") == "llama"
        and isinstance(declared, dict)
        and declared.get("tokenizer_class") in _GENERIC_CLASSES
        and "auto_map" not in declared
        and (folder / "tokenizer.json").is_file()
    )


def _none_in(folder: str | Path) -> str:
    return (
        f"the model folder {folder} holds no tokenizer transformers can read (tokenizer.json, or "
        "tokenizer_config.json with its vocabulary files)"
    )
