"""The source tree's folders as packages: none shadows an installed module, and make gpu-check
lays them out under ``dlora`` as pip installs them."""

from __future__ import annotations

from importlib.metadata import packages_distributions
from pathlib import Path

from dlora.loadgen import gpu_check

ROOT = Path(__file__).resolve().parents[2]


def test_no_top_level_folder_shares_a_name_with_an_installed_module() -> None:
    """pytest's rootdir, ``python -m`` from the root and gpu-check's PYTHONPATH put the root on
    sys.path ahead of site-packages: a package folder there named like an installed module hides
    it (a ``kernels/`` folder hid Hugging Face's ``kernels``, which transformers 5.25 imports)."""
    installed = set(packages_distributions())
    folders = {p.name for p in ROOT.iterdir() if (p / "__init__.py").exists()}
    assert folders and not folders & installed, folders & installed


def test_gpu_check_links_each_package_under_its_installed_name(tmp_path: Path) -> None:
    gpu_check.lay_out(ROOT, tmp_path)
    links = {p.name: p.resolve() for p in (tmp_path / "dlora").iterdir()}
    assert links["kernels"] == ROOT / "dlora_kernels"
    assert links["common"] == ROOT / "common"
    assert all((target / "__init__.py").exists() for target in links.values())
    gpu_check.lay_out(ROOT, tmp_path)  # again: the links stand
    assert {p.name: p.resolve() for p in (tmp_path / "dlora").iterdir()} == links
