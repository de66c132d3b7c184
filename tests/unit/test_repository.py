"""The repository stands alone: nothing in it reaches for a folder beside the checkout."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
# The sibling folder as a path string or as pathlib parts (spelled so this file does not match itself).
SIBLING = re.compile(rb"\.\./shar" rb"ed|[\"']shar" rb"ed[\"']\s*/")
SKIP = {".git", ".venv", ".cache", "bench-results", "__pycache__", ".pytest_cache"}


def _repository_files() -> list[Path]:
    if (ROOT / ".git").exists():
        out = subprocess.run(
            ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
            cwd=ROOT,
            capture_output=True,
            check=True,
        ).stdout
        return [ROOT / name for name in out.decode().split("\0") if name]
    # an exported tree without git: every file outside the build and cache folders
    return [p for p in ROOT.rglob("*") if p.is_file() and not SKIP & set(p.relative_to(ROOT).parts)]


def test_no_file_refers_to_a_sibling_folder() -> None:
    files = _repository_files()
    assert any(p.name == "pyproject.toml" for p in files)
    offenders = [str(p.relative_to(ROOT)) for p in files if p.exists() and SIBLING.search(p.read_bytes())]
    assert offenders == [], (
        f"these files reach for a folder beside the checkout, which a user's machine does not have: {offenders}"
    )
