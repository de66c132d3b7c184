"""Fixtures the unit tests of adapter files share: an adapter root, and a copy of a tiny adapter in it."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from dlora.model.make_tiny import TinyOutput


@pytest.fixture
def root(tmp_path: Path) -> Path:
    """An empty directory, the one adapter root."""
    (tmp_path / "root").mkdir()
    return tmp_path / "root"


@pytest.fixture
def adapter(tiny_llama: TinyOutput, root: Path) -> Path:
    """A copy of lora-0 (rank 8, alpha 16) inside ``root``."""
    return Path(shutil.copytree(tiny_llama.adapters["lora-0"], root / "a"))
