"""An adapter's safetensors header read as safetensors' own loader reads it
(``adapter_files.safetensors_header``): refused exactly where that loader refuses, as a
ValueError (an AdapterError, a 400 at registration), never a RecursionError."""

from __future__ import annotations

import json
import math
import random
import struct
from typing import Any

import pytest

# Bits an element of each safetensors dtype takes (safetensors 0.8, ``Dtype::bitsize``).
DTYPE_BITS = {"BOOL": 8, "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6, "U8": 8, "I8": 8, "F8_E5M2": 8, "F8_E4M3": 8}
DTYPE_BITS |= {"F8_E8M0": 8, "I16": 16, "U16": 16, "F16": 16, "BF16": 16, "I32": 32, "U32": 32, "F32": 32}
DTYPE_BITS |= {"C64": 64, "F64": 64, "I64": 64, "U64": 64}
VALID = '"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}'


@pytest.mark.parametrize(
    "header",
    [
        # a review's: what Python's json reads and serde_json does not
        '{"__metadata__": {}, "__metadata__": {}, ' + VALID + "}",
        '{"w": {"dtype": "F32", "dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}',
        '{"w": 5, ' + VALID + "}",
        '{"__metadata__": {"a": 1, "a": "x"}, ' + VALID + "}",
        '{"__metadata__": {"a": "\\ud800"}, ' + VALID + "}",
        '{"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8], "x": 1e400}}',
        '{"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8], "x": ' + "[" * 200 + "]" * 200 + "}}",
        '{"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8], "x": ' + "[" * 100_000 + "]" * 100_000 + "}}",
        '{"w": {"dtype": "F32", "shape": [-0, 2], "data_offsets": [0, 0]}}',
    ],
)
def test_headers_json_reads_and_safetensors_refuses_are_refused(header: str) -> None:
    """Refused as ValueError (an AdapterError, a 400 at registration), never a RecursionError."""
    from safetensors import deserialize

    from dlora.model.adapter_files import safetensors_header

    text = header.encode()
    data = struct.pack("<Q", len(text)) + text + bytes(8)
    with pytest.raises(Exception):  # noqa: B017 - whatever the loader refuses with
        deserialize(data)
    with pytest.raises(ValueError):
        safetensors_header(data)


def test_the_header_check_refuses_what_safetensors_refuses_and_nothing_else() -> None:
    """Random edits of a header and its data: ``safetensors_header`` raises exactly where
    safetensors' own loader (``deserialize``) does."""
    from safetensors import deserialize

    from dlora.model.adapter_files import safetensors_header

    rng = random.Random(11)
    dtypes = [*DTYPE_BITS, "f32", "F128", 5]
    values: list[Any] = [0, 1, 2, 3, 4, 6, 8, 12, 16, -1, 2.0, None, "8", [], {}]
    refused = 0
    for _ in range(1500):
        header: dict[str, Any] = {}
        at = 0
        for i in range(rng.randint(0, 3)):
            dtype = rng.choice(["F32", "F16", "BF16", "F4", "I64", "BOOL"])
            shape = [rng.randint(0, 3) for _ in range(rng.randint(0, 2))]
            n = math.prod(shape) * DTYPE_BITS[dtype] // 8
            header[f"t{i}"] = {"dtype": dtype, "shape": shape, "data_offsets": [at, at + n]}
            at += n
        tail = bytes(at)
        for _ in range(rng.randint(0, 2)):  # a few edits, each of a kind seen to differ
            kind = rng.randrange(9)
            tensors = sorted(k for k, v in header.items() if isinstance(v, dict) and "data_offsets" in v)
            key = rng.choice(tensors or [None])
            if kind == 0 and key:
                header[key]["dtype"] = rng.choice(dtypes)
            elif kind == 1 and key:
                header[key]["shape"] = [rng.choice(values) for _ in range(rng.randint(0, 2))]
            elif kind == 2 and key and len(header[key]["data_offsets"]) == 2:
                header[key]["data_offsets"][rng.randrange(2)] = rng.choice(values)
            elif kind == 3 and key:
                header[key]["data_offsets"] = [rng.choice(values) for _ in range(rng.choice([1, 2, 3]))]
            elif kind == 4:
                tail = tail[: rng.randint(0, len(tail))] if rng.random() < 0.5 else tail + bytes(rng.randint(1, 4))
            elif kind == 5:
                header["__metadata__"] = rng.choice([None, {"a": "b"}, {"a": 1}, [], "x", {"a": None}])
            elif kind == 6 and key:
                header[key].pop(rng.choice(["dtype", "shape", "data_offsets"]), None)
            elif kind == 7 and key:
                header[key]["extra"] = rng.choice(values)
            elif kind == 8 and key:
                header[rng.choice(["u", key])] = dict(header[key]) if rng.random() < 0.7 else rng.choice(values)
        text = json.dumps(header).encode()
        data = struct.pack("<Q", len(text)) + text + tail
        try:
            deserialize(data)
            theirs = None
        except Exception as e:  # noqa: BLE001 - whatever the loader refuses with
            theirs = e
        try:
            safetensors_header(data)
            ours = None
        except (ValueError, TypeError, KeyError) as e:
            ours = e
        assert (ours is None) == (theirs is None), (header, len(tail), ours, theirs)
        refused += theirs is not None
    assert 300 < refused < 1200  # both kinds well covered
