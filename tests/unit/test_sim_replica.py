"""One simulated replica: the engine's own scheduling path on simulated time (no weights)."""

import pytest

from dlora.services.worker.engine.config import EngineConfig
from dlora.services.worker.policy.config import PolicyConfig, PolicyName
from dlora.sim.cost import ARTIFACT, H200
from dlora.sim.replica import SimEngine


def _drain(e: SimEngine, limit: int = 10_000) -> dict[str, tuple[int, str | None]]:
    """Step until every request is done: request id -> (tokens, finish reason)."""
    done: dict[str, tuple[int, str | None]] = {}
    counts: dict[str, int] = {}
    for _ in range(limit):
        if not e.has_unfinished():
            return done
        for out in e.step():
            counts[out.request_id] = counts.get(out.request_id, 0) + len(out.new_token_ids)
            if out.finished:
                done[out.request_id] = (counts[out.request_id], out.finish_reason)
    raise AssertionError("did not finish")


def test_requests_end_at_their_target_length_and_time_follows_the_cost_model() -> None:
    e = SimEngine(ARTIFACT, EngineConfig(policy=PolicyConfig(name=PolicyName.UNMERGED_ONLY)))
    e.add_adapter("a", 16)
    e.add("r1", list(range(10, 30)), output_len=5, adapter="a")
    e.add("r2", list(range(40, 48)), output_len=3)
    done = _drain(e)
    assert done == {"r1": (5, "stop"), "r2": (3, "stop")}
    # every step runs adapter a's delta: 27 ms each (the artifact's constant), the first also
    # loading a into its device slot (the engine counts loads in the step's time)
    assert e.stats.steps == 5 and e.now == pytest.approx(5 * 27e-3 + ARTIFACT.load_seconds(16, "cpu"))
    assert e.stats.step_seconds == pytest.approx(e.now)


def test_the_dlora_policy_merges_a_lone_adapter_and_pays_the_switch() -> None:
    e = SimEngine(ARTIFACT)  # the dlora policy by default
    e.add_adapter("a", 16)
    for i in range(8):
        e.add(f"r{i}", [5 + i] * 16, output_len=40, adapter="a")
    _drain(e)
    assert e.stats.merges >= 1 and e.stats.steps_by_mode.get("merged", 0) > 0
    assert e.stats.merge_seconds == pytest.approx(e.stats.merges * ARTIFACT.merge_s)


def test_a_small_kv_cache_preempts_and_a_shared_prefix_hits_the_cache() -> None:
    e = SimEngine(H200, EngineConfig(num_blocks=12, block_size=16, max_num_seqs=8))  # 192 tokens
    prompt = list(range(100, 164))  # 64 tokens: four full blocks
    for i in range(4):
        e.add(f"r{i}", prompt, output_len=60)
    done = _drain(e)
    assert all(n == 60 for n, _ in done.values())
    assert e.stats.preemptions > 0  # four requests of 124 tokens do not fit 192 at once
    assert e.stats.prefix_cache_hits > 0  # they share the prompt's blocks
    assert e.blocks.num_free == e.blocks.num_blocks  # everything freed


def test_a_load_into_a_device_slot_costs_the_profile_s_time() -> None:
    e = SimEngine(H200, EngineConfig(max_loras=1, policy=PolicyConfig(name=PolicyName.UNMERGED_ONLY)))
    for name in ("a", "b"):
        e.add_adapter(name, 32)
    e.add("x", [7] * 8, output_len=2, adapter="a")
    e.add("y", [8] * 8, output_len=2, adapter="b")
    _drain(e)
    assert e.stats.adapter_loads == 2 and e.stats.adapter_evictions == 1  # one slot: b evicts a
    assert e.stats.adapter_load_seconds == pytest.approx(2 * H200.load_seconds(32, "cpu"))


def test_a_moved_request_decodes_on_with_its_cache_or_is_recomputed_when_it_does_not_fit() -> None:
    roomy = SimEngine(H200, EngineConfig(num_blocks=16, block_size=16))
    roomy.add("m", list(range(3, 40)), output_len=12, resumed=[9] * 5, shipped=True)
    seq = roomy.seqs["m"]
    assert seq.num_cached == seq.total_len - 1 and roomy.stats.prefill_tokens == 0
    tight = SimEngine(H200, EngineConfig(num_blocks=4, block_size=16))  # 64 tokens: no room for both
    tight.add("other", list(range(3, 30)), output_len=10)
    tight.step()
    tight.add("m", list(range(3, 40)), output_len=12, resumed=[9] * 5, shipped=True)
    assert tight.seqs["m"].num_cached == 0  # waits to be recomputed
    done = _drain(tight)
    assert done["m"] == (12 - 5, "stop") and done["other"] == (9, "stop")
    assert _drain(roomy) == {"m": (7, "stop")}
