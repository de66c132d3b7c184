"""The scheduler's full-ISL admission (a prompt starts only where all of it fits the blocks free,
vLLM's ``scheduler_reserve_full_isl``): what it costs a step to pass a prompt over."""

from dataclasses import replace

import pytest

from dlora.services.worker.engine import block_manager
from dlora.services.worker.engine.block_manager import BlockManager
from dlora.services.worker.engine.scheduler import schedule
from dlora.services.worker.policy import StepDecision
from tests.unit.test_scheduler import CHUNKED, running, seq


def test_a_prompt_passed_over_step_after_step_hashes_its_cached_prefix_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """A prompt whose cached prefix leaves more than the blocks free to compute waits (full-ISL
    admission), and the step goes on to the prompts behind it. Each step looked it up in the prefix
    cache anew, hashing every block of its cached prefix again (a long shared system prompt: as many
    hashes per step as it has blocks, for each prompt passed over), and let the cached blocks go
    again; where the blocks it would find cannot make it fit, the names hashed once say so."""
    hashed = 0
    hash_block = block_manager.block_hash

    def counting(parent: bytes, token_ids: list[int], cache_key: bytes) -> bytes:
        nonlocal hashed
        hashed += 1
        return hash_block(parent, token_ids, cache_key)

    monkeypatch.setattr(block_manager, "block_hash", counting)
    bm = BlockManager(num_blocks=8, block_size=4, enable_prefix_caching=True)
    d = running(seq("d", 0, 16, outputs=1), bm)  # its 16-token prefix in 4 cached blocks, 4 free
    bm.computed("d", d.all_ids(), 0, 16, d.salted(b""))
    long = seq("long", 1, 36)  # its first 16 tokens those: 9 blocks, 5 to compute
    seqs = {s.request_id: s for s in (d, long, seq("short", 2, 4))}
    limits, hashed = replace(CHUNKED, max_num_batched_tokens=8), 0
    for _ in range(6):
        plan = schedule(StepDecision(None, ["d", "long", "short"]), seqs, bm, limits)
        assert [s.request_id for s in plan.seqs] == ["d", "short"]
        bm.free("short")
        seqs["short"].num_cached = 0
    assert hashed <= 5  # (30 before) its 4 cached blocks and the one after, once
