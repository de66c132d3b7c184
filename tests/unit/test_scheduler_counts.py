"""What the scheduler counts: prefix-cache lookups (vLLM's prefix_cache_queries / hits, kept on
each sequence until its step is kept: ``Sequence.lookup``) and preemptions (``num_preemptions``,
the engine's ``vllm:num_preemptions`` counts the same ones)."""

from dlora.services.worker.engine.block_manager import BlockManager
from dlora.services.worker.engine.scheduler import forget_lookup, preempt, schedule
from dlora.services.worker.engine.sequence import PRIORITY_SPAN, Sequence
from dlora.services.worker.policy import StepDecision
from tests.unit.test_scheduler import CHUNKED, LIMITS, running, seq


def test_a_fresh_prefill_starts_after_its_cached_prefix_and_the_lookup_is_counted() -> None:
    bm = BlockManager(num_blocks=64, block_size=4, enable_prefix_caching=True)
    first = seq("a", 0, 10)
    schedule(StepDecision(None, ["a"]), {"a": first}, bm, CHUNKED)
    bm.computed("a", first.all_ids(), 0, 10, b"k")
    again = seq("b", 1, 12)  # the same first ten tokens
    schedule(StepDecision(None, ["b"]), {"b": again}, bm, CHUNKED, cache_key=lambda _: b"k")
    assert again.num_cached == 8 and again.num_scheduled == 4
    assert again.lookup == (12, 8) and again.num_cached_prompt == 8


def test_only_lookups_a_cache_could_answer_are_counted() -> None:
    """vLLM's prefix-cache queries: none with the cache off (the hit ratio read 0 % instead of no
    data), none by a preempted request looking up its own blocks again (they inflated the hits)."""
    off = BlockManager(num_blocks=64, block_size=4)
    cold = seq("a", 0, 10)
    schedule(StepDecision(None, ["a"]), {"a": cold}, off, CHUNKED)
    assert cold.lookup is None
    bm = BlockManager(num_blocks=64, block_size=4, enable_prefix_caching=True)
    again = seq("b", 0, 10)
    schedule(StepDecision(None, ["b"]), {"b": again}, bm, CHUNKED)
    assert again.lookup == (10, 0)
    again.lookup = None  # the engine took it into its stats once the step was kept
    bm.computed("b", again.all_ids(), 0, 10, b"")
    preempt(again, bm)
    schedule(StepDecision(None, ["b"]), {"b": again}, bm, CHUNKED)
    assert again.num_cached == 8 and again.lookup is None and again.num_cached_prompt == 0


def _admitted_after_a_cached_prompt() -> tuple[BlockManager, Sequence]:
    """A cache holding prompt "a" (10 tokens: two full blocks of 4), and "m", of the same tokens,
    admitted after it, its lookup pending."""
    bm = BlockManager(num_blocks=64, block_size=4, enable_prefix_caching=True)
    first = seq("a", 0, 10)
    schedule(StepDecision(None, ["a"]), {"a": first}, bm, CHUNKED)
    bm.computed("a", first.all_ids(), 0, 10, b"")
    mate = seq("m", 1, 10)
    schedule(StepDecision(None, ["m"]), {"m": mate}, bm, CHUNKED)
    return bm, mate


def test_a_prefill_preempted_before_its_row_was_looked_at_keeps_the_preemption_and_looks_up_anew() -> None:
    """``async_scheduling.recompute``: a prefill whose forward ran on blocks later found not finite
    is preempted (``preempt``) and its lookup forgotten (``forget_lookup``). The engine counted it
    in vllm:num_preemptions, but ``forget_lookup`` took it off the request's own count (which it
    had lowered so that the next lookup counted): the two disagreed. Now both count it, and the
    next lookup still counts, as the one the request ran on."""
    bm, mate = _admitted_after_a_cached_prompt()
    assert mate.lookup == (10, 8)
    preempt(mate, bm)
    forget_lookup(mate)
    assert mate.num_preemptions == 1 and mate.lookup is None and mate.num_cached_prompt == 0
    schedule(StepDecision(None, ["m"]), {"m": mate}, bm, CHUNKED)
    assert mate.lookup == (10, 8) and mate.num_cached_prompt == 8 and mate.num_preemptions == 1


def test_a_recomputed_prefill_of_a_request_preempted_before_forgets_no_lookup_already_counted() -> None:
    """A request whose first lookup the stats took in, preempted, then admitted again with its
    prefill dropped (``async_scheduling.recompute``: ``preempt`` and ``forget_lookup``) had its
    first lookup forgotten as if it were still pending: its next admission was counted again (the
    queries and hits twice for one request) and its usage's ``cached_tokens`` said what that third
    look found. Only a lookup not yet counted is forgotten."""
    bm, mate = _admitted_after_a_cached_prompt()
    assert mate.take_lookup() == (10, 8)  # the engine counted it once its step was kept
    bm.computed("m", mate.all_ids(), 0, 10, b"")
    preempt(mate, bm)
    schedule(StepDecision(None, ["m"]), {"m": mate}, bm, CHUNKED)  # its own blocks again: no lookup
    assert mate.lookup is None
    preempt(mate, bm)
    forget_lookup(mate)
    bm.free("a")
    bm.reset_prefix_cache()  # the third look finds nothing
    schedule(StepDecision(None, ["m"]), {"m": mate}, bm, CHUNKED)
    assert mate.lookup is None and mate.num_cached_prompt == 8 and mate.num_preemptions == 2


def test_a_readmission_taken_back_in_its_step_forgets_no_lookup_already_counted() -> None:
    """``_take_back`` (a prompt admitted and preempted in one step) forgets its lookup too: one
    admitted again after a preemption, its first lookup long counted, had it forgotten, and its
    next admission was counted again."""
    bm = BlockManager(num_blocks=4, block_size=4, enable_prefix_caching=True)
    urgent = running(seq("urgent", 0, 12, outputs=1), bm)  # 3 blocks: its next token needs the 4th
    prompt = seq("prompt", 1 + 5 * PRIORITY_SPAN, 3)  # a lower priority, decided first
    prompt.looked_up, prompt.num_cached_prompt, prompt.num_preemptions = True, 2, 1  # counted, then preempted
    plan = schedule(StepDecision(None, ["prompt", "urgent"]), {"prompt": prompt, "urgent": urgent}, bm, LIMITS)
    assert plan.seqs == [urgent] and prompt.num_preemptions == 1  # taken back
    assert prompt.looked_up and prompt.lookup is None and prompt.num_cached_prompt == 2
