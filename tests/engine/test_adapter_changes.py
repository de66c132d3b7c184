"""A worker loads an adapter only as it was registered: the version the gateway recorded is the
digest of every file it read (and their size), and a worker whose files differ (config or
weights) refuses them with a reason instead of serving other weights under that version; what
failed is not read again for each request."""

from __future__ import annotations

import asyncio
import json
import shutil
from pathlib import Path

import msgspec
import pytest

from dlora.common.messages import AdapterEntry
from dlora.model.adapters import AdapterError, AdapterLimits, AdapterOverLimit
from dlora.model.config import ModelConfig
from dlora.model.make_tiny import TinyOutput
from dlora.services.gateway.admin import check_adapter
from dlora.services.worker.adapters import (
    FAILED_MEMORY_S,
    AdapterChanged,
    WorkerAdapters,
)
from tests.engine.helpers import make_engine


class _Registry:
    """The one registry call ``WorkerAdapters.load`` makes, over one entry."""

    def __init__(self, entry: AdapterEntry) -> None:
        self.entry = entry

    async def get_adapter(self, name: str, version: str | None = None) -> AdapterEntry | None:
        return self.entry if name == self.entry.name and version in (None, self.entry.version) else None


async def test_a_worker_refuses_files_changed_since_registration(tiny_llama: TinyOutput, tmp_path: Path) -> None:
    path = Path(shutil.copytree(tiny_llama.adapters["lora-0"], tmp_path / "x"))
    entry = check_adapter("x", str(path), [str(tmp_path)], "model", ModelConfig.from_dir(tiny_llama.model))
    files = ("adapter_config.json", "adapter_model.safetensors")
    assert entry.file_bytes == sum((path / f).stat().st_size for f in files)  # what a read of it reads
    engine = make_engine(tiny_llama)
    now = [0.0]
    worker = WorkerAdapters(engine, _Registry(entry), clock=lambda: now[0])
    originals = {f: (path / f).read_bytes() for f in ("adapter_config.json", "adapter_model.safetensors")}

    conf = json.loads(originals["adapter_config.json"])
    changes = {
        # a valid adapter still, with another scaling: only the digest tells
        "adapter_config.json": json.dumps({**conf, "lora_alpha": conf["lora_alpha"] + 1}).encode(),
        "adapter_model.safetensors": originals["adapter_model.safetensors"][:-4] + b"\0\0\0\0",
    }
    for file, changed in changes.items():
        (path / file).write_bytes(changed)
        with pytest.raises(AdapterChanged, match=f"files in {path} changed since version {entry.version}"):
            await worker.load("x", entry.version)
        assert not any(k.startswith("x@") for k in engine.adapters), file
        (path / file).write_bytes(originals[file])
        now[0] += FAILED_MEMORY_S  # a failure is not tried again before
    key = await worker.load("x", entry.version)
    assert key == f"x@{entry.version}" and engine.adapters[key].digest == entry.version


async def test_files_of_another_size_are_told_changed_without_being_read(
    tiny_llama: TinyOutput, tmp_path: Path
) -> None:
    """A security trial: a registered version's weights swapped for a link to a large file were read
    whole (up to max_file_bytes, 4 GiB) by each worker a request reached before their digest told
    them apart. Their size tells first: no read."""
    path = Path(shutil.copytree(tiny_llama.adapters["lora-0"], tmp_path / "x"))
    entry = check_adapter("x", str(path), [str(tmp_path)], "model", ModelConfig.from_dir(tiny_llama.model))
    engine = make_engine(tiny_llama)
    reads: list[str] = []
    read = engine.read_adapter
    engine.read_adapter = lambda key, where: reads.append(key) or read(key, where)  # type: ignore[method-assign]
    large = tmp_path / "large"
    with large.open("wb") as f:
        f.truncate(1 << 30)  # sparse: 1 GiB read, none written
    (path / "adapter_model.safetensors").unlink()
    (path / "adapter_model.safetensors").symlink_to(large)
    then = rf"changed since version {entry.version} was registered \(they are now \d+ bytes, {entry.file_bytes} then\)"
    with pytest.raises(AdapterChanged, match=then):
        await WorkerAdapters(engine, _Registry(entry)).load("x", entry.version)
    assert reads == []


async def test_files_only_this_workers_limits_refuse_are_no_change_of_version(
    tiny_llama: TinyOutput, tmp_path: Path
) -> None:
    """A review: a worker whose max_lora_rank (or roots, or size limit) refuses a registered
    version called it files changed since, and the client was told an admin must load it again.
    It is the worker's limit, said as such (a plain AdapterError, not handed on)."""
    path = Path(shutil.copytree(tiny_llama.adapters["lora-0"], tmp_path / "x"))
    entry = check_adapter("x", str(path), [str(tmp_path)], "model", ModelConfig.from_dir(tiny_llama.model))
    rank = json.loads((path / "adapter_config.json").read_text())["r"]
    engine = make_engine(tiny_llama)
    engine.config = msgspec.structs.replace(engine.config, adapter_limits=AdapterLimits(max_lora_rank=rank - 1))
    worker = WorkerAdapters(engine, _Registry(entry))
    with pytest.raises(AdapterError, match=f"above max_lora_rank={rank - 1}") as e:
        await worker.load("x", entry.version)
    assert not isinstance(e.value, AdapterChanged)
    assert isinstance(e.value, AdapterOverLimit)  # (kept: its request is answered 400, not 500)
    # Files rewritten since as well: that is said first (an admin must load them again), and the
    # request goes on only to a worker holding the version.
    conf = json.loads((path / "adapter_config.json").read_text())
    (path / "adapter_config.json").write_text(json.dumps({**conf, "lora_alpha": conf["lora_alpha"] + 1}))
    worker = WorkerAdapters(engine, _Registry(entry))
    with pytest.raises(AdapterChanged, match=f"files in {path} changed since version {entry.version}"):
        await worker.load("x", entry.version)


async def test_the_registered_versions_own_files_that_do_not_load_are_no_change_of_version(
    tiny_llama: TinyOutput, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A helper's finding: files the gateway's check passed and safetensors' loader refused (the
    check now refuses the same; a newer loader may be stricter still) were told to every request
    as files changed since registration, which loading them again cannot mend. The loader's
    reason is said, as a plain AdapterError."""
    from safetensors import SafetensorError

    import dlora.services.worker.engine.lora as lora

    path = Path(shutil.copytree(tiny_llama.adapters["lora-0"], tmp_path / "x"))
    entry = check_adapter("x", str(path), [str(tmp_path)], "model", ModelConfig.from_dir(tiny_llama.model))

    def stricter(data: bytes) -> None:
        raise SafetensorError("Error while deserializing: a rule of a newer safetensors")

    worker = WorkerAdapters(make_engine(tiny_llama), _Registry(entry))
    monkeypatch.setattr(lora, "load", stricter)
    with pytest.raises(AdapterError, match="adapter 'x': cannot read .* a rule of a newer safetensors") as e:
        await worker.load("x", entry.version)
    assert not isinstance(e.value, AdapterChanged)


async def test_a_version_that_failed_is_not_read_again_for_each_request(tiny_llama: TinyOutput, tmp_path: Path) -> None:
    """A user's trial: every request for an adapter whose files broke after registration read and
    hashed them again (20 requests, 20 reads; a real adapter is hundreds of MB). The failure is
    kept FAILED_MEMORY_S, the same reason given; after it the files are read again (they may be
    whole again), and the reason names the adapter, not the engine's key for its version."""
    path = Path(shutil.copytree(tiny_llama.adapters["lora-0"], tmp_path / "x"))
    entry = check_adapter("x", str(path), [str(tmp_path)], "model", ModelConfig.from_dir(tiny_llama.model))
    (path / "adapter_config.json").unlink()
    engine = make_engine(tiny_llama)
    now = [0.0]
    worker = WorkerAdapters(engine, _Registry(entry), clock=lambda: now[0])
    reads = []
    read = engine.read_adapter
    engine.read_adapter = lambda *a, **k: reads.append(a) or read(*a, **k)  # type: ignore[method-assign]
    for t in (0.0, 1.0, FAILED_MEMORY_S - 0.1):
        now[0] = t
        with pytest.raises(AdapterError, match="adapter_config.json") as e:
            await worker.load("x", entry.version)
        assert "x@" not in str(e.value) and isinstance(e.value, AdapterChanged)  # its files went
    assert len(reads) == 1
    shutil.copyfile(tiny_llama.adapters["lora-0"] / "adapter_config.json", path / "adapter_config.json")
    now[0] = FAILED_MEMORY_S + 0.1
    assert await worker.load("x", entry.version) == f"x@{entry.version}" and len(reads) == 2
    assert not worker.failed


async def test_a_version_whose_files_are_half_rewritten_is_changed_and_its_failure_holds_no_weights(
    tiny_llama: TinyOutput, tmp_path: Path
) -> None:
    """A review: files a trainer is still writing fail to parse (not a digest mismatch), which
    answered 500 where another worker held the version; and the failure memory kept the error, whose
    traceback held the loaded weights. A version's files loaded whole at registration, so any
    failure to load them now is AdapterChanged (handed on); the memory keeps its class and reason."""
    path = Path(shutil.copytree(tiny_llama.adapters["lora-0"], tmp_path / "x"))
    entry = check_adapter("x", str(path), [str(tmp_path)], "model", ModelConfig.from_dir(tiny_llama.model))
    (path / "adapter_model.safetensors").write_bytes(b"half")
    worker = WorkerAdapters(make_engine(tiny_llama), _Registry(entry))
    for _ in range(2):
        with pytest.raises(AdapterChanged, match="'x'"):
            await worker.load("x", entry.version)
    [(when, kind, reason)] = worker.failed.values()
    assert kind is AdapterChanged and isinstance(reason, str)
    worker.changed("x", "another")  # registered again: its old failure is not the new one's
    assert not worker.failed


async def test_a_version_a_prefetch_could_not_load_is_not_read_again_each_placement(
    tiny_llama: TinyOutput, tmp_path: Path
) -> None:
    """A user's trial: after an adapter's files changed, each worker logged "prefetch failed" at
    every placement (34 lines in 85 s), reading the files again each time. Once is enough; a
    request for it is told why."""
    path = Path(shutil.copytree(tiny_llama.adapters["lora-0"], tmp_path / "x"))
    entry = check_adapter("x", str(path), [str(tmp_path)], "model", ModelConfig.from_dir(tiny_llama.model))
    (path / "adapter_model.safetensors").write_bytes((path / "adapter_model.safetensors").read_bytes()[:-4] + b"\0" * 4)
    engine = make_engine(tiny_llama)
    worker = WorkerAdapters(engine, _Registry(entry))
    reads = []
    read = engine.read_adapter
    engine.read_adapter = lambda *a, **k: reads.append(a) or read(*a, **k)  # type: ignore[method-assign]
    for _ in range(3):
        await worker.prefetch(["x"])
        await asyncio.gather(*worker.reads.values())  # read beside the steps: its end awaited
    assert len(reads) == 1 and not any(k.startswith("x@") for k in engine.adapters)
    with pytest.raises(AdapterChanged, match="changed since version"):  # told why, without a read
        await worker.load("x", entry.version)  # within FAILED_MEMORY_S of the prefetch's
    assert len(reads) == 1


async def test_a_placement_prefetches_the_new_version_of_an_adapter_reloaded_in_place(
    tiny_llama: TinyOutput, tmp_path: Path
) -> None:
    """A helper's finding: after an in-place reload (new files, a new version) a worker still
    holding the old version for a request on it skipped the placement's prefetch by name, and the
    new version's first requests waited there for its read."""
    path = Path(shutil.copytree(tiny_llama.adapters["lora-0"], tmp_path / "x"))
    config = ModelConfig.from_dir(tiny_llama.model)
    old = check_adapter("x", str(path), [str(tmp_path)], "model", config)
    engine = make_engine(tiny_llama)
    registry = _Registry(old)
    worker = WorkerAdapters(engine, registry)
    key = await worker.load("x", old.version)
    conf = json.loads((path / "adapter_config.json").read_text())
    (path / "adapter_config.json").write_text(json.dumps({**conf, "lora_alpha": conf["lora_alpha"] + 1}))
    registry.entry = new = check_adapter("x", str(path), [str(tmp_path)], "model", config)
    worker.moved(key)  # a request on it moved away: the old version is kept a while
    worker.changed("x", new.version)
    assert key in engine.adapters
    await worker.prefetch(["x"])
    await asyncio.gather(*worker.reads.values())
    assert f"x@{new.version}" in engine.adapters
