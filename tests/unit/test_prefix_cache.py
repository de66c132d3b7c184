"""Prefix caching in the block manager (pure): which blocks a prompt reuses, under which key,
what stays cached when sequences end, and what is evicted first."""

from __future__ import annotations

from dlora.services.worker.engine.block_manager import BlockManager

KEY, OTHER = b"lora-a|", b"lora-a|merged-b"


def _run(bm: BlockManager, seq: str, ids: list[int], key: bytes = KEY) -> int:
    """A prefill of ``ids`` as the engine does it: reuse, grow, compute the rest; tokens reused."""
    reused = bm.reuse_prefix(seq, ids, key)
    bm.grow(seq, len(ids))
    bm.computed(seq, ids, reused, len(ids), key)
    return reused


def test_a_prompt_reuses_the_full_blocks_another_computed_under_the_same_key() -> None:
    bm = BlockManager(num_blocks=16, block_size=4, enable_prefix_caching=True)
    prompt = list(range(10))
    assert _run(bm, "a", prompt) == 0
    assert bm.num_cached == 2  # tokens 0-7; 8-9 fill no block
    assert _run(bm, "b", prompt + [77, 78]) == 8
    assert bm.table("b")[:2] == bm.table("a")[:2]  # shared, not copied
    assert bm.reuse_prefix("c", prompt, OTHER) == 0  # other weights computed nothing here
    bm.free("c")
    assert bm.reuse_prefix("d", [99, *prompt[1:]], KEY) == 0  # the chain: a different first token
    bm.free("d")
    # Never the last token: its logits must be computed, so an 8-token prompt reuses one block.
    assert bm.reuse_prefix("e", prompt[:8], KEY) == 4


def test_cached_blocks_outlive_their_sequences_until_their_blocks_are_needed() -> None:
    bm = BlockManager(num_blocks=4, block_size=4, enable_prefix_caching=True)
    _run(bm, "a", list(range(12)))  # three blocks, three cached
    bm.free("a")
    assert bm.num_free == 4 and bm.num_cached == 3
    assert _run(bm, "b", list(range(12)) + [5]) == 12
    bm.free("b")
    # Something else needs every block: the never-cached one first, then the least recently
    # released cached ones, the tail before the head (b released its last block first).
    bm.grow("x", 8)
    assert bm.num_cached == 2
    assert bm.reuse_prefix("y", list(range(13)), KEY) == 8  # blocks 0 and 1 of the chain are left
    bm.free("y")
    bm.grow("x", 16)
    assert bm.num_cached == 0 and bm.num_free == 0


def test_blocks_shared_by_two_sequences_stay_held_until_both_release_them() -> None:
    bm = BlockManager(num_blocks=4, block_size=2, enable_prefix_caching=True)
    _run(bm, "a", [1, 2, 3, 4, 5])
    _run(bm, "b", [1, 2, 3, 4, 9])
    assert bm.num_free == 4 - 3 - 1  # a: 3 blocks; b: a's first two and one of its own
    bm.free("a")
    assert bm.num_free == 4 - 3  # b still holds the shared two
    bm.free("b")
    assert bm.num_free == 4


def test_a_block_computed_under_two_keys_is_not_cached_nor_anything_after_it() -> None:
    bm = BlockManager(num_blocks=8, block_size=4, enable_prefix_caching=True)
    ids = list(range(14))
    bm.grow("a", 6)
    bm.computed("a", ids, 0, 6, KEY)  # block 0 cached; block 1 half done under KEY
    bm.grow("a", 14)
    bm.computed("a", ids, 6, 14, OTHER)  # block 1 finished under OTHER
    assert bm.num_cached == 1
    assert bm.reuse_prefix("b", ids, KEY) == 4 and bm.reuse_prefix("c", ids, OTHER) == 0


def test_a_block_computed_under_another_key_than_the_blocks_before_it_is_not_cached() -> None:
    """The merged state changed between two chunks of a prompt, at a block's edge: its next blocks
    were cached under a chain that begins under the old key and goes on under the new one, which no
    lookup (one key for a whole prompt) reaches: blocks kept cached for no one."""
    bm = BlockManager(num_blocks=8, block_size=4, enable_prefix_caching=True)
    ids = list(range(14))
    bm.grow("a", 8)
    bm.computed("a", ids, 0, 8, KEY)  # blocks 0 and 1 under KEY
    bm.grow("a", 14)
    bm.computed("a", ids, 8, 14, OTHER)  # block 2 under OTHER
    assert bm.num_cached == 2  # (3 before)
    assert bm.reuse_prefix("b", ids, KEY) == 8 and bm.reuse_prefix("c", ids, OTHER) == 0
    bm.free("b")
    bm.free("c")
    longer = [*ids[:8], 99, 98, 97, 96, 95]
    assert bm.reuse_prefix("d", longer, KEY) == 8  # found under KEY, then computed under OTHER
    bm.grow("d", 13)
    bm.computed("d", longer, 8, 13, OTHER)
    assert bm.num_cached == 2  # (3 before)


def test_two_sequences_computing_the_same_prefix_cache_it_once() -> None:
    bm = BlockManager(num_blocks=8, block_size=2, enable_prefix_caching=True)
    for s in ("a", "b"):
        bm.reuse_prefix(s, [1, 2, 3], KEY)
        bm.grow(s, 3)
    for s in ("a", "b"):
        bm.computed(s, [1, 2, 3], 0, 3, KEY)
    assert bm.num_cached == 1
    bm.free("a")
    bm.free("b")
    assert bm.num_free == 8 and bm.reuse_prefix("c", [1, 2, 3], KEY) == 2


def test_moved_kv_is_not_cached() -> None:
    bm = BlockManager(num_blocks=8, block_size=2, enable_prefix_caching=True)
    bm.grow("m", 6)
    bm.stop_caching("m")
    bm.computed("m", [1, 2, 3, 4, 5, 6, 7], 6, 7, KEY)
    assert bm.num_cached == 0


def test_off_it_reuses_nothing_and_caches_nothing() -> None:
    bm = BlockManager(num_blocks=8, block_size=2)
    assert _run(bm, "a", [1, 2, 3, 4, 5]) == 0 and bm.num_cached == 0
    bm.free("a")
    assert _run(bm, "b", [1, 2, 3, 4, 5]) == 0


def test_upcoming_names_what_computing_will_cache_and_a_prompt_how_much_of_it_it_shares() -> None:
    bm = BlockManager(num_blocks=16, block_size=4, enable_prefix_caching=True)
    ids = list(range(14))
    bm.reuse_prefix("a", ids, KEY)
    bm.grow("a", 14)
    first = bm.upcoming("a", ids, 0, 6, KEY)  # changes nothing: asked twice, the same
    assert len(first) == 1 and bm.upcoming("a", ids, 0, 6, KEY) == first and bm.num_cached == 0
    bm.computed("a", ids, 0, 6, KEY)
    assert bm.upcoming("a", ids, 6, 14, OTHER) == []  # block 1 was begun under KEY
    rest = bm.upcoming("a", ids, 6, 14, KEY)
    assert len(rest) == 2
    assert bm.reuse_prefix("b", ids, KEY) == 4 and bm.upcoming_share("b", ids, KEY, set(rest)) == 8
    assert bm.upcoming_share("b", ids, KEY, set(rest[1:])) == 0  # a run from its first block not found
    assert bm.upcoming_share("b", ids[:12], KEY, set(rest)) == 4  # never the last token's block
    bm.computed("a", ids, 6, 14, KEY)
    assert bm.num_cached == 3 and bm.reuse_prefix("c", ids, KEY) == 12


def test_a_reset_forgets_every_cached_block_and_frees_those_nobody_holds() -> None:
    bm = BlockManager(num_blocks=8, block_size=4, enable_prefix_caching=True)
    ids = list(range(13))
    _run(bm, "done", ids)
    bm.free("done")  # its three full blocks stay cached, held by none
    _run(bm, "running", ids)  # reuses them
    bm.free("running")
    _run(bm, "running", ids + [99, 98, 97])
    assert bm.num_cached == 4 and bm.num_free == 4
    assert bm.reset_prefix_cache() == 4
    assert bm.num_cached == 0 and bm.num_free == 4 and len(bm.table("running")) == 4  # it keeps its blocks
    assert bm.reuse_prefix("later", ids, KEY) == 0
    bm.free("later")
    bm.free("running")
    assert bm.num_free == 8 and bm.num_cached == 0


def test_a_look_at_what_a_prompt_would_find_cached_agrees_with_reusing_and_takes_nothing() -> None:
    """What the policy is told of a waiting prompt (``cached_tokens``): the tokens ``reuse_prefix``
    would take, under each key, no block held for the look, and the names hashed once."""
    bm = BlockManager(num_blocks=16, block_size=4, enable_prefix_caching=True)
    prompt = list(range(10))
    _run(bm, "a", prompt)
    bm.free("a")
    free = bm.num_free
    for ids, key in ((prompt + [77, 78], KEY), (prompt[:8], KEY), (prompt, OTHER), ([99, *prompt[1:]], KEY)):
        names: list[bytes] = []
        looked = bm.cached_tokens(ids, key, names)
        assert bm.num_free == free and bm.cached_tokens(ids, key, names) == looked
        assert len(names) == min(looked // 4 + 1, (len(ids) - 1) // 4)  # up to the first miss
        assert looked == bm.reuse_prefix("b", ids, key), (ids, key)
        bm.free("b")
    assert BlockManager(16, 4).cached_tokens(prompt, KEY, []) == 0  # the cache off


def test_a_failed_sequence_takes_its_blocks_out_of_the_cache_and_others_keep_theirs() -> None:
    """A request whose logits came out NaN may have written NaN KV into the blocks it cached (or
    reused: another computed them just as badly and ended before its logits were looked at); a
    later prompt must compute them again, not find them (vllm-project/vllm#50283's eviction)."""
    bm = BlockManager(num_blocks=8, block_size=2, enable_prefix_caching=True)
    _run(bm, "first", [1, 2, 3, 4])  # ended before its logits were looked at
    bm.free("first")
    assert _run(bm, "bad", [1, 2, 3, 4, 5, 6, 7]) == 4  # and caches [5, 6] itself
    assert _run(bm, "mate", [1, 2, 3, 4, 5, 6, 9]) == 6  # shares what bad reused and computed
    shared = bm.table("mate")[:3]
    assert bm.num_cached == 3
    bm.forget("bad")
    bm.free("bad")
    assert bm.num_cached == 0 and bm.table("mate")[:3] == shared  # its blocks are its own still
    assert bm.reuse_prefix("later", [1, 2, 3, 4, 5, 6, 7], KEY) == 0
    bm.free("later")
    bm.free("mate")
    assert bm.num_free == 8 and bm.num_cached == 0
    bm.forget("unknown")  # a no-op


def test_a_sequence_freed_before_its_nan_is_found_takes_its_blocks_out_and_checked_lists_them() -> None:
    """Async scheduling looks at a step's logits a call later, when its sequence may have been
    preempted or aborted: ``forget`` still takes out the blocks it named. ``checked`` lists the
    blocks taken out (a prefill that took one meanwhile computes it again) and drops the freed
    names: every step that ran them was looked at, so a later ``forget`` leaves them."""
    bm = BlockManager(num_blocks=8, block_size=2, enable_prefix_caching=True)
    _run(bm, "bad", [1, 2, 3, 4, 5])
    assert _run(bm, "mate", [1, 2, 3, 4, 9]) == 4  # took bad's two blocks before the check
    taken = set(bm.table("mate")[:2])
    bm.free("bad")  # preempted before the check
    bm.forget("bad")
    assert bm.num_cached == 0 and bm.checked() == taken and bm.checked() == set()
    bm.free("mate")
    _run(bm, "done", [7, 8, 9, 10, 11])
    bm.free("done")
    bm.checked()
    bm.forget("done")  # freed before the last check
    assert bm.num_cached == 2 and bm.checked() == set()


def test_forget_leaves_another_sequences_block_of_the_same_name() -> None:
    """Two prompts sharing a prefix computed it side by side (the second's own part is too long
    to wait for the first's blocks): the first cached the shared blocks, the second's copies are
    its own, uncached. The second's logits then came out NaN (its own tokens overflowed): taking
    out what it named by name took the first's good blocks too, so every later prompt with that
    prefix computed it again (and a prefill that had reused them was recomputed)."""
    bm = BlockManager(num_blocks=16, block_size=2, enable_prefix_caching=True)
    good, bad = [1, 2, 3, 4, 5], [1, 2, 3, 4, 9, 9, 9]
    for seq, ids in (("good", good), ("bad", bad)):
        bm.reuse_prefix(seq, ids, KEY)
        bm.grow(seq, len(ids))
    bm.computed("good", good, 0, len(good), KEY)
    bm.computed("bad", bad, 0, len(bad), KEY)
    assert bm.num_cached == 3  # [1, 2], [3, 4] (good's), [9, 9] (bad's)
    own = bm.table("bad")[2]
    bm.forget("bad")
    assert bm.num_cached == 2 and bm.checked() == {own}  # only bad's own [9, 9]
    assert bm.reuse_prefix("later", good, KEY) == 4 and bm.table("later")[:2] == bm.table("good")[:2]


def test_forget_leaves_the_blocks_named_before_the_step_whose_logits_were_not_finite() -> None:
    """A request whose logits went NaN at a decode step had cached its prompt's blocks at its
    prefill, whose logits were finite: they read every key and value before them, so those blocks
    are good. Taking them out too made a prompt that had reused them in the same step (async
    scheduling) compute its prompt again, and every later one. Only what the NaN step named goes
    (its first step: the blocks it reused too, ``test_a_failed_sequence_...`` above)."""
    bm = BlockManager(num_blocks=16, block_size=2, enable_prefix_caching=True)
    ids = [1, 2, 3, 4, 5]
    _run(bm, "bad", ids)  # names [1, 2], [3, 4]; finite
    bm.computed("bad", [*ids, 6], 5, 6, KEY)  # a decode that completes [5, 6]: NaN
    assert _run(bm, "mate", [*ids, 6, 7]) == 6
    last = bm.table("bad")[2]
    bm.forget("bad")
    assert bm.num_cached == 2 and bm.checked() == {last}
    assert bm.reuse_prefix("later", [*ids, 6, 7], KEY) == 4
    bm.free("later")
    # Freed before the check (preempted or aborted): the same, from the names it gave last
    _run(bm, "gone", [11, 12, 13, 14, 15])
    bm.computed("gone", [11, 12, 13, 14, 15, 16], 5, 6, KEY)
    bm.free("gone")
    bm.forget("gone")
    assert bm.cached_tokens([11, 12, 13, 14, 15, 16, 17], KEY, []) == 4
