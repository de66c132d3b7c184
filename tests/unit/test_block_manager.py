import pytest

from dlora.services.worker.engine.block_manager import BlockManager


def test_grow_allocates_whole_blocks_and_maps_slots() -> None:
    bm = BlockManager(num_blocks=4, block_size=4)
    bm.grow("a", 5)
    assert len(bm.table("a")) == 2 and bm.num_free == 2
    bm.grow("a", 8)  # still fits in two blocks
    assert len(bm.table("a")) == 2
    t = bm.table("a")
    assert bm.slots("a", 3, 6) == [t[0] * 4 + 3, t[1] * 4 + 0, t[1] * 4 + 1]


def test_free_returns_blocks_and_is_idempotent() -> None:
    bm = BlockManager(num_blocks=3, block_size=2)
    bm.grow("a", 6)
    assert bm.num_free == 0 and not bm.can_grow("b", 1)
    bm.free("a")
    bm.free("a")
    assert bm.num_free == 3 and bm.table("a") == []
    assert bm.can_grow("b", 6)


def test_grow_past_capacity_raises_and_changes_nothing() -> None:
    bm = BlockManager(num_blocks=2, block_size=2)
    bm.grow("a", 2)
    with pytest.raises(MemoryError):
        bm.grow("b", 4)
    assert bm.num_free == 1 and bm.table("b") == []


def test_without_prefix_caching_blocks_are_never_shared() -> None:
    bm = BlockManager(num_blocks=10, block_size=3)
    for i, n in enumerate([4, 7, 1, 9]):
        bm.grow(f"s{i}", n)
    all_blocks = [b for i in range(4) for b in bm.table(f"s{i}")]
    assert len(all_blocks) == len(set(all_blocks)) == 2 + 3 + 1 + 3


@pytest.mark.parametrize("num_blocks,block_size", [(0, 4), (4, 0)])
def test_bad_sizes_are_refused(num_blocks: int, block_size: int) -> None:
    with pytest.raises(ValueError):
        BlockManager(num_blocks, block_size)


def test_block_0_is_nobodys_and_every_block_given_out_is_named_fresh_once() -> None:
    """Block 0 pads the torch attention's block tables (a masked key weighs 0, and 0 · NaN is NaN):
    no sequence may write it, so it is never given out (vLLM's null block); the KV cache zeroes
    each block a sequence is given (``take_fresh``) before anything reads its slots past the
    context: a NaN a failed or aborted request left there then reaches nobody."""
    bm = BlockManager(num_blocks=3, block_size=2)
    bm.grow("a", 6)
    assert sorted(bm.table("a")) == [1, 2, 3] and bm.end == 4
    assert bm.take_fresh() == [1, 2, 3] and bm.take_fresh() == []
    bm.free("a")
    bm.grow("b", 2)
    assert bm.take_fresh() == bm.table("b")
