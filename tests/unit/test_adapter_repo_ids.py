"""An adapter named by its Hugging Face repo id, as vLLM takes one (``lora_path: "org/name"``,
``--lora-modules sql=org/name``): dlora reads local directories only, and says so."""

from __future__ import annotations

from pathlib import Path

import pytest

from dlora.model.config import ModelConfig
from dlora.model.make_tiny import TinyOutput
from dlora.services.gateway.admin import check_adapter, lora_roots
from dlora.services.gateway.openai import APIError

HINT = "a Hugging Face repo id is not downloaded"


@pytest.mark.parametrize("where", ["gateway", "dlora up"])
def test_a_repo_id_is_refused_saying_repos_are_not_downloaded(
    engine_cfg: ModelConfig, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, where: str
) -> None:
    """It was refused as "outside the adapter roots" (the gateway) or "not a directory" (`dlora up`,
    which adds the path's folder): a vLLM user added the roots, and was refused again."""
    monkeypatch.chdir(tmp_path)
    roots = [str(tmp_path / "adapters")] if where == "gateway" else lora_roots(["acme/sql-lora"])
    with pytest.raises(APIError, match=HINT) as e:
        check_adapter("sql", "acme/sql-lora", roots, "model", engine_cfg)
    assert e.value.status == 400 and e.value.param == "path" and "acme/sql-lora" in e.value.message


def test_paths_that_are_no_repo_id_get_no_such_hint(
    tiny_llama: TinyOutput, engine_cfg: ModelConfig, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    for path in ("/srv/acme/sql-lora", "./acme/sql-lora", "sql-lora", "a/b/c"):
        with pytest.raises(APIError) as e:
            check_adapter("sql", path, [str(tmp_path / "adapters")], "model", engine_cfg)
        assert HINT not in e.value.message, path
    # a local directory that happens to be named as a repo is read as one
    (tmp_path / "acme").mkdir()
    (tmp_path / "acme" / "sql-lora").symlink_to(tiny_llama.adapters["lora-0"].resolve(), target_is_directory=True)
    roots = [str(tiny_llama.adapters_dir)]
    assert check_adapter("sql", "acme/sql-lora", roots, "model", engine_cfg).rank > 0
