"""One simulated replica: the engine's own scheduling path on simulated time (no weights)."""

import dataclasses
from collections.abc import Callable
from typing import ClassVar

import pytest

from dlora.services.worker.engine.config import EngineConfig
from dlora.services.worker.policy.config import PolicyConfig, PolicyName
from dlora.sim.cost import ARTIFACT, H200, CostProfile, StepShape
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


def test_a_sequence_prefilling_costs_its_own_time_in_each_step_it_prefills() -> None:
    """A profile fitted to steps (``prefill_seq_s``) charges each sequence a step prefills: each
    chunk of a chunked prompt again, a decode nothing."""
    cost = dataclasses.replace(ARTIFACT, step_s=0.0, unmerged_step_s=0.0, token_s=0.0, prefill_seq_s=1.0)
    config = EngineConfig(
        max_num_batched_tokens=16, max_num_seqs=16, policy=PolicyConfig(name=PolicyName.UNMERGED_ONLY)
    )
    e = SimEngine(cost, config)
    e.add("long", list(range(10, 50)), output_len=3)  # 40 prompt tokens: chunks of 16, 16 and 8
    e.add("short", [7, 8], output_len=2)  # waits for room in the budget: beside the last chunk
    assert _drain(e) == {"long": (3, "stop"), "short": (2, "stop")}
    assert e.now == pytest.approx(1 + 1 + 2) and e.stats.steps == 5  # the two decode steps cost nothing


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


def test_an_adapter_read_from_disk_waits_its_requests_and_the_idle_one_used_least_lately_goes() -> None:
    """The disk tier (``--max-cpu-loras``): a request of an adapter being read waits unseen by the
    policy (``loading``) and runs once it is in (``install``, the shard times the read); past
    ``max_cpu_loras`` one goes as a worker drops it (``evictions``): never one a request runs on
    or the one just read; the least lately asked for first."""
    e = SimEngine(H200, EngineConfig(max_loras=1, max_cpu_loras=2, policy=PolicyConfig(name=PolicyName.UNMERGED_ONLY)))
    assert not e.ask("a")
    e.loading.add("a")
    e.add("w", [7] * 8, output_len=2, adapter="a")
    assert not e.runnable() and e.step() == [] and e.now == 0.0  # nothing ran: it waits for the read
    e.install("a", 16)
    assert e.runnable() and e.disk_loads == 1
    _drain(e)
    e.install("b", 32)
    assert e.ask("a") and set(e.adapters) == {"a", "b"} and e.disk_loads == 2  # a: the one asked for last
    e.add("x", [7] * 8, output_len=50, adapter="b")  # b busy
    e.ask("c")
    e.install("c", 16)  # over by one: b is busy, so a goes though asked for later
    assert set(e.adapters) == {"b", "c"}
    e.ask("d")
    e.install("d", 16)  # b still busy: c, asked for before, goes (d is kept)
    assert set(e.adapters) == {"b", "d"} and e.disk_loads == 4
    e.abort("x")
    e.ask("a")
    e.install("a", 16)
    assert set(e.adapters) == {"d", "a"}  # b, idle now and the least lately asked for, goes


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


def _state(e: SimEngine) -> tuple:
    seqs = sorted(
        (s.request_id, len(s.output_ids), s.num_cached, tuple(e.blocks.table(s.request_id))) for s in e.seqs.values()
    )
    return (
        seqs,
        round(e.now, 12),
        e.stats.steps,
        round(e.stats.step_seconds, 12),
        e.stats.tokens_generated,
        e.blocks.num_free,
    )


def _twins(profile: CostProfile, config: EngineConfig, output_lens: tuple[int, int, int]) -> list[SimEngine]:
    """Two engines alike: adapter "a" (rank 16), three requests (r0 on the base model, r1 and r2 on
    "a") of ``output_lens`` tokens, their prefills and a first decode stepped (the step to repeat)."""
    engines = [SimEngine(profile, config) for _ in range(2)]
    for e in engines:
        e.add_adapter("a", 16)
        for i, n in enumerate(output_lens):
            e.add(f"r{i}", list(range(10 + i, 17 + 3 * i)), output_len=n, adapter="a" if i else None)
        e.step()  # the prefills
        e.step()  # a first decode: the step to repeat
    return engines


@pytest.mark.parametrize("caching", [True, False])
def test_fast_forward_makes_the_same_state_as_the_steps_it_skips(caching: bool) -> None:
    """Steps that repeat the last one (decodes of every request, none ending) run at once: the same
    tokens, blocks (new ones taken as the steps cross block bounds), prefix cache, clock and stats
    as stepping one by one; it stops short of a request's end and of ``until``."""
    config = EngineConfig(
        policy=PolicyConfig(name=PolicyName.UNMERGED_ONLY), block_size=4, enable_prefix_caching=caching
    )
    fast, slow = _twins(H200, config, (5, 30, 40))
    ids, k = fast.fast_forward(until=1e9)
    assert (
        sorted(ids) == ["r0", "r1", "r2"] and k == 2
    )  # r0 has 2 of its 5 tokens: its fifth, last comes in a real step
    for _ in range(k):
        slow.step()
    assert _state(fast) == _state(slow)
    assert fast.blocks._cached == slow.blocks._cached  # the same blocks named the same
    assert fast.fast_forward(until=1e9) == ([], 0)  # its next step ends r0: a real one
    fast.step(), slow.step()  # r0 ends
    before = slow.now
    fast.step(), slow.step()
    one = slow.now - before
    _, k = fast.fast_forward(until=fast.now + 2.5 * one)
    assert k == 3  # those that begin before ``until``: at now, now + one, now + 2 one (each a little longer)
    for _ in range(k):
        slow.step()
    assert _state(fast) == _state(slow)


def test_nothing_is_fast_forwarded_after_a_request_joins_or_while_one_waits() -> None:
    e = SimEngine(ARTIFACT, EngineConfig(policy=PolicyConfig(name=PolicyName.UNMERGED_ONLY), max_num_seqs=1))
    e.add("r0", [5, 6, 7], output_len=50)
    e.step()
    e.add("r1", [5, 6, 8], output_len=50)
    assert e.fast_forward(until=1e9) == ([], 0)  # joined since the last step
    e.step()
    assert e.fast_forward(until=1e9) == ([], 0)  # r1 waits: the batch is not all there is


class _Counted(CostProfile):
    """H200's profile, counting the runs of repeated steps it prices (``by_context``)."""

    shapes: ClassVar[list[StepShape]] = []

    def by_context(self, s: StepShape) -> Callable[[int], float]:
        self.shapes.append(s)
        return super().by_context(s)


@pytest.mark.parametrize("caching", [True, False])
def test_fast_forward_under_a_learning_policy_makes_the_same_state_as_stepping(caching: bool) -> None:
    """Under dLoRA's policy, which learns from every step and so is asked again before each step a
    fast-forward repeats: the same tokens, blocks, prefix cache, clock, stats and learned state as
    stepping. What cannot change within the run (its batch, its LoRA work, its pricing by context)
    is worked out once a run, not once a step (it was, for each step, a tenth of the run's time)."""
    config = EngineConfig(block_size=4, enable_prefix_caching=caching)
    fast, slow = _twins(_Counted(**dataclasses.asdict(H200)), config, (40, 60, 50))
    _Counted.shapes.clear()
    ids, k = fast.fast_forward(until=1e9)
    assert sorted(ids) == ["r0", "r1", "r2"] and k > 4  # past block bounds (4 tokens a block)
    assert len(_Counted.shapes) == 1
    for _ in range(k):
        slow.step()
    assert _state(fast) == _state(slow)
    assert fast.blocks._cached == slow.blocks._cached
    assert fast.policy.checkpoint() == slow.policy.checkpoint()
    assert fast.fast_forwarded == k and slow.fast_forwarded == 0
