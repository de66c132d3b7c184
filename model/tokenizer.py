"""The base model's tokenizer, read from its folder."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def load_tokenizer(folder: str | Path) -> Any:
    """The tokenizer in ``folder`` (transformers' ``AutoTokenizer``).

    Raises:
        ValueError: none that transformers can read, in one line naming the folder (transformers'
            own message spans lines about backends and sentencepiece and names no folder)."""
    from transformers import AutoTokenizer  # here: 0.9 s to import, and the simulator needs none

    try:
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


def _none_in(folder: str | Path) -> str:
    return (
        f"the model folder {folder} holds no tokenizer transformers can read (tokenizer.json, or "
        "tokenizer_config.json with its vocabulary files)"
    )
