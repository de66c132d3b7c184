"""The engine tests' own builder, make_engine: the KV cache it gives an engine."""

from __future__ import annotations

from dlora.model.make_tiny import TinyOutput
from dlora.services.worker.engine import EngineConfig
from tests.engine.helpers import make_engine


def test_make_engine_holds_the_kv_its_requests_can_use_and_not_the_default(tiny_llama: TinyOutput) -> None:
    """Every test's requests fit as they did under the default (max_num_seqs at the whole
    context), without the default's 256 MiB zeroed per engine; a test's own size stands."""
    engine = make_engine(tiny_llama)
    per_request = -(-engine.model_config.context_length() // engine.config.block_size)
    assert engine.blocks.num_blocks >= engine.config.max_num_seqs * per_request
    held = engine.model.kv.k.nbytes + engine.model.kv.v.nbytes
    assert held < EngineConfig().kv_cache_bytes, held
    assert make_engine(tiny_llama, num_blocks=8).blocks.num_blocks == 8
    assert make_engine(tiny_llama, max_num_seqs=128).blocks.num_blocks >= 128 * per_request
