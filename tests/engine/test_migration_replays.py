"""Public reports about moving a running request (vLLM's KV-transfer connectors and P/D
disaggregation, SGLang's PD disaggregation, Llumnix's migration) replayed against two engines:
each test names its reports, moves a request between a source and a destination engine as a
worker does (``moves.handoff`` builds what goes on the wire, the destination takes it in as
``admit`` does) and checks the moved request against one that never moved, token for token, or
the blocks and counts the report is about. The stop-string seam is ``test_move_seam.py``'s, a
seeded request under async scheduling ``test_async_scheduling.py``'s, a grammar's state
``test_structured_after.py``'s, the adapter's version ``tests/integration/test_move_versions.py``'s."""

from __future__ import annotations

import json
from collections.abc import Iterator

import msgspec
import pytest

from dlora.common.messages import FinishReason, GenerateRequest, SamplingParams, TokenLogprob
from dlora.model.make_tiny import TinyOutput
from dlora.services.worker.engine import LLMEngine, RequestError
from dlora.services.worker.engine.kv_transfer import KVSnapshot
from dlora.services.worker.engine.sequence import Status
from dlora.services.worker.engine.structured import GrammarError, GrammarUnavailable
from dlora.services.worker.moves import handoff
from tests.engine.helpers import make_engine

PROMPT = [9, 10, 11, 12, 13, 14, 15, 16]
STEPS = 60  # far over what a test's few tokens take: reaching it is a stall


class Client:
    """What a request's client has received: its tokens, text, logprobs and finish, over any moves."""

    def __init__(self) -> None:
        self.ids: dict[str, list[int]] = {}
        self.text: dict[str, str] = {}
        self.logprobs: dict[str, list[TokenLogprob]] = {}
        self.reason: dict[str, FinishReason | None] = {}
        self.counted: dict[str, int] = {}  # the output tokens its last output said it had (the usage)

    def run(self, engine: LLMEngine, steps: int = STEPS) -> Client:
        """Step ``engine`` ``steps`` times, or until it holds nothing; its outputs taken in."""
        for _ in range(steps):
            if not engine.has_unfinished():
                break
            for o in engine.step():
                self.ids.setdefault(o.request_id, []).extend(o.new_token_ids)
                self.text[o.request_id] = self.text.get(o.request_id, "") + o.new_text
                self.logprobs.setdefault(o.request_id, []).extend(o.logprobs or [])
                self.reason[o.request_id] = o.finish_reason
                self.counted[o.request_id] = o.num_output_tokens
        return self


def request(
    rid: str, params: SamplingParams, adapter: str | None = "lora-0", prompt: list[int] = PROMPT, created: float = 0.0
) -> GenerateRequest:
    return GenerateRequest(
        request_id=rid, reply_to="", prompt_token_ids=prompt, params=params, adapter=adapter, created=created
    )


def add(engine: LLMEngine, req: GenerateRequest, kv: KVSnapshot | None = None) -> None:
    """``req`` into ``engine`` as the worker's admission adds it."""
    engine.add_request(
        req.request_id,
        prompt_token_ids=req.prompt_token_ids,
        params=req.params,
        adapter=req.adapter,
        resume_token_ids=req.resume_token_ids,
        resume_text_pending=req.resume_text_pending,
        resume_text_held=req.resume_text_held,
        kv=kv,
        arrival_time=req.created or None,
        whole=True,
    )


def move(source: LLMEngine, req: GenerateRequest, ship_kv: bool) -> tuple[GenerateRequest, KVSnapshot | None]:
    """``req`` handed off from ``source`` as ``move_out`` does it: drained, its cache exported when
    the plan ships it and it has one, the wire's request and chunks made (``handoff``), and the
    chunks put back together as the destination's inbox does. The source no longer holds it."""
    source.drain()
    seq = source.seqs[req.request_id]
    kv = source.export_kv(req.request_id) if ship_kv else None
    held = seq.text[seq.emitted :]
    resumed, chunks = handoff(req, seq.output_ids, seq.detok.pending, 0, kv and kv.to_bytes(), 0.0, held)
    source.abort(req.request_id)
    assert len(chunks) == resumed.kv_chunks
    return resumed, KVSnapshot.from_bytes(b"".join(c.data for c in chunks)) if chunks else None


Engines = tuple[LLMEngine, LLMEngine]


@pytest.fixture(scope="module")
def shared(tiny_llama: TinyOutput) -> Engines:
    return make_engine(tiny_llama), make_engine(tiny_llama)


@pytest.fixture
def engines(shared: Engines) -> Iterator[Engines]:
    """A source and a destination of the default config, shared by the tests that need no other
    (an engine costs about what a test's run does); what a failing test leaves in them is aborted
    after it."""
    yield shared
    for engine in shared:
        engine.drain()
        for rid in list(engine.seqs):
            engine.abort(rid)


def unmoved(engines: Engines, req: GenerateRequest) -> Client:
    add(engines[0], req)
    return Client().run(engines[0])


def moved_at(engines: Engines, req: GenerateRequest, k: int, ship_kv: bool) -> Client:
    """``req`` run ``k`` steps on the source, moved, and run to its end on the destination."""
    (source, destination), client = engines, Client()
    add(source, req)
    client.run(source, k)
    add(destination, *move(source, req, ship_kv))
    client.run(destination)
    assert not source.has_unfinished() and not destination.has_unfinished()
    return client


@pytest.mark.parametrize("ship_kv", [False, True], ids=["recompute", "kv"])
def test_a_moved_request_ends_at_its_max_tokens_with_no_token_lost_or_made_twice(
    engines: Engines, ship_kv: bool
) -> None:
    """sgl-project/sglang #7147 (under PD disaggregation a request of max_new_tokens=1 got two
    tokens: the prefill's and the decode's) and vllm-project/vllm #25373 (the decode side makes
    the prefill side's first token again). Moved after each of its tokens, a request of four
    gives its client the four an unmoved one gives, says "length" and counts four in its usage."""
    req = request("r", SamplingParams(max_tokens=4, ignore_eos=True))
    want = unmoved(engines, req)
    assert len(want.ids["r"]) == 4 and want.reason["r"] is FinishReason.LENGTH
    for k in (1, 2, 3):
        got = moved_at(engines, req, k, ship_kv)
        assert (got.ids, got.reason, got.counted) == (want.ids, want.reason, {"r": 4}), k


SAMPLING = {
    # vllm-project/vllm #19940: a seeded request's generator was made anew after a preemption,
    # so its draws restarted; a move is a preemption on another engine
    "seed": SamplingParams(max_tokens=8, temperature=0.9, top_p=0.9, seed=7, ignore_eos=True),
    # vllm-project/vllm-metal #69: presence and frequency penalties counted over the prompt, the
    # repetition penalty not over it: after a move the tokens made elsewhere are output, not prompt
    "penalties": SamplingParams(
        max_tokens=8, presence_penalty=0.8, frequency_penalty=0.9, repetition_penalty=1.5, ignore_eos=True
    ),
    # NVIDIA/TensorRT-LLM #11727, sgl-project/sglang #40298: logprobs not carried from the
    # prefill side to the decode side
    "logprobs": SamplingParams(max_tokens=6, logprobs=2, ignore_eos=True),
}


@pytest.mark.parametrize("name", sorted(SAMPLING))
@pytest.mark.parametrize("ship_kv", [False, True], ids=["recompute", "kv"])
def test_sampling_state_goes_with_a_moved_request(engines: Engines, name: str, ship_kv: bool) -> None:
    """What a request's sampling depends on beside its weights (its seed's position, the tokens
    its penalties count, its logprobs) is its output so far: moved after two tokens, the client's
    tokens and logprobs are an unmoved run's."""
    req = request("r", SAMPLING[name])
    want = unmoved(engines, req)
    got = moved_at(engines, req, 2, ship_kv)
    assert (got.ids, got.reason) == (want.ids, want.reason)
    assert flat(got.logprobs["r"]) == pytest.approx(flat(want.logprobs["r"]), abs=1e-4)


def flat(logprobs: list[TokenLogprob]) -> list[float]:
    """Each position's token, logprob and ranked alternatives, as numbers: a recomputed cache's
    logits differ from the source's in their last bits (another batch shape), the tokens not."""
    return [x for lp in logprobs for x in (lp.token_id, lp.logprob, *(v for pair in lp.top for v in pair))]


def test_min_tokens_counts_the_tokens_made_before_the_move(engines: Engines) -> None:
    """vllm-project/vllm PR #21987 (``min_tokens`` not kept when a stop came early) across a move:
    the destination counts the tokens made at the source toward ``min_tokens``, neither anew (the
    stop held back longer) nor not at all. The stop token is the first greedy one, held back for
    four tokens; moved after one and after two, the request stops where an unmoved one does."""
    first = unmoved(engines, request("f", SamplingParams(max_tokens=1))).ids["f"][0]
    req = request("r", SamplingParams(max_tokens=12, min_tokens=4, stop_token_ids=[first]))
    want = unmoved(engines, req)
    assert want.ids["r"][0] != first and len(want.ids["r"]) >= 4  # the stop was held back
    for k in (1, 2):
        got = moved_at(engines, req, k, ship_kv=True)
        assert (got.ids, got.reason) == (want.ids, want.reason), k


def test_a_preempted_request_moves_by_recompute_and_leaves_no_block_behind(
    tiny_llama: TinyOutput, engines: Engines
) -> None:
    """vllm-project/vllm PR #53250 (MoRIIO: a request preempted on the decode side asked again for
    the remote KV it had consumed, and waited for ever or crashed the engine core) and PR #48141
    (a prefill preempted in its last step handed its connector an empty block list). A request
    preempted for KV holds no cache: a plan that ships its KV moves it by recompute (nothing is
    exported), it continues exactly, and the source holds none of its blocks."""
    params = SamplingParams(max_tokens=14, ignore_eos=True)
    reqs = [request("x", params), request("y", params, adapter="lora-1")]
    want = Client()
    for req in reqs:
        want.ids.update(unmoved(engines, req).ids)
    source, destination, got = make_engine(tiny_llama, block_size=4, num_blocks=8), engines[1], Client()
    for req in reqs:
        add(source, req)
    for _ in range(STEPS):  # until one is preempted after making tokens
        got.run(source, 1)
        if preempted := [r for r, s in source.seqs.items() if s.status is Status.WAITING and s.output_ids]:
            break
    assert preempted and not source.blocks.holds(preempted[0])
    resumed, kv = move(source, next(r for r in reqs if r.request_id == preempted[0]), ship_kv=True)
    assert kv is None and resumed.kv_chunks == 0  # nothing to ship: the destination recomputes it
    add(destination, resumed)
    got.run(destination)
    got.run(source)
    assert got.ids == want.ids
    assert source.blocks.num_free == source.blocks.num_blocks == 8


def test_a_request_moved_part_way_through_its_prefill_is_recomputed_whole(
    tiny_llama: TinyOutput, engines: Engines
) -> None:
    """The same reports' other half: a prompt moved between two chunks of its prefill holds blocks
    but no cache a decode could use, so nothing is shipped, the source gives its blocks back, and
    the destination prefills the whole prompt (counted there, where its first token is made)."""
    req = request("r", SamplingParams(max_tokens=4, ignore_eos=True), prompt=list(range(30, 50)))
    want = unmoved(engines, req)
    source = make_engine(tiny_llama, max_num_batched_tokens=8, block_size=4)
    add(source, req)
    got = Client().run(source, 1)
    assert source.seqs["r"].status is Status.WAITING and source.seqs["r"].num_cached == 8 and not got.ids
    resumed, kv = move(source, req, ship_kv=True)
    assert kv is None and not resumed.resume_token_ids and source.blocks.num_free == source.blocks.num_blocks
    prompts = engines[1].stats.prompt_tokens
    add(engines[1], resumed)
    got.run(engines[1])
    assert got.ids == want.ids and engines[1].stats.prompt_tokens - prompts == 20 and source.stats.prompt_tokens == 0


def test_a_cache_moved_onto_a_full_destination_changes_nothing_there_and_is_recomputed(
    tiny_llama: TinyOutput, engines: Engines
) -> None:
    """llumnix-project/llumnix-ray PR #179 and PR #35 (a migration aborted at its destination left
    the request's state, there and at its source, as the migration had set it) and vllm-project/vllm
    PR #41269 (a decode node that refused a request before admitting it left its KV stranded). The
    destination's blocks are held by another request: the import refuses the cache before taking any
    block, the destination holds what it held, and the request, taken in again without the cache
    (what ``admit`` does), runs as it would have once the other's blocks are free."""
    req = request("r", SamplingParams(max_tokens=8, ignore_eos=True), adapter="lora-1")
    want = unmoved(engines, req)
    destination = make_engine(tiny_llama, block_size=4, num_blocks=5)
    add(destination, request("hog", SamplingParams(max_tokens=3, ignore_eos=True), None, list(range(20, 36))))
    got = Client().run(destination, 1)
    source = engines[0]
    add(source, req)
    got.run(source, 3)
    resumed, kv = move(source, req, ship_kv=True)
    free, held = destination.blocks.num_free, set(destination.seqs)
    with pytest.raises(RequestError, match="no free KV blocks"):
        add(destination, resumed, kv)
    assert (destination.blocks.num_free, set(destination.seqs)) == (free, held)
    add(destination, resumed)  # recomputed, once the other request leaves it room
    got.run(destination)
    assert got.ids["r"] == want.ids["r"] and got.reason["hog"] is FinishReason.LENGTH
    assert destination.blocks.num_free == destination.blocks.num_blocks


def test_a_moved_choice_leaves_its_siblings_their_shared_prefix_blocks(
    tiny_llama: TinyOutput, engines: Engines
) -> None:
    """vllm-project/vllm PR #38900 (P/D with ``n > 1``: the children's KV shares the prompt's
    blocks, and only one child's was transferred) and ai-dynamo/dynamo PR #14262 (``n > 1`` disagg
    requests hung). Here ``n`` choices are ``n`` requests sharing the prompt's blocks through the
    prefix cache. One moved with its cache takes a copy of the shared blocks; the two left keep
    them; every choice gives an unmoved run's tokens; each engine ends holding no block, and the
    destination's prefix cache never names the imported blocks (a later request of the same prompt
    there computes its own, and gives the same tokens)."""
    prompt = [*PROMPT, 17]
    params = SamplingParams(max_tokens=8, ignore_eos=True)
    want = unmoved(engines, request("c-0", params, "lora-2", prompt)).ids["c-0"]
    source = make_engine(tiny_llama, block_size=4, enable_prefix_caching=True)
    destination = make_engine(tiny_llama, block_size=4, enable_prefix_caching=True)
    choices = [request(f"c-{i}", params, "lora-2", prompt) for i in range(3)]
    for req in choices:
        add(source, req)
    got = Client().run(source, 3)
    tables = [source.blocks.table(req.request_id) for req in choices]
    assert tables[0][:2] == tables[1][:2] == tables[2][:2]  # the prompt's two full blocks, shared
    add(destination, *move(source, choices[1], ship_kv=True))
    assert destination.blocks.num_cached == 0
    add(destination, request("after", params, "lora-2", prompt))  # finds nothing cached of the moved one
    got.run(source)
    got.run(destination)
    assert [got.ids[rid] for rid in ("c-0", "c-1", "c-2", "after")] == [want] * 4
    for engine in (source, destination):
        assert engine.blocks.num_free == engine.blocks.num_blocks


def test_an_abort_of_a_moved_request_gives_back_every_block_it_took(engines: Engines) -> None:
    """vllm-project/vllm #46283 (a decode-side request aborted while its remote KV loaded kept its
    blocks for ever), vllm-project/vllm-ascend #16662 and ai-dynamo/dynamo PR #7489 (a client gone
    during the KV transfer leaked the blocks until the worker stopped serving). A moved request's
    blocks are taken as its cache is imported, and given back at its abort, whether it has stepped
    there yet or not. (Its cache still on the way when the abort comes: ``tests/unit/
    test_kv_inbox_replays.py``.)"""
    req = request("r", SamplingParams(max_tokens=8, ignore_eos=True))
    for steps in (0, 2):
        source, destination = engines
        add(source, req)
        Client().run(source, 3)
        add(destination, *move(source, req, ship_kv=True))
        assert destination.blocks.holds("r")
        Client().run(destination, steps)
        assert destination.abort("r") and not destination.has_unfinished()
        assert destination.blocks.num_free == destination.blocks.num_blocks, steps
        assert source.blocks.num_free == source.blocks.num_blocks


def test_a_move_racing_its_requests_end_moves_nothing(tiny_llama: TinyOutput, engines: Engines) -> None:
    """sgl-project/sglang #12151 (the prefill side's first token ended the request, and the decode
    side went on generating) and vllm-project/vllm PR #48141 (a request finished in the step its
    preemption came). Under async scheduling the move's drain takes in the step that ends the
    request: the engine holds it no more and has no cache of it, so ``move_out`` moves nothing; and
    a destination given its whole output anyway ends it "length" with no token more, rather than go
    on (or refuse it with a 400, as it did, where one ending in its stop token ended "stop")."""
    params = SamplingParams(max_tokens=3, ignore_eos=True)
    want = unmoved(engines, request("r", params))
    source = make_engine(tiny_llama, async_scheduling=True)
    add(source, request("r", params))
    got = Client().run(source, 3)  # the last token is in flight
    assert "r" in source.seqs and source.seqs["r"].in_flight
    for o in source.drain():  # what a move does first
        got.ids["r"] += o.new_token_ids
        got.reason["r"] = o.finish_reason
    assert "r" not in source.seqs and source.export_kv("r") is None
    assert (got.ids, got.reason) == (want.ids, want.reason)
    ended = GenerateRequest(
        request_id="r", reply_to="", prompt_token_ids=PROMPT, params=params, resume_token_ids=got.ids["r"]
    )
    add(engines[1], ended)
    (out,) = engines[1].step()
    assert (out.new_token_ids, out.finish_reason, out.num_output_tokens) == ([], FinishReason.LENGTH, 3)
    assert not engines[1].has_unfinished()


@pytest.mark.parametrize(
    ("eos", "min_tokens", "ignore_eos", "ends"),
    [(False, 0, True, True), (True, 0, False, True), (False, 4, True, False), (True, 0, True, False)],
    ids=["stop-token", "eos", "under-min-tokens", "eos-ignored"],
)
def test_a_request_resumed_with_its_stop_token_last_ends_as_it_is_added(
    engines: Engines, eos: bool, min_tokens: int, ignore_eos: bool, ends: bool
) -> None:
    """sgl-project/sglang #12151 (the decode side went on generating after the prefill side's EOS)
    as a resume: a request whose resumed output already ends in a stop token or EOS (a record
    written with its final token, its end not) ends "stop" at the next step with no token more,
    that token its stop_reason (none for the tokenizer's EOS), and holds nothing; one that
    ``min_tokens`` (3 made) or ``ignore_eos`` holds back goes on."""
    source, destination = engines
    made = unmoved(engines, request("f", SamplingParams(max_tokens=2, ignore_eos=True))).ids["f"]
    last = source.primary_eos if eos else made[-1]
    stop = [] if eos else [last]
    params = SamplingParams(max_tokens=8, stop_token_ids=stop, min_tokens=min_tokens, ignore_eos=ignore_eos)
    add(destination, msgspec.structs.replace(request("r", params), resume_token_ids=[*made, last]))
    out = destination.step()
    assert len(out) == 1 and out[0].num_output_tokens == 3 + (not ends)
    if ends:
        assert (out[0].new_token_ids, out[0].finish_reason, out[0].stop_reason) == (
            [],
            FinishReason.STOP,
            stop[0] if stop else None,
        )
        assert not destination.has_unfinished() and destination.blocks.num_free == destination.blocks.num_blocks


def test_a_request_moved_before_its_first_token_waits_behind_only_those_that_came_before_it(
    engines: Engines,
) -> None:
    """llumnix-project/llumnix-ray PR #36 (Llumnix migrates a waiting request only to the head of
    the destination's waiting queue, which it keeps sorted by arrival_time). A request that waited
    at the source since 20 s is moved before its first token to a destination where one that came
    at 10 s and one that came at 30 s wait: it is queued between them, not behind the later one."""
    source, destination = engines
    params = SamplingParams(max_tokens=2, ignore_eos=True)
    for rid, created in (("a", 10.0), ("b", 30.0)):
        add(destination, request(rid, params, created=created))
    add(source, request("m", params, created=20.0))
    add(destination, *move(source, request("m", params, created=20.0), ship_kv=True))
    assert [q.request_id for q in destination.queue()] == ["a", "m", "b"]


def test_a_request_resumed_with_its_document_complete_ends_as_an_unmoved_one(engines: Engines) -> None:
    """A structured request whose document completes ends "stop", on its last allowed token too
    (``check_stop``: a complete document before the length, as vLLM v0 and OpenAI say). Resumed
    with that output (a record written with its final token, its end not) it ended "length" at its
    max_tokens, its grammar not asked, and with room left it made an EOS more (a token the unmoved
    one never made, counted in its usage). It ends as the unmoved one did, with no token more."""
    params = SamplingParams(max_tokens=200, json_schema=json.dumps({"type": "boolean"}))
    for room in (True, False):  # room left after the document, then none
        want = unmoved(engines, request("r", params))
        assert want.reason["r"] is FinishReason.STOP and json.loads(want.text["r"]) in (True, False)
        # (resumed where it ran: its grammar compiled once, as a worker restarted would resume it)
        add(engines[0], msgspec.structs.replace(request("r", params), resume_token_ids=want.ids["r"]))
        got = Client().run(engines[0])
        assert (got.ids, got.reason, got.counted) == ({"r": []}, want.reason, want.counted), room
        params = msgspec.structs.replace(params, max_tokens=len(want.ids["r"]))


def test_a_moved_request_sends_the_text_its_tokens_held_before_its_stop_token(engines: Engines) -> None:
    """Tokens that end inside a character are held, their text not sent, until it completes; a
    stop token after them ends the request with their text (U+FFFD for the unfinished bytes:
    ``advance``'s end). Resumed with that stop token last and their text not sent
    (``resume_text_pending`` over 1: a record written with its final token, its end not), it sent
    none of it. Moved at each step or resumed whole, a stream sends what an unmoved one sends."""
    lead, cont, _ = engines[0].tokenizer.encode("€", add_special_tokens=False)  # its UTF-8 bytes' tokens
    # two lead bytes (min_tokens holds the stop token back), then the stop token: nothing is sent before it
    params = SamplingParams(
        max_tokens=8, allowed_token_ids=[lead, cont], min_tokens=2, stop_token_ids=[cont], logit_bias={cont: 100}
    )
    req = request("r", params)
    want = unmoved(engines, req)
    assert (want.ids["r"], want.reason["r"]) == ([lead, lead, cont], FinishReason.STOP) and want.text["r"]
    for k in (1, 2):
        got = moved_at(engines, req, k, ship_kv=False)
        assert (got.text, got.ids, got.reason) == (want.text, want.ids, want.reason), k
    add(engines[1], msgspec.structs.replace(req, resume_token_ids=want.ids["r"], resume_text_pending=3))
    got = Client().run(engines[1])
    assert (got.text, got.reason) == (want.text, want.reason)


@pytest.mark.parametrize("bound", ["max_tokens", "context"])
def test_a_request_resumed_at_its_length_ends_as_it_is_added(engines: Engines, bound: str) -> None:
    """The race above where the final token ended the request "length" (at ``max_tokens``, or at
    the context's end for a caller that lets a request run to it): resumed with that output, it
    ends "length" at the next step with no token more, and sends what it had not yet (the text
    held back for a stop string, and what its last token spells, held as it may be a character's
    first bytes: a request's end sends it, ``advance``); a token past the bound is refused."""
    _, destination = engines
    room = destination.max_model_len - len(PROMPT)
    n = 3 if bound == "max_tokens" else room
    params = SamplingParams(max_tokens=3 if bound == "max_tokens" else room + 8, stop=["xyz"])
    ids = destination.tokenizer.encode("abc")[-1:] * n  # no "z" in the text: no stop string completes

    def resume(tokens: list[int]) -> None:
        destination.add_request(
            "r",
            prompt_token_ids=PROMPT,
            params=params,
            resume_token_ids=tokens,
            resume_text_pending=1,
            resume_text_held="xy",
        )

    with pytest.raises(RequestError, match="max_tokens" if bound == "max_tokens" else "context"):
        resume([*ids, ids[-1]])
    resume(ids)
    (out,) = destination.step()
    last = destination.tokenizer.decode(ids)[len(destination.tokenizer.decode(ids[:-1])) :]
    assert (out.new_token_ids, out.finish_reason, out.num_output_tokens) == ([], FinishReason.LENGTH, n)
    assert out.new_text == "xy" + last and last
    assert not destination.has_unfinished() and destination.blocks.num_free == destination.blocks.num_blocks


@pytest.mark.parametrize("refusal", [GrammarUnavailable, GrammarError])
def test_a_request_resumed_ended_is_not_refused_for_its_grammar(
    engines: Engines, monkeypatch: pytest.MonkeyPatch, refusal: type[Exception]
) -> None:
    """An ended resume is told before the work only a request that goes on needs (its bad words,
    allowed tokens, grammar): a grammar that cannot be had now (``GrammarUnavailable``: its
    compile's thread did not start, a 503; ``GrammarError``: its compile or its output refused
    here, a 400) answered a request already ended, and a costly one was compiled for no token. One
    its last token ends does not ask for it; one at its length does (a complete document ends it
    "stop") and, none to be had, ends "length" as before, not an error in place of its output."""
    _, destination = engines
    asked: list[SamplingParams] = []

    def unavailable(params: SamplingParams, *args: object) -> None:
        asked.append(params)
        raise refusal("cannot be had now")

    monkeypatch.setattr(destination.grammars, "matcher", unavailable)
    params = SamplingParams(max_tokens=8, regex="[0-9]+", bad_words=["abc"], allowed_token_ids=[7, 8, 9])
    eos = destination.primary_eos
    for rid, output, reason, asks in (
        ("r", [7, 8, eos], FinishReason.STOP, 0),
        ("l", [7, 8] * 4, FinishReason.LENGTH, 1),
    ):
        add(destination, msgspec.structs.replace(request(rid, params), resume_token_ids=output))
        (out,) = destination.step()
        assert (out.finish_reason, out.new_token_ids, len(asked)) == (reason, [], asks)
    with pytest.raises(GrammarUnavailable if refusal is GrammarUnavailable else RequestError):  # (going on, needed)
        add(destination, msgspec.structs.replace(request("s", params), resume_token_ids=[7, 8]))
    assert len(asked) == 2
