"""The scheduler's full-ISL admission (a prompt starts only where all of it fits the blocks free,
vLLM's ``scheduler_reserve_full_isl``): what it costs a step to pass a prompt over."""

from dataclasses import replace
from types import SimpleNamespace

import pytest

from dlora.services.worker.engine import block_manager
from dlora.services.worker.engine.block_manager import BlockManager
from dlora.services.worker.engine.queue_view import queued
from dlora.services.worker.engine.scheduler import schedule
from dlora.services.worker.engine.sequence import Sequence
from dlora.services.worker.policy import BatchLimits, StepDecision, fcfs_batch
from dlora.services.worker.policy.base import within_budget
from dlora.services.worker.policy.config import PolicyConfig
from dlora.services.worker.policy.dlora import DLoraPolicy
from dlora.services.worker.policy.fcfs import UnmergedOnly
from tests.unit.test_scheduler import CHUNKED, running, seq


def _counted_hashes(monkeypatch: pytest.MonkeyPatch) -> list[None]:
    """One entry per block name the block manager hashes from now (``clear()`` to count afresh)."""
    hashed: list[None] = []
    hash_block = block_manager.block_hash

    def counting(parent: bytes, token_ids: list[int], cache_key: bytes) -> bytes:
        hashed.append(None)
        return hash_block(parent, token_ids, cache_key)

    monkeypatch.setattr(block_manager, "block_hash", counting)
    return hashed


def test_a_prompt_passed_over_step_after_step_hashes_its_cached_prefix_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """A prompt whose cached prefix leaves more than the blocks free to compute waits (full-ISL
    admission), and the step goes on to the prompts behind it. Each step looked it up in the prefix
    cache anew, hashing every block of its cached prefix again (a long shared system prompt: as many
    hashes per step as it has blocks, for each prompt passed over), and let the cached blocks go
    again; where the blocks it would find cannot make it fit, the names hashed once say so."""
    hashed = _counted_hashes(monkeypatch)
    bm = BlockManager(num_blocks=8, block_size=4, enable_prefix_caching=True)
    d = running(seq("d", 0, 16, outputs=1), bm)  # its 16-token prefix in 4 cached blocks, 4 free
    bm.computed("d", d.all_ids(), 0, 16, d.salted(b""))
    long = seq("long", 1, 36)  # its first 16 tokens those: 9 blocks, 5 to compute
    seqs = {s.request_id: s for s in (d, long, seq("short", 2, 4))}
    limits = replace(CHUNKED, max_num_batched_tokens=8)
    hashed.clear()
    for _ in range(6):
        plan = schedule(StepDecision(None, ["d", "long", "short"]), seqs, bm, limits)
        assert [s.request_id for s in plan.seqs] == ["d", "short"]
        bm.free("short")
        seqs["short"].num_cached = 0
    assert len(hashed) <= 5  # (30 before) its 4 cached blocks and the one after, once


@pytest.mark.parametrize("policy", ["unmerged-only", "dlora"])
@pytest.mark.parametrize("recompute", [False, True])
def test_a_prompt_the_blocks_free_cannot_hold_does_not_take_a_place_in_the_policy_s_batch(
    policy: str, recompute: bool
) -> None:
    """The policy filled its batch to max_num_seqs in queue order with a prompt the scheduler then
    passed over (all of it does not fit the blocks free: full-ISL admission), and the step ran a
    request short while a prompt that fits waited outside the batch, for as long as the long one
    could not start. A recompute keeps its place: no prompt behind it starts (vLLM's line)."""
    bm = BlockManager(num_blocks=8, block_size=4)
    d = running(seq("d", 0, 15, adapter="a", outputs=1), bm)  # 4 blocks held, 4 free
    long = seq("long", 1, 20, adapter="a", outputs=4 if recompute else 0)  # 6 blocks
    seqs = {s.request_id: s for s in (d, long, seq("short", 2, 4, adapter="a"))}
    limits = replace(CHUNKED, max_num_seqs=2, max_num_batched_tokens=64)
    batch_limits = BatchLimits(2, limits.max_adapters, 64)
    chooser = UnmergedOnly(batch_limits) if policy == "unmerged-only" else DLoraPolicy(batch_limits, PolicyConfig())
    queue = list(queued(seqs.values(), {"a": SimpleNamespace(rank=8)}, limits, {}, bm).values())
    plan = schedule(chooser.decide(queue, None), seqs, bm, limits)
    # (["d"] before: the long prompt passed over, the short one left out of the batch)
    assert [s.request_id for s in plan.seqs] == (["d"] if recompute else ["d", "short"])


def test_the_policy_s_queue_weighs_a_batch_s_worth_of_long_prompts_an_adapter_not_every_one(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Whether a prompt fits whole is looked up in the prefix cache (a hash per cached block, once
    per prompt) only for an adapter's first max_num_seqs prompts that may not: as far as any
    candidate batch reaches. A queue of long prompts on a shared system prompt hashed them all.
    Past them a prompt was taken to fit, and took a place in the policy's batch the scheduler then
    left empty: it fits by at most the blocks the cache holds."""
    hashed = _counted_hashes(monkeypatch)
    bm = BlockManager(num_blocks=8, block_size=4, enable_prefix_caching=True)
    d = running(seq("d", 0, 16, outputs=1), bm)  # its 16-token prefix in 4 cached blocks, 4 free
    bm.computed("d", d.all_ids(), 0, 16, d.salted(b""))
    waiting = [seq(f"p{i}", 1 + i, 36) for i in range(10)]  # 9 blocks each, 5 to compute: none fits
    limits = replace(CHUNKED, max_num_seqs=2)
    hashed.clear()
    queue = queued([d, *waiting], {}, limits, {}, bm, lambda adapter, merged: b"")
    assert [q.fits for q in queue.values()] == [True, *[False] * 10]  # ([True, False, False, *[True] * 8])
    assert len(hashed) <= 2 * 5  # (50: all ten)


def test_the_policy_prices_no_step_on_a_recompute_the_blocks_free_cannot_hold_nor_on_prompts_behind_it() -> None:
    """A recompute that all of does not fit the blocks free waits when not first in its step, and
    no prompt keyed after it starts (vLLM's line). ``within_budget``, which every candidate's price
    and the dLoRA band's counts rest on, counted it and the prompt behind it as run."""
    bm = BlockManager(num_blocks=8, block_size=4)
    d = running(seq("d", 0, 15, outputs=1), bm)  # 4 blocks held, 4 free
    seqs = {s.request_id: s for s in (d, seq("r", 1, 14, outputs=4), seq("p", 2, 4))}  # r: 5 blocks
    limits = replace(CHUNKED, max_num_batched_tokens=64)
    queue = list(queued(seqs.values(), {}, limits, {}, bm).values())
    batch_limits = BatchLimits(limits.max_num_seqs, limits.max_adapters, 64)
    batch = fcfs_batch(queue, batch_limits)
    assert [r.request_id for r in batch] == ["d", "r"]  # r keeps its place (left out, p would start); p none
    plan = schedule(StepDecision(None, [r.request_id for r in batch]), seqs, bm, limits)
    assert [s.request_id for s in plan.seqs] == ["d"]
    assert [r.request_id for r in within_budget(batch, batch_limits)] == ["d"]  # (["d", "r", "p"] before)


@pytest.mark.parametrize("caching", [False, True])
def test_the_policy_s_queue_copies_no_prompt_s_ids_to_weigh_whether_it_fits(
    monkeypatch: pytest.MonkeyPatch, caching: bool
) -> None:
    """Weighing a prompt over the blocks free (``QueuedRequest.fits``) copied all its ids each step
    (``Sequence.all_ids``), for a batch's worth of long prompts an adapter, and with no prefix
    cache to find any of them in: it then fits by nothing, and a lookup finds nothing."""
    copies = 0
    all_ids = Sequence.all_ids

    def counting(self: Sequence) -> list[int]:
        nonlocal copies
        copies += 1
        return all_ids(self)

    bm = BlockManager(num_blocks=8, block_size=4, enable_prefix_caching=caching)
    d = running(seq("d", 0, 16, outputs=1), bm)  # 4 blocks held, 4 free
    waiting = [seq(f"p{i}", 1 + i, 36) for i in range(4)]  # 9 blocks each: none fits
    monkeypatch.setattr(Sequence, "all_ids", counting)
    queue = queued([d, *waiting], {}, CHUNKED, {}, bm, lambda adapter, merged: b"")
    assert [q.fits for q in queue.values()] == [True, False, False, False, False]
    assert copies == 0  # (4 before: one a prompt, each step)


def test_two_half_prefilled_recomputes_with_one_key_do_not_hold_the_cache_for_ever() -> None:
    """Two requests resumed while the same prompt waited get one key (``fcfs_arrival``): each took
    the other for one that came before it, spared it, and neither's next chunk ever found a block
    (pressure fuzz seed 1048, dlora policy). The one added later gives its blocks up, as the later
    key would."""
    bm = BlockManager(num_blocks=10, block_size=1)
    first, second = seq("first", 5, 6, outputs=3), seq("second", 5, 6, outputs=3)
    for s, n in ((first, 5), (second, 4)):
        s.num_cached = n
        bm.grow(s.request_id, n)  # 9 of 10 blocks held: first's 4 tokens left take 4
    seqs = {"first": first, "second": second}
    limits = replace(CHUNKED, max_num_batched_tokens=4)
    plan = schedule(StepDecision(None, ["first", "second"]), seqs, bm, limits)
    assert [(s.request_id, s.num_scheduled) for s in plan.seqs] == [("first", 4)]  # ([] for ever before)
    assert plan.preempted == [second]
