"""Seeded random runs under KV pressure against the same requests on a roomy cache: the scheduler's
preemption, recompute and admission rules (``scheduler.py``) may reorder work, never change a
token, leave a request unfinished or a block held, or start a prompt of a lower priority on the
blocks a step took from a higher one. Each seed draws requests (shared prefixes, adapters and the
base model, priorities -1..2, staggered arrivals, some resumed with tokens made elsewhere) and an
engine (block size, policy, async scheduling, prefix caching, chunked prefill, max_loras, a token
budget) with a cache of the fewest blocks the longest request needs, or up to two more. Helpers' scratch
fuzzing found the scheduler's hangs this way; these seeds are a fast regression net (seconds), not
the search: rules that only reorder or waste work (a recompute passed over, an eviction for
nothing) change no token and are tested case by case (``test_preemption_order.py``)."""

from __future__ import annotations

import functools
import itertools
import math
import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest

from dlora.common.messages import SamplingParams
from dlora.model.make_tiny import TinyOutput
from dlora.services.worker.engine import LLMEngine
from tests.engine.helpers import make_engine

POLICIES = ["unmerged-only", "merged-only", "mixed-only", "dlora"]
# Steps a run may take: its requests end in well under it (at most 16 of at most 43 tokens, fed
# a few at a time), so one that reaches it has stalled.
MAX_STEPS = 600
# Of seeds 1000-1399, ones that preempt often, and those that caught a rule taken out: without the
# scheduler's floor 1032, 1041, 1055, 1088, 1099, 1107, 1142, 1146 and 1291 start a lower priority
# on a victim's blocks; without the head-of-line pass and the prompts ahead spared (4b1f664) 1070,
# 1187 and 1240 never end (1265 and 1291 at times, when the dlora policy's steps were timed by the
# machine's clock: ``run`` gives it one of its own).
SEEDS = [
    1010,
    1032,
    1040,
    1041,
    1048,
    1052,
    1055,
    1065,
    1069,
    1070,
    1088,
    1089,
    1097,
    1099,
    1102,
    1107,
    1111,
    1112,
    1118,
    1142,
    1146,
    1187,
    1240,
    1265,
    1291,
]


@dataclass(frozen=True)
class Request:
    rid: str
    prompt: list[int]
    resumed: list[int]  # tokens it made elsewhere before it came here (a move, a lost worker)
    adapter: str | None
    priority: int
    max_tokens: int
    at: int  # the step it arrives before


def draw(seed: int, tiny: TinyOutput) -> tuple[list[Request], dict[str, Any], int]:
    """The seed's requests, engine settings, and the fewest blocks that hold its longest request."""
    rng = random.Random(seed)
    adapters = [*sorted(tiny.adapters)[:3], None]
    requests = []
    for i in range(rng.randint(6, 16)):
        shared = rng.choice([[7, 8, 9, 10, 11, 12, 13, 14], [7, 8, 9, 10], []])
        prompt = (shared + [rng.randrange(1, 500) for _ in range(rng.randint(1, 14))])[:20]
        resumed = [rng.randrange(1, 500) for _ in range(rng.choice([0, 0, 0, 2, 5, 9]))]
        requests.append(
            Request(
                f"q{i}",
                prompt,
                resumed,
                rng.choice(adapters),
                rng.choice([0, 0, 0, 1, -1, 2]),
                rng.randint(1, 12),
                rng.randint(0, 20),
            )
        )
    bs = rng.choice([1, 2, 4, 8, 16])
    chunked = rng.random() < 0.6
    settings: dict[str, Any] = dict(
        block_size=bs,
        policy=rng.choice(POLICIES),
        async_scheduling=rng.random() < 0.5,
        enable_prefix_caching=rng.random() < 0.6,
        enable_chunked_prefill=chunked,
        max_loras=rng.choice([1, 2, 8]),
    )
    need = max(len(r.prompt) + len(r.resumed) + r.max_tokens for r in requests)
    if rng.random() < 0.5:
        settings["max_num_batched_tokens"] = rng.choice([2, 3, 8, 16]) if chunked else max(32, need)
    min_blocks = -(-need // bs)
    return requests, settings, rng.randint(min_blocks, min_blocks + 2)


def counted(_engine: LLMEngine) -> Callable[[], float]:
    """A millisecond a look at the clock: the dlora policy prices steps by the seconds measured, and
    the machine's load chose its merges (``test_policy_clock_adversary.py`` chooses them on purpose)."""
    return functools.partial(next, itertools.count(0.0, 1e-3))


def arrive(engine: LLMEngine, requests: list[Request], t: int) -> None:
    """The requests drawn to arrive at step ``t``, added to ``engine``."""
    for r in (r for r in requests if r.at == t):
        params = SamplingParams(max_tokens=r.max_tokens + len(r.resumed), ignore_eos=True)
        engine.add_request(
            r.rid,
            prompt_token_ids=r.prompt,
            params=params,
            adapter=r.adapter,
            priority=r.priority,
            resume_token_ids=r.resumed or None,
        )


def run(
    tiny: TinyOutput,
    requests: list[Request],
    num_blocks: int,
    clock: Callable[[LLMEngine], Callable[[], float]] = counted,
    **settings: Any,
) -> tuple[dict[str, list[int]], int]:
    """Tokens per request once all finish; the preemptions. Fails on a stall or a block left held.
    ``clock``: the engine's clock, made for it."""
    engine = make_engine(tiny, num_blocks=num_blocks, **settings)
    engine.clock = clock(engine)
    got: dict[str, list[int]] = {r.rid: [] for r in requests}
    last = max(r.at for r in requests)
    for t in range(MAX_STEPS):
        arrive(engine, requests, t)
        if t > last and not engine.has_unfinished():
            break
        before = {rid: (engine.blocks.holds(rid), s.num_preemptions) for rid, s in engine.seqs.items()}
        for o in engine.step():
            got[o.request_id] += o.new_token_ids
        check_admissions(engine, before)
    else:
        pytest.fail(f"unfinished after {MAX_STEPS} steps: {sorted(engine.seqs)} ({settings}, {num_blocks} blocks)")
    assert engine.blocks.num_free == engine.blocks.num_blocks, "blocks left held"
    return got, engine.stats.preemptions


def check_admissions(engine: LLMEngine, before: dict[str, tuple[bool, int]]) -> None:
    """No prompt of a lower priority than one a step preempted starts in that step, on the blocks
    given up (``before``: each request's holding blocks and preemptions before the step); vLLM
    starts no waiting request in a step that preempted, dLoRA none below the victims' priority.
    (One of the victims' own priority may: a victim itself, its prefix still cached, starts again.)"""
    seqs, holds = engine.seqs, engine.blocks.holds
    victims = [s for rid, s in seqs.items() if rid in before and s.num_preemptions > before[rid][1]]
    floor = min((s.priority for s in victims), default=math.inf)
    started = [rid for rid, s in seqs.items() if rid in before and not before[rid][0] and holds(rid)]
    assert not [rid for rid in started if seqs[rid].priority > floor], "a lower priority started on the blocks freed"


@pytest.mark.parametrize("seed", SEEDS)
def test_kv_pressure_changes_no_token_and_ends_every_request(tiny_llama: TinyOutput, seed: int) -> None:
    requests, settings, num_blocks = draw(seed, tiny_llama)
    roomy, _ = run(tiny_llama, requests, 400, **settings)
    pressured, _ = run(tiny_llama, requests, num_blocks, **settings)
    assert pressured == roomy, (settings, num_blocks)
