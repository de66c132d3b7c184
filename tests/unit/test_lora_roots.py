"""The adapter roots `dlora up --lora NAME=DIR` adds, so that the adapters it was given register."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import pytest

from dlora.model.config import ModelConfig
from dlora.model.make_tiny import TinyOutput
from dlora.services.gateway.admin import check_adapter, lora_roots
from dlora.services.gateway.openai import APIError


def _as_in_the_hub_cache(adapter: Path, cache: Path, repo: str) -> Path:
    """``adapter`` laid out as huggingface_hub downloads it: files named by digest under the repo's
    ``blobs``, linked from ``snapshots/<commit>``; the snapshot's directory."""
    folder = cache / f"models--{repo.replace('/', '--')}"
    snapshot = folder / "snapshots" / "0123abcd"
    (folder / "blobs").mkdir(parents=True)
    snapshot.mkdir(parents=True)
    for file in adapter.iterdir():
        digest = hashlib.sha256(file.read_bytes()).hexdigest()
        shutil.copyfile(file, folder / "blobs" / digest)
        (snapshot / file.name).symlink_to(Path("../../blobs") / digest)
    return snapshot


def test_an_adapter_in_the_hub_cache_given_to_dlora_up_registers(
    tiny_llama: TinyOutput, engine_cfg: ModelConfig, tmp_path: Path
) -> None:
    """`dlora up --lora sql=~/.cache/huggingface/hub/models--acme--sql/snapshots/<commit>` (the path
    vLLM's --lora-modules takes): its files link to ../../blobs, outside the snapshots folder that
    was added as the root, so registration refused every file and `dlora up` did not start."""
    source = tiny_llama.adapters["lora-0"]
    snapshot = _as_in_the_hub_cache(source, tmp_path / "hub", "acme/sql")
    _as_in_the_hub_cache(source, tmp_path / "hub", "acme/other")
    roots = lora_roots([str(snapshot)])
    assert roots == [str(tmp_path / "hub" / "models--acme--sql")]  # the repo's folder, not the whole cache
    entry = check_adapter("sql", str(snapshot), roots, "model", engine_cfg)
    assert entry.version == check_adapter("same", str(source), [str(source.parent)], "model", engine_cfg).version


def test_other_adapter_directories_add_their_own_folder(tiny_llama: TinyOutput, tmp_path: Path) -> None:
    plain = tmp_path / "snapshots" / "mine"  # a folder named so, but not the hub cache's (no blobs beside)
    shutil.copytree(tiny_llama.adapters["lora-1"], plain)
    assert lora_roots([str(plain), str(tiny_llama.adapters["lora-0"])]) == sorted(
        [str(tmp_path / "snapshots"), str(tiny_llama.adapters_dir.resolve())]
    )

    # directly under /: itself, not every folder of the host (its parent)
    assert lora_roots(["/adapter-at-the-top"]) == ["/adapter-at-the-top"]


def test_a_link_out_of_a_hub_snapshot_is_still_refused(
    tiny_llama: TinyOutput, engine_cfg: ModelConfig, tmp_path: Path
) -> None:
    snapshot = _as_in_the_hub_cache(tiny_llama.adapters["lora-0"], tmp_path / "hub", "acme/sql")
    outside = tmp_path / "outside.json"
    shutil.copyfile(snapshot / "adapter_config.json", outside)
    (snapshot / "adapter_config.json").unlink()
    (snapshot / "adapter_config.json").symlink_to(outside)
    with pytest.raises(APIError, match="outside the configured adapter roots"):
        check_adapter("sql", str(snapshot), lora_roots([str(snapshot)]), "model", engine_cfg)
