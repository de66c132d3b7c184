"""Per-request behaviour: stopping, sampling, text, aborts and bad input."""

from __future__ import annotations

import pytest

from dlora.common.messages import FinishReason, SamplingParams
from dlora.model.make_tiny import TinyOutput
from dlora.services.worker.engine import EngineConfig, LLMEngine, RequestError
from tests.engine.helpers import kv_bytes_enough, make_engine

PROMPT = [5, 40, 41, 300, 17]


@pytest.fixture(scope="module")
def engine(tiny_llama: TinyOutput) -> LLMEngine:
    return make_engine(tiny_llama)


def collect(engine: LLMEngine, rid: str, **kw) -> tuple[list[int], str, FinishReason | None]:
    adapter = kw.pop("adapter", None)
    engine.add_request(rid, prompt_token_ids=kw.pop("prompt", PROMPT), params=SamplingParams(**kw), adapter=adapter)
    tokens, text, reason = [], "", None
    while engine.has_unfinished():
        for o in engine.step():
            if o.request_id == rid:
                tokens += o.new_token_ids
                text += o.new_text
                reason = o.finish_reason if o.finished else reason
    return tokens, text, reason


def test_max_tokens_gives_length(engine: LLMEngine) -> None:
    tokens, text, reason = collect(engine, "a", max_tokens=7)
    assert len(tokens) == 7 and reason is FinishReason.LENGTH
    assert text == engine.tokenizer.decode(tokens, skip_special_tokens=True)


def test_stop_token_id_ends_and_stays_in_tokens(engine: LLMEngine) -> None:
    full, _, _ = collect(engine, "a", max_tokens=10)
    tokens, text, reason = collect(engine, "b", max_tokens=10, stop_token_ids=[full[3]])
    assert tokens == full[: full.index(full[3]) + 1] and reason is FinishReason.STOP
    # Its text is left out (as vLLM leaves the ending token out of detokenization), unless asked for.
    assert text == engine.tokenizer.decode(tokens[:-1], skip_special_tokens=True)
    _, kept, _ = collect(engine, "c", max_tokens=10, stop_token_ids=[full[3]], include_stop_str_in_output=True)
    assert kept == engine.tokenizer.decode(tokens, skip_special_tokens=True) != text


def test_the_text_of_an_eos_token_is_not_output(engine: LLMEngine) -> None:
    full, _, _ = collect(engine, "a", max_tokens=10)
    engine.eos_ids.add(full[2])  # the third generated token ends the request (the set is shared)
    try:
        tokens, text, _ = collect(engine, "b", max_tokens=10, skip_special_tokens=False)
        _, kept, _ = collect(engine, "c", max_tokens=10, skip_special_tokens=False, include_stop_str_in_output=True)
    finally:
        engine.eos_ids.discard(full[2])
    assert text == engine.tokenizer.decode(tokens[:-1], skip_special_tokens=False)
    assert kept == engine.tokenizer.decode(tokens, skip_special_tokens=False)


def test_eos_stops_unless_ignored(engine: LLMEngine) -> None:
    eos = next(iter(engine.eos_ids))
    full, _, _ = collect(engine, "a", max_tokens=10)
    engine.eos_ids.add(full[2])  # make the third generated token an end-of-sequence token
    try:
        stopped, _, reason = collect(engine, "b", max_tokens=10)
        ignored, _, _ = collect(engine, "c", max_tokens=10, ignore_eos=True)
    finally:
        engine.eos_ids = {eos}
    assert reason is FinishReason.STOP and stopped == full[: full.index(full[2]) + 1]
    assert ignored == full


def test_the_generation_configs_end_of_sequence_ids_stop_as_transformers_stops(
    tiny_llama: TinyOutput, tmp_path
) -> None:
    import json
    import shutil

    import torch
    from transformers import AutoModelForCausalLM

    full, _, _ = collect(make_engine(tiny_llama), "a", max_tokens=10)
    model = shutil.copytree(tiny_llama.model, tmp_path / "model")
    (model / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, full[2]], "bos_token_id": 1}))
    engine = LLMEngine(str(model), EngineConfig(kv_cache_bytes=kv_bytes_enough(tiny_llama)))
    engine.add_request("b", prompt_token_ids=PROMPT, params=SamplingParams(max_tokens=10))
    outs = [o for _ in range(12) for o in engine.step()]
    stopped = [t for o in outs for t in o.new_token_ids]
    assert stopped == full[: full.index(full[2]) + 1] and outs[-1].finish_reason is FinishReason.STOP
    assert outs[-1].stop_reason == full[2]  # named, as vLLM makes these ids stop_token_ids
    reference = AutoModelForCausalLM.from_pretrained(model).generate(
        torch.tensor([PROMPT]), attention_mask=torch.ones(1, len(PROMPT)), max_new_tokens=10, do_sample=False
    )
    assert reference[0, len(PROMPT) :].tolist() == stopped


def test_stop_string_is_cut_and_never_streamed(engine: LLMEngine) -> None:
    full_tokens, full_text, _ = collect(engine, "a", max_tokens=16)
    stop = full_text[5:8]
    assert stop and stop in full_text
    _, text, reason = collect(engine, "b", max_tokens=16, stop=[stop, "never-seen"])
    assert reason is FinishReason.STOP
    assert text == full_text[: full_text.index(stop)]
    _, kept, _ = collect(engine, "c", max_tokens=16, stop=[stop], include_stop_str_in_output=True)
    assert kept == full_text[: full_text.index(stop) + len(stop)]


def test_a_lone_stop_string_is_one_stop_as_vllm_takes_it(engine: LLMEngine) -> None:
    """vLLM's ``SamplingParams(stop="Human:")``, through the Python API: the str was iterated as
    the list it is typed, so the request stopped at any one of its characters."""
    _, full_text, _ = collect(engine, "a", max_tokens=16)
    # three characters of the text, one of which comes sooner alone
    stop = next(
        stop
        for i in range(len(full_text) - 2)
        if "\ufffd" not in (stop := full_text[i : i + 3])
        and full_text.index(stop) > min(full_text.index(c) for c in stop)
    )
    as_list = collect(engine, "b", max_tokens=16, stop=[stop])
    assert collect(engine, "c", max_tokens=16, stop=stop) == as_list
    assert as_list[1] == full_text[: full_text.index(stop)]
    assert SamplingParams(stop=stop).stop == [stop]


def test_the_lists_vllm_leaves_none_are_unset_as_vllm_takes_them(engine: LLMEngine) -> None:
    """vLLM's SamplingParams defaults stop, stop_token_ids, bad_words, logit_bias and
    allowed_token_ids to None, so a vLLM user's ``SamplingParams(stop=None)`` (``stop=args.stop``)
    is ordinary; through the Python API it was refused ("Expected `array`, got `null`"), where
    ``dlora generate`` and the gateway take the null as unset."""
    nulls = dict.fromkeys(("stop", "stop_token_ids", "bad_words", "logit_bias", "allowed_token_ids"))
    assert collect(engine, "nulls", max_tokens=8, **nulls) == collect(engine, "unset", max_tokens=8)
    assert SamplingParams(**nulls) == SamplingParams()


@pytest.mark.parametrize(
    "given, field",
    [
        ({"max_tokens": "8"}, "max_tokens"),
        ({"seed": "3"}, "seed"),
        ({"stop_token_ids": 7}, "stop_token_ids"),
        ({"stop_token_ids": [[7], [7]]}, "stop_token_ids"),  # (unhashable: the dedupe leaves it to the check)
        ({"bad_words": "never"}, "bad_words"),
    ],
)
def test_params_of_another_type_are_refused_naming_the_field(engine: LLMEngine, given: dict, field: str) -> None:
    """Through the Python API, vLLM's ``SamplingParams(max_tokens=None)`` (and any value of
    another type) failed later as a TypeError from a comparison, naming nothing."""
    with pytest.raises(RequestError, match=f"at `\\$.{field}[`[]") as e:
        engine.add_request("typed", prompt_token_ids=PROMPT, params=SamplingParams(**given))
    assert e.value.param == field and "typed" not in engine.seqs


def test_a_numpy_value_leaves_the_other_fields_checked(engine: LLMEngine) -> None:
    """A numpy int (a benchmark script's ``max_tokens=rng.integers(...)``) made the type check
    give up on every field: ``stop_token_ids=7`` beside it failed later as a TypeError naming
    nothing. Numpy's values themselves are taken as their Python ones, as before."""
    import numpy as np

    with pytest.raises(RequestError, match="stop_token_ids") as e:
        engine.add_request(
            "np", prompt_token_ids=PROMPT, params=SamplingParams(max_tokens=np.int64(4), stop_token_ids=7)
        )
    assert e.value.param == "stop_token_ids" and "np" not in engine.seqs
    taken = {"max_tokens": np.int64(4), "temperature": np.float32(0.0), "ignore_eos": np.bool_(True)}
    assert collect(engine, "np", **taken) == collect(engine, "py", max_tokens=4, ignore_eos=True)


def test_params_decoded_off_the_wire_are_not_type_checked_again(engine: LLMEngine, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """The worker's requests were decoded (types checked there): the Python API's round trip of
    every field is not run again for each (up to milliseconds for the longest allowed_token_ids)."""
    from dlora.services.worker.engine import admission

    checked: list[SamplingParams] = []
    monkeypatch.setattr(admission, "_check_types", checked.append)
    engine.add_request("wire", prompt_token_ids=PROMPT, params=SamplingParams(max_tokens=2), decoded=True)
    engine.add_request("api", prompt_token_ids=PROMPT, params=SamplingParams(max_tokens=2))
    assert [p.max_tokens for p in checked] == [2]  # the Python API's alone
    for rid in ("wire", "api"):
        engine.abort(rid)


def test_max_tokens_none_fills_the_context_the_prompt_leaves_as_vllm(engine: LLMEngine) -> None:
    """vLLM's ``SamplingParams(max_tokens=None)``: its engine generates up to the context
    (max_model_len less the prompt). The Python API refused it, as a value of another type."""
    room = 3
    prompt = [5] * (engine.max_model_len - room)
    tokens, _, reason = collect(engine, "fill", prompt=prompt, max_tokens=None, ignore_eos=True)
    assert (len(tokens), reason) == (room, FinishReason.LENGTH)
    engine.add_request("text", prompt="kalo remi", params=SamplingParams(max_tokens=None))
    rest = engine.max_model_len - len(engine.tokenizer.encode("kalo remi"))
    assert engine.seqs["text"].params.max_tokens == rest  # the text prompt's tokens, not its characters
    engine.abort("text")
    with pytest.raises(RequestError, match="context") as e:  # a prompt that leaves none: too long, named
        engine.add_request("full", prompt_token_ids=[5] * engine.max_model_len, params=SamplingParams(max_tokens=None))
    assert e.value.param == "prompt_token_ids" and "full" not in engine.seqs


def test_seeded_sampling_repeats_whatever_else_runs(engine: LLMEngine) -> None:
    alone, _, _ = collect(engine, "a", max_tokens=12, temperature=1.0, top_p=0.9, seed=11)
    for i in range(3):  # neighbours with their own randomness join the batch
        engine.add_request(
            f"n{i}", prompt_token_ids=[7, 8, 9 + i], params=SamplingParams(max_tokens=12, temperature=1.0)
        )
    crowded, _, _ = collect(engine, "b", max_tokens=12, temperature=1.0, top_p=0.9, seed=11)
    assert alone == crowded
    other, _, _ = collect(engine, "c", max_tokens=12, temperature=1.0, top_p=0.9, seed=12)
    assert other != alone


def test_a_seeded_request_resumed_anywhere_draws_what_it_would_have(engine: LLMEngine) -> None:
    params = dict(max_tokens=12, temperature=1.0, top_p=0.9, seed=11)
    whole, _, _ = collect(engine, "a", **params)
    for k in (1, 5, 11):  # as a worker taking it over after k tokens (moved, or its worker died)
        engine.add_request(
            f"r{k}", prompt_token_ids=PROMPT, params=SamplingParams(**params), resume_token_ids=whole[:k]
        )
        rest = []
        while engine.has_unfinished():
            rest += [t for o in engine.step() for t in o.new_token_ids]
        assert whole[:k] + rest == whole


def test_a_request_resumed_here_goes_ahead_of_those_that_arrived_here(engine: LLMEngine) -> None:
    """A request moved in (or recovered from a lost worker) was running elsewhere: it goes ahead of
    the requests waiting here, in the order such requests come, not behind them as a fresh arrival
    (then migration delayed the very requests it moved: issue 21); but behind those running, whose
    decodes its recompute would otherwise stall."""
    params = SamplingParams(max_tokens=8)
    engine.add_request("running", prompt_token_ids=PROMPT, params=params)
    engine.step()  # prefilled: running
    for rid in ("q1", "q2"):
        engine.add_request(rid, prompt_token_ids=PROMPT, params=params)
    engine.add_request("moved-1", prompt_token_ids=PROMPT, params=params, resume_token_ids=[7, 8])
    engine.add_request("q3", prompt_token_ids=PROMPT, params=params)
    engine.add_request("moved-2", prompt_token_ids=PROMPT, params=params, resume_token_ids=[9])
    order = ["running", "moved-1", "moved-2", "q1", "q2", "q3"]
    assert [r.request_id for r in engine.queue()] == order
    while engine.has_unfinished():
        engine.step()
    engine.add_request("alone", prompt_token_ids=PROMPT, params=params, resume_token_ids=[7])  # none waits
    assert [r.request_id for r in engine.queue()] == ["alone"]
    engine.abort("alone")


def test_priority_orders_the_queue_before_arrival_and_resumed_requests_within_theirs(engine: LLMEngine) -> None:
    """vLLM's priority scheduling: lower first, then arrival; a resumed request goes ahead of the
    waiting requests of its own priority only."""
    params = SamplingParams(max_tokens=4)
    for rid, priority in (("normal-1", 0), ("late-urgent", -1), ("low", 3), ("normal-2", 0)):
        engine.add_request(rid, prompt_token_ids=PROMPT, params=params, priority=priority)
    engine.add_request("moved-low", prompt_token_ids=PROMPT, params=params, resume_token_ids=[7], priority=3)
    order = ["late-urgent", "normal-1", "normal-2", "moved-low", "low"]
    assert [r.request_id for r in engine.queue()] == order
    while engine.has_unfinished():
        engine.step()


def test_the_most_urgent_request_runs_first_and_the_least_is_preempted_first(tiny_llama: TinyOutput) -> None:
    """One sequence a step: the request with the lowest priority value runs first though it came
    last. Short of KV blocks, the lowest priority gives its blocks back first, whatever its arrival."""
    engine = make_engine(tiny_llama, max_num_seqs=1)
    finished = []
    for rid, priority in (("first", 0), ("urgent", -5)):
        engine.add_request(rid, prompt_token_ids=PROMPT, params=SamplingParams(max_tokens=3), priority=priority)
    while engine.has_unfinished():
        finished += [o.request_id for o in engine.step() if o.finished]
    assert finished == ["urgent", "first"]
    # Two requests that together outgrow a cache of 4 blocks of 16: the low-priority one, though
    # first to arrive and running, is preempted for the urgent one.
    engine = make_engine(tiny_llama, num_blocks=4, block_size=16)
    long = [3 + i % 200 for i in range(20)]
    engine.add_request("low", prompt_token_ids=long, params=SamplingParams(max_tokens=20, ignore_eos=True), priority=1)
    engine.step()
    engine.add_request("urgent", prompt_token_ids=long, params=SamplingParams(max_tokens=20, ignore_eos=True))
    while engine.has_unfinished() and not engine.stats.preemptions:
        engine.step()
    assert engine.stats.preemptions and engine.seqs["low"].num_preemptions == 1
    assert "urgent" not in engine.seqs or engine.seqs["urgent"].num_preemptions == 0


def test_abort_frees_blocks_and_spares_others(engine: LLMEngine) -> None:
    free = engine.blocks.num_free
    engine.add_request("x", prompt_token_ids=PROMPT, params=SamplingParams(max_tokens=50))
    engine.add_request("y", prompt_token_ids=PROMPT, params=SamplingParams(max_tokens=3))
    engine.step()
    assert engine.abort("x") and not engine.abort("x")
    outs = []
    while engine.has_unfinished():
        outs += engine.step()
    assert {o.request_id for o in outs} == {"y"} and engine.blocks.num_free == free


def test_a_bad_sampling_parameter_is_named_as_the_gateway_names_it(engine: LLMEngine) -> None:
    """A trial over NATS: an application's error chunk said param null where the gateway names the
    field (RequestError.param is TokenChunk.param)."""
    for params, field in (
        (SamplingParams(max_tokens=0), "max_tokens"),
        (SamplingParams(temperature=-0.1), "temperature"),
    ):
        with pytest.raises(RequestError) as e:
            engine.add_request("bad", prompt_token_ids=[1], params=params)
        assert e.value.param == field
    with pytest.raises(RequestError) as e:
        engine.add_request("bad", prompt="a", prompt_token_ids=[1])
    assert e.value.param == "prompt"


@pytest.mark.parametrize(
    "kwargs,fragment",
    [
        (dict(prompt_token_ids=[]), "empty"),
        (dict(prompt_token_ids=[1, 99999]), "token ids"),
        (dict(prompt_token_ids=list(range(3)) * 300), "context holds"),
        (dict(prompt_token_ids=[1], adapter="nope"), "not registered"),
        (dict(prompt="a", prompt_token_ids=[1]), "exactly one"),
        (dict(prompt_token_ids=[1], params=SamplingParams(top_p=2.0)), "top_p"),
        (dict(prompt_token_ids=[1], params=SamplingParams(max_tokens=2), resume_token_ids=[3, 4, 5]), "max_tokens"),
        # found by a probe over NATS: the prompt's own text came out as output
        (dict(prompt_token_ids=[1], resume_text_pending=3), "resume_text_pending"),
        (dict(prompt_token_ids=[1], resume_token_ids=[3], resume_text_pending=2), "resume_text_pending"),
        (dict(prompt_token_ids=[1], resume_token_ids=[3], resume_text_pending=-1), "resume_text_pending"),
        (dict(prompt_token_ids=[1], params=SamplingParams(seed=1 << 64)), "seed"),
        (dict(prompt_token_ids=[1], params=SamplingParams(stop=["x"] * 257)), "at most 256"),
    ],
)
def test_bad_requests_are_refused_and_nothing_else_is_lost(engine: LLMEngine, kwargs: dict, fragment: str) -> None:
    engine.add_request("keep", prompt_token_ids=PROMPT, params=SamplingParams(max_tokens=2))
    with pytest.raises(RequestError, match=fragment):
        engine.add_request("bad", **kwargs)
    with pytest.raises(RequestError, match="already in flight"):
        engine.add_request("keep", prompt_token_ids=PROMPT)
    done = []
    while engine.has_unfinished():
        done += [o.request_id for o in engine.step() if o.finished]
    assert done == ["keep"]


def test_text_prompts_are_tokenized(engine: LLMEngine) -> None:
    engine.add_request("t", prompt="kalo remi", params=SamplingParams(max_tokens=2))
    out = engine.step()[0]
    assert out.num_prompt_tokens == len(engine.tokenizer.encode("kalo remi"))


def test_bfloat16_runs_every_mode(tiny_llama: TinyOutput) -> None:
    for policy in ("merged-only", "unmerged-only", "dlora"):
        eng = make_engine(tiny_llama, dtype="bfloat16", policy=policy)
        for i, name in enumerate([None, *tiny_llama.adapters]):
            eng.add_request(str(i), prompt_token_ids=PROMPT, params=SamplingParams(max_tokens=4), adapter=name)
        n = 0
        while eng.has_unfinished():
            n += sum(len(o.new_token_ids) for o in eng.step())
        assert n == 4 * (len(tiny_llama.adapters) + 1)


def test_step_costs_are_accounted(tiny_llama: TinyOutput) -> None:
    eng = make_engine(tiny_llama)
    eng.add_request("a", prompt_token_ids=PROMPT, params=SamplingParams(max_tokens=3))
    while eng.has_unfinished():
        eng.step()
    st = eng.stats
    assert (st.steps, st.tokens_generated, st.prefill_tokens) == (3, 3, len(PROMPT))
    assert 0 < st.prefill_seconds < st.step_seconds


def test_a_step_reports_what_it_fed_before_it_advanced(tiny_llama: TinyOutput) -> None:
    """Stats and the policy's record count the tokens a step fed (a prefill of the whole prompt,
    then one per decode), not what the sequences look like once the step has advanced them."""
    engine = make_engine(tiny_llama)
    seen: list[tuple[int, list[str]]] = []
    observe = engine.policy.observe
    engine.policy.observe = lambda decision, record: (
        seen.append((record.num_tokens, record.request_ids)),
        observe(decision, record),
    )[-1]
    engine.add_request("a", prompt_token_ids=PROMPT, params=SamplingParams(max_tokens=3))
    while engine.has_unfinished():
        engine.step()
    assert seen == [(len(PROMPT), ["a"]), (1, ["a"]), (1, ["a"])]
    assert (engine.stats.prefill_tokens, engine.stats.tokens_generated) == (len(PROMPT), 3)


def test_a_max_model_len_over_the_models_context_is_refused(tiny_llama: TinyOutput) -> None:
    """A user's trial: max_model_len 100,000 on a 512-position model started, and a 600-token prompt
    was served past the positions the model knows (vLLM refuses it)."""
    context = make_engine(tiny_llama).model_config.context_length()
    with pytest.raises(ValueError, match=f"max_model_len {context + 1} is over the model's context length {context}"):
        make_engine(tiny_llama, max_model_len=context + 1)
    assert make_engine(tiny_llama, max_model_len=context).max_model_len == context


def test_a_first_output_says_how_long_since_its_request_was_first_scheduled(tiny_llama: TinyOutput) -> None:
    """A helper's finding: the worker's queue time (vLLM's: until the request is first scheduled)
    ran to its first token, a 29-step chunked prefill counted as 96 % of the time to first token.
    The first output says how long since the first step that scheduled it; the worker takes that
    off (``chunks.chunk_for``)."""
    from dlora.common.messages import GenerateRequest
    from dlora.services.worker.chunks import chunk_for, open_stream

    engine = make_engine(tiny_llama, max_num_batched_tokens=8)  # chunked prefill is on by default
    clock = [100.0]
    engine.clock = lambda: clock[0]
    prompt = [5 + i % 90 for i in range(40)]  # five chunks of 8
    engine.add_request("r", prompt_token_ids=prompt, params=SamplingParams(max_tokens=2))
    clock[0] += 3.0  # it waits 3 s for its first step
    outputs = []
    while not outputs:
        outputs = engine.step()
        clock[0] += 1.0
    [first] = outputs
    assert first.scheduled_s == 4.0  # five steps: scheduled at the first's start, taken at the last's end
    stream = open_stream(GenerateRequest(request_id="r", reply_to="x", prompt_token_ids=prompt), now=10.0)
    assert chunk_for(first, stream, "w", now=10.0 + 3.0 + 5.0).queue_seconds == pytest.approx(4.0)
