"""The step log ``dlora bench policy`` and ``bench e2e`` keep of their own runs: the steps the
simulator's calibrated profile is fitted to (``dlora.sim.cost.from_steps``)."""

from __future__ import annotations

import pytest

from dlora.common.messages import SamplingParams
from dlora.loadgen.bench_policy import StepLog, replay
from dlora.loadgen.workload import RequestSpec
from dlora.model.make_tiny import TinyOutput
from dlora.sim.cost import STEP_FIELDS, from_steps
from tests.engine.helpers import make_engine


def test_each_step_is_logged_with_its_shape_and_its_cycle_less_its_switches(tiny_llama: TinyOutput) -> None:
    engine = make_engine(tiny_llama, policy="merged-only")
    specs = [RequestSpec(0.0, "lora-0", 6, 4), RequestSpec(0.0, "lora-1", 9, 3), RequestSpec(0.0, None, 5, 5)]
    specs += [RequestSpec(0.05, "lora-0", 7, 2)]  # admitted between steps: in a cycle
    log = StepLog(engine)
    results, end = replay(engine, specs, 30.0, log)
    st = engine.stats
    assert all(r.finish_s is not None for r in results) and st.merges >= 2
    assert len(log.rows) == st.steps and all(len(row) == len(STEP_FIELDS) for row in log.rows)
    decodes, prompt_tokens, prefills, segments, rank_tokens, seconds = zip(*log.rows)
    assert sum(prompt_tokens) == st.prefill_tokens == 6 + 9 + 5 + 7
    assert sum(prefills) == 4 and sum(decodes) + sum(prompt_tokens) == sum(
        s.prompt_len + s.output_len - 1 for s in specs
    )
    assert set(segments) == {0} and set(rank_tokens) == {0}  # merged steps run no LoRA delta
    # every cycle is positive, and together they leave out the merges and unmerges (the last one
    # closed as the loop ran out of work)
    assert min(seconds) > 0 and sum(seconds) <= end - st.switch_and_load_seconds()


def test_unmerged_steps_log_their_lora_work_and_fit_a_profile(tiny_llama: TinyOutput) -> None:
    engine = make_engine(tiny_llama, policy="unmerged-only")
    specs = [RequestSpec(0.0, f"lora-{i % 3}", 4 + i, 3 + i % 4) for i in range(8)]
    log = StepLog(engine)
    replay(engine, specs, 30.0, log)
    assert all(row[3] >= 1 and row[4] > 0 for row in log.rows)  # each step ran some adapter's delta
    profile = from_steps(log.rows, "this run")
    assert profile.step_s >= 0 and profile.name == "this run"


def test_a_cycle_runs_from_its_start_to_the_next_less_what_the_engine_spent_aside(tiny_llama: TinyOutput) -> None:
    """On a clock of its own: each cycle is the time to the next step's start less the step's
    switches and loads; one after which the loop idles ends with its outputs; a call that ran no
    step logs nothing and ends the cycle before it."""
    engine = make_engine(tiny_llama, policy="merged-only")
    for i, adapter in enumerate(("lora-0", "lora-1")):  # two adapters: merges and unmerges between
        engine.add_request(str(i), prompt_token_ids=[5 + i] * 6, params=SamplingParams(max_tokens=2), adapter=adapter)
    log, aside, now = StepLog(engine), [], 0.0
    while engine.has_unfinished():
        before = engine.stats.switch_and_load_seconds()
        log.starting(now)
        engine.step()
        aside.append(engine.stats.switch_and_load_seconds() - before)
        log.ran(now + 0.25)
        now += 1.0
    log.starting(now)  # a call in which nothing could run: no row
    log.ran(now + 0.25)
    assert len(log.rows) == len(aside) == engine.stats.steps and sum(aside) > 0
    expected = [1.0 - a for a in aside[:-1]] + [0.25 - aside[-1]]
    assert [row[-1] for row in log.rows] == pytest.approx(expected)
