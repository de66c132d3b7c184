"""The dLoRA policy's reading of the queue (``dlora_shape.QueueShape``), kept while ``decide`` is
handed the same entries: kept only while they are."""

from __future__ import annotations

import copy

import pytest

from dlora.services.worker.policy import BatchLimits, QueuedRequest, SwitchedFeeds
from dlora.services.worker.policy.base import KvNeed, KvRoom
from dlora.services.worker.policy.config import PolicyConfig
from dlora.services.worker.policy.dlora import DLoraPolicy

LIMITS = BatchLimits(max_num_seqs=8, max_adapters=4)
BUDGET = BatchLimits(max_num_seqs=8, max_adapters=4, max_num_batched_tokens=8, chunked_prefill=False)
PAIRS = BatchLimits(max_num_seqs=2, max_adapters=4)


def queue(*adapters: str | None) -> list[QueuedRequest]:
    return [QueuedRequest(f"r{i}", a, i, False, 1, 16 if a else 0) for i, a in enumerate(adapters)]


def test_a_queue_list_changed_in_place_is_read_again() -> None:
    """A caller may hand ``decide`` one list and change it in place between steps (the ``Policy``
    contract takes a list, not a fresh one): the decision is for what it holds now. The kept
    reading once held the caller's list itself, so compared with itself it was always "the same",
    and a skewed queue's merge was decided again for a uniform one."""
    p = DLoraPolicy(LIMITS, PolicyConfig(r_initial=0.5, band_ratio=0.7))
    q = queue(*"aaaaaaab")
    assert p.decide(q, None).merged == "a"  # skewed: merged on the hot adapter
    q[:] = queue(*"abcdabcd")  # uniform now, the same list
    anew = copy.deepcopy(p)
    anew._shape = None
    got, want = p.decide(q, None), anew.decide(list(q), None)
    assert (
        (got.merged, got.mixed, got.request_ids)
        == (want.merged, want.mixed, want.request_ids)
        == (
            None,
            False,
            [r.request_id for r in q],
        )
    )


def _prompts(n: int) -> list[QueuedRequest]:
    """``n`` waiting prompts of adapter "a" that hold no blocks, each 2 tokens fed as built (its
    prefix cached under the key of "a" merged) and 8 with nothing or another merged, 2 blocks
    of 4 tokens whole."""
    feeds, held = SwitchedFeeds(unmerged=8, own=2, other=8), SwitchedFeeds(unmerged=0, own=6, other=0)
    return [QueuedRequest(f"p{i}", "a", i, False, 2, 16, feeds, 8, held, kv=KvNeed(0, whole=2)) for i in range(n)]


@pytest.mark.parametrize(
    "before,after",
    [
        ((None, KvRoom(64, 4), LIMITS), (None, KvRoom(4, 4), LIMITS)),  # fewer blocks free: fewer prompts start
        ((None, None, BUDGET), ("a", None, BUDGET)),  # "a" merged now: F unmerged feeds each prompt whole
        ((None, None, LIMITS), (None, None, PAIRS)),  # limits changed: two requests a step
    ],
    ids=["free blocks", "merged now", "limits"],
)
def test_the_same_entries_beside_other_arguments_are_read_again(
    before: tuple[str | None, KvRoom | None, BatchLimits], after: tuple[str | None, KvRoom | None, BatchLimits]
) -> None:
    """The same entries, handed with another merged adapter, other free blocks or other limits,
    make other batches (F fed within the budget and blocks, ``within_budget``): the reading is
    kept only where all of them are as it was read with."""
    q = _prompts(4)
    p = DLoraPolicy(before[2], PolicyConfig(r_initial=0.5))
    p.decide(q, before[0], before[1])
    p.limits = after[2]
    anew = copy.deepcopy(p)
    anew._shape = None
    got, want = p.decide(q, after[0], after[1]), anew.decide(q, after[0], after[1])
    assert (got.merged, got.mixed, got.request_ids) == (want.merged, want.mixed, want.request_ids)
    assert got.basis == want.basis
    first = DLoraPolicy(before[2], PolicyConfig(r_initial=0.5)).decide(q, *before[:2])
    assert [r.request_id for r in got.basis.fed] != [r.request_id for r in first.basis.fed]  # type: ignore[union-attr]
