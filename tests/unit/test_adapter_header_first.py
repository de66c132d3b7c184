"""An adapter's safetensors header is read and judged before its data: a file whose header is bad
(its length, its JSON, a dtype, a tensor's shape against its offsets) is refused, a 400 at
registration and an AdapterError at a worker's load, having read the header alone. The gateway read
the whole file (up to ``max_file_bytes``, 4 GiB by default) into memory before looking at it."""

from __future__ import annotations

import json
import math
import random
import struct
import tracemalloc
from pathlib import Path
from typing import Any

import pytest
from safetensors import deserialize

from dlora.model.adapter_files import read_header
from dlora.model.adapters import AdapterError, AdapterLimits
from dlora.services.gateway.admin import check_adapter
from dlora.services.gateway.openai import APIError
from dlora.services.worker.engine.lora import load_adapter

WEIGHTS = "adapter_model.safetensors"
DATA = 256 << 20  # the data a bad header claims: sparse on disk, but a whole read holds it


def _header(adapter: Path) -> dict[str, Any]:
    data = (adapter / WEIGHTS).read_bytes()
    (size,) = struct.unpack("<Q", data[:8])
    return dict(json.loads(data[8 : 8 + size]))


def _write(adapter: Path, head: bytes, data: int = DATA) -> None:
    """``head`` (the length and the header, or any bytes) followed by ``data`` zero bytes (a hole)."""
    with open(adapter / WEIGHTS, "wb") as f:
        f.write(head)
        f.truncate(len(head) + data)


def _prefixed(header: dict[str, Any]) -> bytes:
    text = json.dumps(header).encode()
    return struct.pack("<Q", len(text)) + text


def _bad_dtype(adapter: Path) -> bytes:
    header = _header(adapter)
    key = next(k for k in sorted(header) if "lora_A" in k)
    header[key]["dtype"] = "I8"
    return _prefixed(header)


def _lying_shape(adapter: Path) -> bytes:
    header = _header(adapter)
    key = next(k for k in sorted(header) if "lora_A" in k)
    header[key]["shape"] = [header[key]["shape"][0] + 1, header[key]["shape"][1]]
    return _prefixed(header)


def _past_the_end(adapter: Path) -> bytes:
    header = _header(adapter)
    key = next(k for k in sorted(header) if "lora_A" in k)
    header[key]["data_offsets"] = [DATA, DATA + 4 * math.prod(header[key]["shape"])]
    return _prefixed(header)


CASES = {
    # (within safetensors' 100 MB bound on a header, past this file's 64 MiB)
    "length past the file": (lambda a: struct.pack("<Q", 99_999_999) + b"{}", "invalid header length"),
    "length over safetensors' bound": (lambda a: struct.pack("<Q", 200_000_000) + b"{}", "header too large"),
    "not JSON": (lambda a: struct.pack("<Q", 7) + b"{oops: ", "not JSON"),
    "not UTF-8": (lambda a: struct.pack("<Q", 3) + b"\xff{}", "not UTF-8"),
    "a list": (lambda a: struct.pack("<Q", 2) + b"[]", "not a JSON object"),
    "a dtype no LoRA weight has": (_bad_dtype, "tensor '.*' has dtype I8; LoRA weights must be"),
    "a shape the offsets do not hold": (_lying_shape, "invalid shape, data type, or offset"),
    "offsets past the data": (_past_the_end, "offsets past the end of the data"),
}


@pytest.mark.parametrize("case", CASES)
def test_a_bad_header_is_refused_before_the_data_is_read(adapter: Path, root: Path, engine_cfg, case: str) -> None:
    make, fragment = CASES[case]
    _write(adapter, make(adapter), data=DATA // 4 if case == "length past the file" else DATA)
    limits = AdapterLimits(max_file_bytes=1 << 30)
    tracemalloc.start()
    try:
        with pytest.raises(APIError, match=fragment) as e:
            check_adapter("a", str(adapter), [str(root)], "model", engine_cfg, limits)
        with pytest.raises(AdapterError, match=fragment):
            load_adapter("a", adapter, engine_cfg, limits)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert e.value.status == 400
    assert peak < DATA // 16, f"{peak} bytes held to refuse it"


def test_a_file_shorter_than_a_length_is_refused(adapter: Path, root: Path, engine_cfg) -> None:
    _write(adapter, b"\x01\x00", data=0)
    with pytest.raises(APIError, match="header too small"):
        check_adapter("a", str(adapter), [str(root)], "model", engine_cfg)


def _random_file(rng: random.Random) -> tuple[bytes, int]:
    """A header of a few tensors, a random edit or none, and the data's size."""
    header: dict[str, Any] = {}
    at = 0
    for i in range(rng.randint(0, 3)):
        dtype = rng.choice(["F32", "F16", "BF16"])
        shape = [rng.randint(0, 3) for _ in range(rng.randint(0, 2))]
        n = math.prod(shape) * {"F32": 4}.get(dtype, 2)
        header[f"t{i}"] = {"dtype": dtype, "shape": shape, "data_offsets": [at, at + n]}
        at += n
    values: list[Any] = [0, 1, 2, 3, 4, 8, -1, 2.0, None, True, "8", [], {}, 2**70]
    key = rng.choice(sorted(header) or [None])
    kind = rng.randrange(8)
    if kind == 0 and key:
        header[key]["dtype"] = rng.choice(["F32", "F16", "BF16", "I8", "F64", "f32", 5, None])
    elif kind == 1 and key:
        header[key]["shape"] = [rng.choice(values) for _ in range(rng.randint(0, 2))]
    elif kind == 2 and key:
        header[key]["data_offsets"] = [rng.choice(values) for _ in range(rng.choice([1, 2, 3]))]
    elif kind == 3:
        at = max(0, at + rng.randint(-4, 4))
    elif kind == 4 and key:
        header[key].pop(rng.choice(["dtype", "shape", "data_offsets"]))
    elif kind == 5:
        header["__metadata__"] = rng.choice([None, {"a": "b"}, {"a": 1}, [], "x"])
    elif kind == 6 and key:
        header[key] = rng.choice(values)
    return _prefixed(header), at


def test_the_early_check_refuses_only_what_safetensors_refuses() -> None:
    """Every header ``read_header`` refuses, safetensors' own loader (run on the whole file after
    the read, as before) refuses too; it takes whatever the loader takes."""
    rng, early = random.Random(5), 0
    for _ in range(3000):
        head, size = _random_file(rng)
        try:
            deserialize(head + bytes(size))
            theirs = None
        except Exception as e:  # noqa: BLE001 - whatever the loader refuses with
            theirs = e
        try:
            read_header(head[8:], size)
            ours = None
        except ValueError as e:
            ours = e
        assert ours is None or theirs is not None, (head, size, ours)
        if theirs is None:
            assert ours is None, (head, size, ours)
        early += ours is not None
    assert early > 600


def _another_base(adapter: Path) -> bytes:
    """The adapter's header, its first lora_A as wide as a far larger base's (the data a hole)."""
    header = _header(adapter)
    at, wide = 0, next(k for k in sorted(header) if "lora_A" in k)
    for key in sorted(header, key=lambda k: header[k]["data_offsets"][0]):
        shape = header[key]["shape"]
        if key == wide:
            shape = [shape[0], DATA // 4 // shape[0]]
        header[key] = {"dtype": "F32", "shape": shape, "data_offsets": [at, at + 4 * math.prod(shape)]}
        at += 4 * math.prod(shape)
    return _prefixed(header)


def _write_whole(adapter: Path, head: bytes) -> None:
    """``head`` and the data its tensors take (a hole): a file safetensors' loader takes."""
    header = json.loads(head[8:])
    _write(adapter, head, data=max(v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"))


def _ranks_over(adapter: Path) -> bytes:
    return _prefixed(_header(adapter))  # the adapter's own header: rank 8, over a limit of 4


@pytest.mark.parametrize(
    ("make", "fragment", "limits"),
    [
        (_another_base, "do not fit the base", {}),
        (_ranks_over, "rank 8 is above max_lora_rank=4", {"max_lora_rank": 4}),
    ],
    ids=["another base's widths", "a rank over the limit"],
)
def test_an_adapter_the_header_shows_unfit_is_refused_at_registration_before_its_data(
    adapter: Path, root: Path, engine_cfg, make: Any, fragment: str, limits: dict[str, int]
) -> None:
    """A 7B adapter registered on a 1B base, or one over the rank limit, was read whole (gigabytes)
    before its shapes, in its header, told: the gateway judges the header against the base and the
    limits first. (A worker reads whole: a version's files rewritten are told by their digest.)"""
    _write_whole(adapter, make(adapter))
    tracemalloc.start()
    try:
        with pytest.raises(APIError, match=fragment) as e:
            check_adapter("a", str(adapter), [str(root)], "model", engine_cfg, AdapterLimits(**limits))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert e.value.status == 400
    if make is _another_base:
        assert peak < DATA // 16, f"{peak} bytes held to refuse it"


def test_a_bad_config_is_refused_before_the_weights_are_read(adapter: Path, root: Path, engine_cfg) -> None:
    (adapter / "adapter_config.json").write_text(json.dumps({"r": 0, "lora_alpha": 16}))
    _write_whole(adapter, _another_base(adapter))
    tracemalloc.start()
    try:
        with pytest.raises(APIError, match="positive integer 'r'"):
            check_adapter("a", str(adapter), [str(root)], "model", engine_cfg)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < DATA // 16, f"{peak} bytes held to refuse it"


LFS_POINTER = (
    b"version https://git-lfs.github.com/spec/v1\n"
    b"oid sha256:4d7a214614ab2935c943f9e0ff69d22eadbb8f32b1258daaa5e2ca24d17e2393\nsize 109144\n"
)


def test_a_git_lfs_pointer_in_the_weights_place_is_named_as_one(adapter: Path, root: Path, engine_cfg) -> None:
    """A repository cloned without git-lfs holds pointers in the weights' place: safetensors says
    "header too large" (its first bytes, read as a length), as dlora did, and users of every
    loader have asked what that means (transformers #27923 and many more)."""
    (adapter / WEIGHTS).write_bytes(LFS_POINTER)
    with pytest.raises(APIError, match="a Git LFS pointer, not the weights .*git lfs pull") as e:
        check_adapter("a", str(adapter), [str(root)], "model", engine_cfg)
    assert e.value.status == 400
    with pytest.raises(AdapterError, match="a Git LFS pointer"):
        load_adapter("a", adapter, engine_cfg)
