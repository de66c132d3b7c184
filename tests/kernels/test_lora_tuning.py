"""The LoRA tile table: keys, the nearest-batch lookup, and a tuning run that writes a table the
lookup reads (under the interpreter at small shapes, its times meaningless; on a GPU, make gpu-check
runs dlora bench tune-lora for real)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from dlora.kernels.lora_tuning import Shape, bucket, device_file, load, lookup
from dlora.loadgen.tune_lora import tune
from tests.kernels.conftest import device


def test_keys_round_trip_and_device_files_are_named_by_the_device() -> None:
    shape = Shape(4096, 3, 4096, 16, 32, 8)
    assert Shape.parse(shape.key) == shape
    with pytest.raises(ValueError):
        Shape.parse("K4096 S3")
    assert device_file("NVIDIA H200", Path("t")) == Path("t/nvidia-h200.json")
    assert [bucket(n) for n in (0, 1, 2, 3, 16, 17)] == [1, 1, 2, 4, 16, 32]


def test_lookup_takes_the_nearest_batch_of_the_same_projection_and_rank() -> None:
    entries = {
        Shape(4096, 3, 4096, 16, 1, 1).key: {"split_k": 16},
        Shape(4096, 3, 4096, 16, 32, 8).key: {"split_k": 2},
        Shape(4096, 3, 4096, 64, 32, 8).key: {"split_k": 4},  # another rank
        Shape(11008, 1, 4096, 16, 32, 8).key: {"split_k": 8},  # another projection
    }
    assert lookup(Shape(4096, 3, 4096, 16, 2, 1), entries) == {"split_k": 16}
    assert lookup(Shape(4096, 3, 4096, 16, 16, 8), entries) == {"split_k": 2}
    assert lookup(Shape(4096, 3, 4096, 64, 16, 8), entries) == {"split_k": 4}
    assert lookup(Shape(4096, 3, 4096, 32, 1, 1), entries) is None  # no entry of that rank
    assert lookup(Shape(4096, 1, 4096, 16, 1, 1), entries) is None  # nor of that projection
    assert lookup(Shape(4096, 3, 4096, 16, 2048, 1), entries) is None  # a prefill: far from any tuned batch
    assert lookup(Shape(4096, 3, 4096, 16, 8, 8), entries) is None  # two powers of two away


def test_a_tuning_run_writes_a_table_the_lookup_reads(tmp_path: Path) -> None:
    shrink = [{"k": 16, "split_k": 1}, {"k": 16, "split_k": 2}]
    path = tune("tiny", [2], [2], 8, torch.float32, device(), tmp_path, shrink=shrink, expand=[{"n": 16}])
    entries = load(path)
    assert len(entries) == 4  # the tiny model's four fused projections
    for key, tiles in entries.items():
        # One of the candidates or the rule's own tiles (they compete: a table is never slower).
        assert set(tiles) == {"k", "split_k", "n"} and tiles["split_k"] in (1, 2)
        assert lookup(Shape.parse(key), entries) == tiles
    timings = json.loads(path.read_text())["timings"]
    assert all(t["tuned_ms"] > 0 and t["default_ms"] > 0 for t in timings.values())


def test_an_unreadable_table_warns_and_the_rule_serves(tmp_path: Path) -> None:
    """gpu-check may kill a tuning run mid-write: a bad file must not break every LoRA launch."""
    for i, text in enumerate(['{"entries": {"K1 S1": {}}}', "{trunc", '{"no": 1}']):
        bad = tmp_path / f"bad{i}.json"
        bad.write_text(text)
        with pytest.warns(UserWarning, match="not a LoRA tile table"):
            assert load(bad) == {}
