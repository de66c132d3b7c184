"""The dLoRA policy keeps its reading of the queue (``dlora_shape.QueueShape``) while the engine
hands it the same entries (``queue_view.queued``): in the engine's own flow, every decision must be
the one a policy reading the queue anew makes, with what it learned as it stands then. Seeded runs
under KV pressure (``test_pressure_fuzz.draw``: preemption and recompute, prefix caching, chunked
prefill, async scheduling, token budgets, max_loras, priorities, resumed requests), with requests
aborted midway, an adapter turned unmergeable and back, and one unregistered and registered again
between runs of steps: whatever changes beside the entries, the kept reading must not go stale."""

from __future__ import annotations

import copy
import random
from dataclasses import replace

import pytest

from dlora.model.make_tiny import TinyOutput
from dlora.services.worker.engine import LLMEngine
from dlora.services.worker.policy import KvRoom, QueuedRequest, StepDecision
from dlora.services.worker.policy.dlora import DLoraPolicy
from tests.engine.helpers import make_engine
from tests.engine.test_pressure_fuzz import MAX_STEPS, SEEDS, arrive, counted, draw


class Tally:
    """The decisions checked, of them those made on a kept reading of the queue, and the modes
    (merged adapter or none, mixed) they chose."""

    def __init__(self) -> None:
        self.decided = 0
        self.kept = 0
        self.modes: set[tuple[bool, bool]] = set()


def checked(policy: DLoraPolicy, tally: Tally) -> None:
    """Make ``policy.decide`` decide each step twice: as it is (its kept reading), and as a copy of
    it with no reading kept (the queue read anew); they must agree in the decision, what it saw
    (``Basis``) and the policy's state after."""
    real = policy.decide

    def decide(queue: list[QueuedRequest], merged_now: str | None, kv: KvRoom | None = None) -> StepDecision:
        anew = copy.deepcopy(policy)  # what it learned, as it stands before this step
        anew._shape = None
        del anew.decide  # (the copy's own: not this check's again)
        before = policy._shape
        got = real(queue, merged_now, kv)
        want = anew.decide(queue, merged_now, kv)
        assert (got.merged, got.mixed, got.request_ids) == (want.merged, want.mixed, want.request_ids)
        assert got.basis == want.basis
        assert (policy.ranks, policy.checkpoint()) == (anew.ranks, anew.checkpoint())
        tally.decided += 1
        tally.kept += before is not None and policy._shape is before
        tally.modes.add((got.merged is not None, got.mixed))
        return got

    policy.decide = decide  # type: ignore[method-assign]


def run(tiny: TinyOutput, seed: int, roomy: bool, tally: Tally) -> None:
    """``seed``'s run, checked (``checked``). ``roomy``: prompts of 150 tokens and 40 decoded, on a
    cache of 32-token blocks that holds them: the engine keeps a decode's entry until its context
    grows by a sixteenth (``queue_view.queued``), and the free blocks stay as they are between the
    steps where one crosses a block bound, so a reading is kept for runs of steps."""
    requests, settings, num_blocks = draw(seed, tiny)
    settings["policy"] = "dlora"
    if roomy:
        requests = [replace(r, prompt=(r.prompt * 150)[:150], max_tokens=40) for r in requests]
        settings["block_size"], num_blocks = 32, 80
        settings.pop("max_num_batched_tokens", None)  # (a budget of 2 tokens fed 150 in 75 steps)
    engine: LLMEngine = make_engine(tiny, num_blocks=num_blocks, **settings)
    engine.clock = counted(engine)
    assert isinstance(engine.policy, DLoraPolicy)
    checked(engine.policy, tally)
    rng = random.Random(seed)
    aborted = {r.rid for r in rng.sample(requests, k=len(requests) // 4)}
    unused = sorted(set(tiny.adapters) - {r.adapter for r in requests})
    flipping = sorted(tiny.adapters)[0]
    last = max(r.at for r in requests)
    for t in range(MAX_STEPS):
        arrive(engine, requests, t)
        if t == last + 2:  # some requests aborted midway, whatever they are doing
            for rid in sorted(aborted):
                engine.abort(rid)
        if t % 7 == 3:  # an adapter found unmergeable, and later not (the engine shares its set)
            engine.merger.unmergeable.symmetric_difference_update({flipping})
        if t % 11 == 5 and unused:  # an adapter no request uses, dropped and read again
            engine.unregister_adapter(unused[0])
            engine.register_adapter(unused[0], tiny.adapters[unused[0]])
        if t > last + 2 and not engine.has_unfinished():
            break
        engine.step()
    else:
        pytest.fail(f"unfinished after {MAX_STEPS} steps ({settings})")


# (Two runs: each decides every step twice on a deep copy of the policy, ~5 s of CPU a run; the
# review's twelve seeds all agreed; with entries compared by request id, both of these fail.)
@pytest.mark.parametrize("roomy", [False, True], ids=["pressed", "roomy"])
@pytest.mark.parametrize("seed", SEEDS[:1])
def test_a_kept_reading_of_the_queue_decides_as_one_read_anew_in_the_engine(
    tiny_llama: TinyOutput, seed: int, roomy: bool
) -> None:
    tally = Tally()
    run(tiny_llama, seed, roomy, tally)
    # Roomy, a reading must have been kept for some steps and a mixed step decided: else the run
    # tests nothing. (Pressed, the free blocks change most steps, and a short context's entry with
    # each token: few readings are kept, at times none.)
    if roomy:
        assert tally.kept >= 10 and tally.kept * 6 >= tally.decided and (True, True) in tally.modes, vars(tally)
