"""Fixtures the unit tests share: an adapter root and a copy of a tiny adapter in it (adapter files),
the planner's thread given a core of its own (the planner's)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from dlora.model.make_tiny import TinyOutput
from tests.unit.planner_cases import whole_core as whole_core_for


@pytest.fixture
def root(tmp_path: Path) -> Path:
    """An empty directory, the one adapter root."""
    (tmp_path / "root").mkdir()
    return tmp_path / "root"


@pytest.fixture
def adapter(tiny_llama: TinyOutput, root: Path) -> Path:
    """A copy of lora-0 (rank 8, alpha 16) inside ``root``."""
    return Path(shutil.copytree(tiny_llama.adapters["lora-0"], root / "a"))


@pytest.fixture
def whole_core(monkeypatch: pytest.MonkeyPatch) -> None:
    """The planner run as on a machine of its own (``planner_cases.whole_core``)."""
    whole_core_for(monkeypatch)
