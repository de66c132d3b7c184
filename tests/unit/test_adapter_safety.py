"""Adapter files as untrusted input (issue 16, item 3): every file resolved and confined to the
roots, only regular files of bounded size, float weights within the rank limit, finite and sane
values and scalings. Each refusal is an AdapterError naming the file and the problem, the same at
registration (the gateway's ``check_adapter``, a 400) and when a worker loads the files
(``load_adapter``)."""

from __future__ import annotations

import json
import os
import shutil
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

from dlora.model.adapters import AdapterError, AdapterLimits, content_digest, inspect_adapter
from dlora.model.config import ModelConfig
from dlora.services.gateway.admin import check_adapter
from dlora.services.gateway.openai import APIError
from dlora.services.worker.engine.lora import load_adapter

CONFIG, WEIGHTS = "adapter_config.json", "adapter_model.safetensors"


def _register(path: Path, root: Path, cfg: ModelConfig, limits: AdapterLimits | None = None) -> str:
    """What the gateway answers: the entry's version, or raises APIError."""
    return check_adapter("a", str(path), [str(root)], "model", cfg, limits).version


def _refused_everywhere(path: Path, root: Path, cfg: ModelConfig, fragment: str, **limits: int | float) -> None:
    """Refused at registration with a 400 and by the worker's loader, both saying ``fragment``."""
    lim = AdapterLimits(**limits)
    with pytest.raises(APIError, match=fragment) as e:
        _register(path, root, cfg, lim)
    assert e.value.status == 400
    with pytest.raises(AdapterError, match=fragment):
        load_adapter("a", path, cfg, lim)


def _edit_tensors(path: Path, fn: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]]) -> None:
    tensors = load_file(str(path / WEIGHTS))
    save_file({k: v.contiguous() for k, v in fn(tensors).items()}, str(path / WEIGHTS))


def _set_first(path: Path, part: str, value: float, dtype: torch.dtype | None = None) -> None:
    """One value of the first tensor whose name has ``part``, the whole file cast to ``dtype``."""

    def edit(t: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        t = {k: v.to(dtype or v.dtype) for k, v in t.items()}
        t[next(k for k in sorted(t) if part in k)][0, 0] = value
        return t

    _edit_tensors(path, edit)


def _edit_config_text(path: Path, key: str, raw: str) -> None:
    """Set ``key`` to a raw JSON token (NaN and Infinity are what Python's json writes and reads)."""
    conf = json.loads((path / CONFIG).read_text())
    conf[key] = "__RAW__"
    (path / CONFIG).write_text(json.dumps(conf).replace('"__RAW__"', raw))


# ---- where the files are ----------------------------------------------------------------------
@pytest.mark.parametrize("file", [CONFIG, WEIGHTS])
def test_a_file_that_links_out_of_the_roots_is_refused(adapter: Path, root: Path, engine_cfg, file: str) -> None:
    outside = root.parent / "outside"
    outside.mkdir()
    shutil.move(adapter / file, outside / file)
    (adapter / file).symlink_to(outside / file)
    with pytest.raises(
        APIError, match=f"{file} resolves to .*outside/{file}, outside the configured adapter roots"
    ) as e:
        _register(adapter, root, engine_cfg)
    assert e.value.status == 400


def test_links_that_stay_inside_a_root_are_followed(adapter: Path, root: Path, engine_cfg) -> None:
    """The Hugging Face cache's layout: snapshot files link to blobs elsewhere in the cache."""
    before = _register(adapter, root, engine_cfg)
    blobs = root / "blobs"
    blobs.mkdir()
    for file in (CONFIG, WEIGHTS):
        shutil.move(adapter / file, blobs / file)
        (adapter / file).symlink_to(Path("..") / "blobs" / file)
    assert _register(adapter, root, engine_cfg) == before


def test_a_directory_reached_through_a_link_out_of_the_roots_is_refused(
    adapter: Path, root: Path, engine_cfg, tmp_path: Path
) -> None:
    outside = Path(shutil.move(adapter, tmp_path / "outside"))
    (root / "a").symlink_to(outside, target_is_directory=True)
    with pytest.raises(APIError, match="outside the adapter roots .*adapter_roots") as e:
        _register(root / "a", root, engine_cfg)
    assert e.value.status == 400
    # the way it names to add a root is one `dlora up` takes (`--lora DIR` is refused: NAME=DIR)
    assert "`dlora up --lora NAME=DIR` adds DIR's folder" in e.value.message
    (root / "b").symlink_to(root / "a")  # a chain of links ends where the last one points
    with pytest.raises(APIError, match="outside the adapter roots"):
        _register(root / "b", root, engine_cfg)


def test_a_directory_swapped_for_a_link_out_after_the_check_is_refused(
    adapter: Path, root: Path, engine_cfg, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A symlink swapped in after the check (TOCTOU, the kind of every 'realpath then open' report):
    the file was resolved inside the root, then its directory became a link out, and stat and
    open both followed the link (O_NOFOLLOW guards only the last component): the gateway read a
    file outside the roots. Where the opened file really is is checked now."""
    outside = Path(shutil.copytree(adapter, tmp_path / "outside"))
    real_stat, swapped = os.stat, []

    def stat_after_a_swap(path, *args, **kwargs):  # type: ignore[no-untyped-def]
        if not swapped and str(path) == str(adapter / CONFIG):
            swapped.append(shutil.move(adapter, root / "moved"))
            adapter.symlink_to(outside, target_is_directory=True)
        return real_stat(path, *args, **kwargs)

    monkeypatch.setattr(os, "stat", stat_after_a_swap)
    with pytest.raises(APIError, match=f"{CONFIG} resolves to .*outside/{CONFIG}, outside the configured") as e:
        check_adapter("a", str(adapter), [str(root)], "model", engine_cfg)
    assert swapped and e.value.status == 400


@pytest.mark.timeout(30)  # a FIFO opened for reading blocks until a writer comes: it must not be
@pytest.mark.parametrize("file", [CONFIG, WEIGHTS])
def test_a_fifo_is_refused_without_blocking(adapter: Path, root: Path, engine_cfg, file: str) -> None:
    (adapter / file).unlink()
    os.mkfifo(adapter / file)
    _refused_everywhere(adapter, root, engine_cfg, f"{file} is not a regular file \\(a FIFO\\)")


@pytest.mark.timeout(30)
def test_a_device_is_refused(adapter: Path, engine_cfg) -> None:
    """The worker reads without roots (it loads what the gateway checked); /dev/zero never ends."""
    (adapter / WEIGHTS).unlink()
    (adapter / WEIGHTS).symlink_to("/dev/zero")
    with pytest.raises(AdapterError, match=f"{WEIGHTS} is not a regular file \\(a character device\\)"):
        load_adapter("a", adapter, engine_cfg)


def test_a_directory_in_a_files_place_is_refused(adapter: Path, root: Path, engine_cfg) -> None:
    (adapter / CONFIG).unlink()
    (adapter / CONFIG).mkdir()
    _refused_everywhere(adapter, root, engine_cfg, f"{CONFIG} is not a regular file \\(a directory\\)")


def test_a_file_over_the_size_limit_is_refused(adapter: Path, root: Path, engine_cfg) -> None:
    size = (adapter / WEIGHTS).stat().st_size
    _refused_everywhere(adapter, root, engine_cfg, f"{WEIGHTS} is {size} bytes, above the limit", max_file_bytes=1000)
    assert _register(adapter, root, engine_cfg, AdapterLimits(max_file_bytes=size))


def test_a_huge_config_is_refused(adapter: Path, root: Path, engine_cfg) -> None:
    conf = json.loads((adapter / CONFIG).read_text())
    (adapter / CONFIG).write_text(json.dumps({**conf, "base_model_name_or_path": "x" * (2 << 20)}))
    _refused_everywhere(adapter, root, engine_cfg, f"{CONFIG} is \\d+ bytes, above the limit")


# ---- what the weights are ---------------------------------------------------------------------
@pytest.mark.parametrize(
    ("dtype", "name"), [(torch.int32, "I32"), (torch.float64, "F64"), (torch.int8, "I8"), (torch.bool, "BOOL")]
)
def test_weights_that_are_not_fp32_fp16_or_bf16_are_refused(
    adapter: Path, root: Path, engine_cfg, dtype: torch.dtype, name: str
) -> None:
    _edit_tensors(adapter, lambda t: {k: v.to(dtype) for k, v in t.items()})
    _refused_everywhere(adapter, root, engine_cfg, f"{WEIGHTS}: tensor '.*' has dtype {name}; LoRA weights must be")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_half_precision_weights_are_served(adapter: Path, root: Path, engine_cfg, dtype: torch.dtype) -> None:
    _edit_tensors(adapter, lambda t: {k: v.to(dtype) for k, v in t.items()})
    assert _register(adapter, root, engine_cfg)
    assert next(iter(load_adapter("a", adapter, engine_cfg).weights.values())).a.dtype == dtype


BAD_VALUES = {
    "NaN": ("lora_A", float("nan"), None, "holds NaN"),
    "Inf": ("lora_B", float("inf"), None, "holds Inf"),
    "-Inf": ("lora_A", float("-inf"), None, "holds Inf"),
    "NaN in bf16": ("lora_B", float("nan"), torch.bfloat16, "holds NaN"),
    "Inf in fp16": ("lora_A", float("inf"), torch.float16, "holds Inf"),
    "huge": ("lora_B", 3e6, None, "holds a value of magnitude 3e\\+06, above max_abs_weight=10000"),
    "huge negative in bf16": ("lora_A", -1e20, torch.bfloat16, "holds a value of magnitude 9.97e\\+19, above"),
}


@pytest.mark.parametrize("case", BAD_VALUES)
def test_non_finite_or_huge_weights_are_refused(adapter: Path, root: Path, engine_cfg, case: str) -> None:
    part, value, dtype, fragment = BAD_VALUES[case]
    _set_first(adapter, part, value, dtype)
    _refused_everywhere(adapter, root, engine_cfg, f"{WEIGHTS}: tensor '.*{part}.*' {fragment}")


def test_the_magnitude_limit_is_a_setting(adapter: Path, root: Path, engine_cfg) -> None:
    _set_first(adapter, "lora_B", 50.0)
    assert _register(adapter, root, engine_cfg)
    _refused_everywhere(adapter, root, engine_cfg, "magnitude 50, above max_abs_weight=10", max_abs_weight=10)


def test_rank_over_the_limit_is_refused(adapter: Path, root: Path, engine_cfg) -> None:
    _refused_everywhere(adapter, root, engine_cfg, "rank 8 is above max_lora_rank=4", max_lora_rank=4)
    assert _register(adapter, root, engine_cfg, AdapterLimits(max_lora_rank=8))


def test_header_offsets_that_do_not_fit_the_shape_are_refused(adapter: Path, root: Path, engine_cfg) -> None:
    """The values are read where the header says: a header lying about them is refused, not read."""
    data = (adapter / WEIGHTS).read_bytes()
    (size,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + size])
    key = next(k for k in sorted(header) if "lora_A" in k)
    header[key]["data_offsets"][1] += 4
    text = json.dumps(header).encode()
    (adapter / WEIGHTS).write_bytes(struct.pack("<Q", len(text)) + text + data[8 + size :])
    _refused_everywhere(adapter, root, engine_cfg, f"cannot read .*{WEIGHTS} .*invalid shape, data type, or offset")


def _rewrite_header(path: Path, edit: Callable[[dict[str, Any]], None], tail: bytes = b"") -> None:
    data = (path / WEIGHTS).read_bytes()
    (size,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + size])
    edit(header)
    text = json.dumps(header).encode()
    (path / WEIGHTS).write_bytes(struct.pack("<Q", len(text)) + text + data[8 + size :] + tail)


def _same_offsets(header: dict[str, Any]) -> None:
    a, b = sorted(k for k in header if "q_proj.lora_A" in k)[:2]  # two layers' (one shape)
    header[b]["data_offsets"] = header[a]["data_offsets"]


@pytest.mark.parametrize(
    ("edit", "tail", "fragment"),
    [
        (lambda h: None, b"\0" * 64, "incomplete metadata, file not fully covered"),
        (_same_offsets, b"", "invalid offset for tensor"),
        (lambda h: h.update({"__metadata__": {"format": "pt", "step": 5}}), b"", "integer `5`, expected a string"),
    ],
)
def test_files_safetensors_own_loader_refuses_are_refused_at_registration(
    adapter: Path, root: Path, engine_cfg, edit: Callable[[dict[str, Any]], None], tail: bytes, fragment: str
) -> None:
    """A helper's finding: bytes after the data, two tensors at one offset, a number in
    ``__metadata__`` passed the gateway's reading of the header and failed every worker's
    (safetensors' loader), and each request was told the files had changed since."""
    _rewrite_header(adapter, edit, tail)
    _refused_everywhere(adapter, root, engine_cfg, fragment)


def test_tensors_that_do_not_fit_the_base_or_are_unexpected_or_missing_are_refused(
    adapter: Path, root: Path, engine_cfg
) -> None:
    shutil.copytree(adapter, root / "b")
    _edit_tensors(adapter, lambda t: {k: (v[:, :-1] if "q_proj.lora_A" in k else v) for k, v in t.items()})
    _refused_everywhere(adapter, root, engine_cfg, "do not fit the base")
    shutil.copytree(root / "b", root / "c")
    _edit_tensors(root / "b", lambda t: {**t, "base_model.model.model.norm.lora_A.weight": torch.zeros(8, 64)})
    _refused_everywhere(root / "b", root, engine_cfg, "is not a LoRA weight")
    _edit_tensors(root / "c", lambda t: {k: v for k, v in t.items() if not k.endswith("q_proj.lora_B.weight")})
    _refused_everywhere(root / "c", root, engine_cfg, "has lora_A but not both")


@pytest.mark.parametrize(
    ("extra", "fragment"),
    [
        # another part's layers (a multimodal model's vision tower): peft loads none of them into
        # this model; they overwrote the language model's layer-0 q_proj (vLLM #34186's kind)
        ("base_model.model.model.vision_tower.layers.0.self_attn.q_proj", "not a LoRA weight .* language model"),
        # the same module under the two namings: which one is meant cannot be told
        ("model.layers.0.self_attn.q_proj", "are the same LoRA weight"),
    ],
)
def test_tensors_of_another_part_or_twice_for_one_module_are_refused(
    adapter: Path, root: Path, engine_cfg, extra: str, fragment: str
) -> None:
    def add(t: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        own = "base_model.model.model.layers.0.self_attn.q_proj"
        return {**t, **{f"{extra}.lora_{x}.weight": torch.zeros_like(t[f"{own}.lora_{x}.weight"]) for x in "AB"}}

    _edit_tensors(adapter, add)
    _refused_everywhere(adapter, root, engine_cfg, fragment)


# ---- the scaling --------------------------------------------------------------------------------
BAD_CONFIG = {
    "alpha NaN": ("lora_alpha", "NaN", "positive finite 'lora_alpha', not nan"),
    "alpha Infinity": ("lora_alpha", "Infinity", "positive finite 'lora_alpha', not inf"),
    "alpha zero": ("lora_alpha", "0", "positive finite 'lora_alpha', not 0"),
    "alpha negative": ("lora_alpha", "-16", "positive finite 'lora_alpha', not -16"),
    "alpha a huge integer": ("lora_alpha", "1" + "0" * 400, "positive finite 'lora_alpha'"),
    "alpha huge": ("lora_alpha", "1e6", "= 1e\\+06 / 8 = 125000 is not in \\(0, max_scale=1000\\]"),
    "alpha tiny": ("lora_alpha", "5e-324", "= 0 is not in \\(0, max_scale"),
    "r NaN": ("r", "NaN", "positive integer 'r', not nan"),
    "r a fraction": ("r", "8.5", "positive integer 'r', not 8.5"),
    "alpha_pattern Infinity": ("alpha_pattern", '{"q_proj": Infinity}', "alpha_pattern\\['q_proj'\\] must be"),
    "alpha_pattern NaN": ("alpha_pattern", '{"q_proj": NaN}', "alpha_pattern\\['q_proj'\\] must be"),
}


@pytest.mark.parametrize("case", BAD_CONFIG)
def test_non_finite_non_positive_or_huge_scalings_are_refused(adapter: Path, root: Path, engine_cfg, case: str) -> None:
    key, raw, fragment = BAD_CONFIG[case]
    _edit_config_text(adapter, key, raw)
    _refused_everywhere(adapter, root, engine_cfg, fragment)


def test_the_scale_limit_is_a_setting(adapter: Path, root: Path, engine_cfg) -> None:
    _refused_everywhere(adapter, root, engine_cfg, "= 16 / 8 = 2 is not in \\(0, max_scale=1\\]", max_scale=1.0)


# ---- the version ------------------------------------------------------------------------------
def test_the_digest_covers_both_files_and_nothing_else(adapter: Path, root: Path, engine_cfg) -> None:
    spec = inspect_adapter("a", adapter, engine_cfg)
    assert spec.digest == content_digest((adapter / CONFIG).read_bytes(), (adapter / WEIGHTS).read_bytes())
    # and what reading it reads, which prices a read of it (``read_price``)
    assert spec.file_bytes == (adapter / CONFIG).stat().st_size + (adapter / WEIGHTS).stat().st_size
    copy = Path(shutil.copytree(adapter, root / "copy"))
    (copy / "README.md").write_text("not read, not in the version")
    assert inspect_adapter("b", copy, engine_cfg).digest == spec.digest
    (copy / CONFIG).write_text((copy / CONFIG).read_text() + " ")  # the same config, other bytes
    assert inspect_adapter("b", copy, engine_cfg).digest not in (spec.digest, "")
    shutil.copy(adapter / CONFIG, copy / CONFIG)
    _set_first(copy, "lora_B", 0.125)
    assert inspect_adapter("b", copy, engine_cfg).digest != spec.digest
    # bytes moved from one file to the other make another digest
    assert content_digest(b"ab", b"c") != content_digest(b"a", b"bc")


def test_limits_settings_are_checked() -> None:
    bad = AdapterLimits(max_lora_rank=0, max_file_bytes=0, max_abs_weight=float("nan"), max_scale=-1).check()
    assert [f for f, _, _ in bad] == ["max_lora_rank", "max_file_bytes", "max_abs_weight", "max_scale"]
    assert AdapterLimits(max_abs_weight=float("inf")).check() == []


@pytest.mark.parametrize(
    "name", ["a..", "z.", "x..y", "newl\n", ".a", "", "a" * 129, "a//b", "/a", "a/", "a/.b", "_x", "-x", "lo ra"]
)
def test_names_the_durable_registry_cannot_key_are_refused(adapter: Path, root: Path, engine_cfg, name: str) -> None:
    """SGLang #28864's kind: a name that passed the check but not the NATS key-value store's keys
    (an empty token, a trailing newline `$` let through) was half registered behind a 503."""
    with pytest.raises(APIError, match="adapter name") as e:
        check_adapter(name, str(adapter), [str(root)], "model", engine_cfg)
    assert (e.value.status, e.value.param) == (400, "name")


@pytest.mark.parametrize("name", ["a", "lora-0", "a.b.c", "A_1-x.y", "a" * 128, "org/sql-lora", "Qwen/Qwen2.5-7B-lora"])
def test_names_with_dots_or_slashes_between_characters_are_taken(
    adapter: Path, root: Path, engine_cfg, name: str
) -> None:
    assert check_adapter(name, str(adapter), [str(root)], "model", engine_cfg).name == name


def test_a_path_under_home_written_with_a_tilde_is_expanded(
    adapter: Path, root: Path, engine_cfg, monkeypatch: pytest.MonkeyPatch
) -> None:
    """vLLM's get_adapter_absolute_path expands "~"; here it was "outside the adapter roots" (a helper)."""
    monkeypatch.setenv("HOME", str(root.parent))
    assert _register(Path("~") / root.name / adapter.relative_to(root), root, engine_cfg) == _register(
        adapter, root, engine_cfg
    )


def test_a_root_written_with_a_tilde_is_expanded_for_the_files_too(
    adapter: Path, root: Path, engine_cfg, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The path's check expanded a root's "~", the files' check did not: refused as outside (a review)."""
    monkeypatch.setenv("HOME", str(root.parent))
    tilde_root = str(Path("~") / root.name)
    entry = check_adapter("a", str(adapter), [tilde_root], "model", engine_cfg)
    assert entry.version == _register(adapter, root, engine_cfg)


@pytest.mark.parametrize("path", ["loop", "~no-such-user-h3/a"])
def test_a_loop_of_links_or_an_unknown_users_home_is_a_400(root: Path, engine_cfg, path: str) -> None:
    """Python raises RuntimeError for both (no strerror): the handler's own message raised (a 500)."""
    (root / "loop").symlink_to(root / "loop")
    with pytest.raises(APIError, match="cannot be read") as e:
        check_adapter("a", path if path.startswith("~") else str(root / path), [str(root)], "model", engine_cfg)
    assert (e.value.status, e.value.param) == (400, "path")
