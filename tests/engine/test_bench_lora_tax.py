"""The engine benchmark's LoRA-tax measurement, on the tiny model: both batches held at once,
their steps alternating, and nothing left in the engine after."""

from __future__ import annotations

from dlora.loadgen.bench_engine import lora_tax
from dlora.model.make_tiny import TinyOutput
from tests.engine.helpers import make_engine


def test_the_lora_tax_alternates_a_base_and_an_adapter_batch(tiny_llama: TinyOutput) -> None:
    engine = make_engine(tiny_llama, max_loras=2)  # its adapters registered
    tax = lora_tax(engine, "lora-0", batch=4, pairs=6)
    assert tax["batch"] == 4 and tax["pairs"] == 6
    assert tax["base_ms"] > 0 and tax["unmerged_ms"] > 0 and 0.1 < tax["ratio_of_pairs"] < 10
    assert not engine.has_unfinished() and engine.blocks.num_free == engine.blocks.num_blocks
    assert engine.stats.steps_by_mode == {"unmerged": engine.stats.steps}  # no merge: the tax is unmerged
