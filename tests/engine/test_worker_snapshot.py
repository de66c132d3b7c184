"""What a worker publishes about its engine, without a bus: names not engine keys, counts that add
up, remaining tokens capped by max_tokens."""

from __future__ import annotations

from dlora.common.messages import GenerateRequest, SamplingParams, WorkerStats
from dlora.model.make_tiny import TinyOutput
from dlora.services.worker.engine.scheduler import preempt
from dlora.services.worker.lengths import OutputLengths
from dlora.services.worker.snapshot import worker_stats
from tests.engine.helpers import make_engine


def test_stats_speak_of_adapter_names_and_add_up(tiny_llama: TinyOutput) -> None:
    engine = make_engine(tiny_llama, max_loras=2)
    engine.register_adapter("lora-0@abc123", tiny_llama.adapters["lora-0"])  # a versioned key, as workers hold them
    engine.add_request("a", prompt_token_ids=[5, 6, 7], params=SamplingParams(max_tokens=9), adapter="lora-0@abc123")
    engine.add_request("b", prompt_token_ids=[5, 6], params=SamplingParams(max_tokens=4))
    engine.step()
    st = worker_stats("w0", engine, OutputLengths(), kv_seconds=2.0, kv_tokens=8)
    assert (st.worker, st.running + st.waiting, st.max_loras) == ("w0", 2, 2)
    versioned = [a for a in st.adapters if a.version]
    assert [(a.name, a.version) for a in versioned] == [("lora-0", "abc123")]
    assert {r.request_id: r.adapter for r in st.requests} == {"a": "lora-0", "b": None}
    assert all(0 <= r.remaining_tokens <= 9 for r in st.requests)
    assert "lora-0" in st.adapter_seconds_per_token and not any("@" in k for k in st.adapter_seconds_per_token)
    assert st.kv_transfer_seconds_per_token == 0.25 and st.steps == 1
    # what a destination must load (the planner's max_lora_rank check), and whether it may move at all
    rank = engine.adapters["lora-0@abc123"].rank
    assert {r.request_id: (r.rank, r.pinned) for r in st.requests} == {"a": (rank, False), "b": (0, False)}
    st = worker_stats("w0", engine, OutputLengths(), retired={"lora-0@abc123"})  # its version replaced since
    assert {r.request_id: r.pinned for r in st.requests} == {"a": True, "b": False}
    # its progress writes failing, it refuses every move (``move_out``): each stays, said so
    assert all(r.pinned for r in worker_stats("w0", engine, OutputLengths(), stays=True).requests)
    engine.loading.add("lora-1@def456")  # a request waiting for its adapter's read: its rank not known yet
    engine.add_request("c", prompt_token_ids=[5, 6], params=SamplingParams(max_tokens=4), adapter="lora-1@def456")
    assert {r.request_id: r.pinned for r in worker_stats("w0", engine, OutputLengths()).requests}["c"]


def test_a_preempted_request_counts_until_it_is_back_in_the_batch(tiny_llama: TinyOutput) -> None:
    engine = make_engine(tiny_llama)
    for rid in ("a", "b"):
        engine.add_request(rid, prompt_token_ids=[5, 6, 7], params=SamplingParams(max_tokens=9))
    engine.step()
    assert worker_stats("w0", engine, OutputLengths()).preempted == 0  # both running
    preempt(engine.seqs["b"], engine.blocks)  # what the scheduler does when blocks run out
    st = worker_stats("w0", engine, OutputLengths())
    assert (st.running, st.waiting, st.preempted) == (1, 1, 1)
    engine.step()  # b is recomputed: running again
    st = worker_stats("w0", engine, OutputLengths())
    assert (st.running, st.waiting, st.preempted) == (2, 0, 0)


def test_a_prompt_part_way_through_its_chunked_prefill_counts_as_running(tiny_llama: TinyOutput) -> None:
    """vLLM's num_requests_running: a request runs from its first scheduled chunk (a user's trial saw
    (running, waiting) = (0, 1) through a 500-token prefill while its KV grew)."""
    engine = make_engine(tiny_llama, max_num_batched_tokens=4)
    engine.add_request("long", prompt_token_ids=list(range(5, 25)), params=SamplingParams(max_tokens=2))
    st = worker_stats("w0", engine, OutputLengths())
    assert (st.running, st.waiting) == (0, 1)  # not scheduled yet
    engine.step()
    assert not engine.seqs["long"].output_ids  # a chunk in, no token yet
    st = worker_stats("w0", engine, OutputLengths())
    assert (st.running, st.waiting) == (1, 0)
    assert [r.running for r in st.requests] == [True]  # per request the same (per-adapter gauges add up)


def test_a_long_queue_is_counted_past_what_one_message_lists(tiny_llama: TinyOutput) -> None:
    """Every request listed, ~65 bytes each: ~15,000 waiting would outgrow NATS's max_payload and the
    cluster would count the worker lost; past MAX_LISTED the latest are counted, with their tokens."""
    import msgspec

    from dlora.common.messages import MAX_LISTED
    from dlora.services.dispatcher.choose import WorkerLoad

    engine = make_engine(tiny_llama)
    for i in range(MAX_LISTED + 40):
        engine.add_request(f"r{i:05d}", prompt_token_ids=[5, 6, 7], params=SamplingParams(max_tokens=9))
    st = worker_stats("w0", engine, OutputLengths())
    assert (len(st.requests), st.unlisted_requests) == (MAX_LISTED, 40)
    assert st.requests[-1].request_id == f"r{MAX_LISTED - 1:05d}"  # the first to arrive are listed
    assert st.unlisted_remaining_tokens == 40 * 9 and len(msgspec.json.encode(st)) < 512 * 1024
    assert st.unlisted_kv_blocks == 40 * -(-3 // engine.blocks.block_size)  # (their KV too)
    assert st.arriving_kv_blocks == (MAX_LISTED + 40) * -(-3 // engine.blocks.block_size)  # (queued: none taken yet)
    assert WorkerLoad.of(st).queued_tokens == sum(r.remaining_tokens for r in st.requests) + 40 * 9


def test_remaining_tokens_count_at_least_what_min_tokens_asks(tiny_llama: TinyOutput) -> None:
    lengths = OutputLengths()
    for _ in range(lengths.min_samples):
        lengths.observe(2, cut_off=False)  # requests here end after two tokens
    engine = make_engine(tiny_llama)
    engine.add_request("short", prompt_token_ids=[5, 6, 7], params=SamplingParams(max_tokens=20))
    engine.add_request("long", prompt_token_ids=[5, 6, 7], params=SamplingParams(max_tokens=20, min_tokens=12))
    engine.step()
    remaining = {r.request_id: r.remaining_tokens for r in worker_stats("w0", engine, lengths, 1.0, 8).requests}
    assert remaining == {"short": 1, "long": 11}


_ARRIVING = [("p1", "lora-1", "v2"), ("p2", None, None)]


def test_per_adapter_figures_count_every_request_listed_or_not(tiny_llama: TinyOutput) -> None:
    """dlora_adapter_requests, vllm:lora_requests_info and /v1/status's per-adapter counts read the
    requests the stats list, the first MAX_LISTED: an adapter whose requests came after them showed
    none (its waiting series and its name in waiting_lora_adapters absent), and those waiting on
    arrival (a grammar's compile, a moved cache) were in no adapter's figure, though in the worker's
    waiting count. Every adapter's figures now add up to the worker's."""
    from dlora.common.messages import MAX_LISTED, AdapterEntry
    from dlora.services.gateway.status import Traffic, cluster_status
    from dlora.services.worker.metrics import families
    from tests.unit.test_worker_metrics import _scrape, _view

    engine = make_engine(tiny_llama)
    engine.register_adapter("lora-0@v1", tiny_llama.adapters["lora-0"])
    for i in range(MAX_LISTED + 40):
        adapter = "lora-0@v1" if i >= MAX_LISTED else None  # the latest 40, lora-0's: none listed
        engine.add_request(
            f"r{i:05d}", prompt_token_ids=[5, 6, 7], params=SamplingParams(max_tokens=9), adapter=adapter
        )
    arriving = [GenerateRequest(request_id=r, reply_to="", adapter=a, adapter_version=v) for r, a, v in _ARRIVING]
    st = worker_stats("w0", engine, OutputLengths(), preparing=arriving)
    assert st.unlisted_requests == 40 and st.waiting == MAX_LISTED + 42
    # and by version, for the dispatcher's count of slots (each version takes one)
    assert st.unlisted_by_version == {"lora-0@v1": (0, 40), "lora-1@v2": (0, 1), "": (0, 1)}
    assert st.unlisted_by_adapter == {"lora-0": (0, 40), "lora-1": (0, 1), "": (0, 1)}
    s = _scrape(_view(stats=st))
    by = {(dict(k)["adapter"], dict(k)["state"]): v for k, v in s["dlora_adapter_requests"].items()}
    assert by == {("lora-0", "waiting"): 40, ("lora-1", "waiting"): 1, ("llama", "waiting"): MAX_LISTED + 1}
    info = dict(next(iter(s["vllm:lora_requests_info"])))
    assert info["waiting_lora_adapters"] == "lora-0,lora-1"
    assert sum(1 for _ in families(_view(stats=st)))  # (the view renders whole)
    lora_0 = AdapterEntry(name="lora-0", path="/x", rank=8, created=0.0)
    doc = cluster_status([(st, 0.0)], [], [lora_0], Traffic(), "llama", "g", 0.0)
    assert [(a.name, a.waiting) for a in doc.adapters] == [("llama", MAX_LISTED + 1), ("lora-0", 40)]


def _moved(rid: str, generated: int, max_tokens: int, min_tokens: int = 0) -> GenerateRequest:
    """A request a plan moved here, resumed after ``generated`` tokens, its cache on the way."""
    params = SamplingParams(max_tokens=max_tokens, min_tokens=min_tokens)
    return GenerateRequest(
        request_id=rid, reply_to="", prompt_token_ids=[5, 6, 7], params=params, resume_token_ids=[9] * generated
    )


def test_requests_waiting_on_arrival_count_their_remaining_work(tiny_llama: TinyOutput) -> None:
    """A moved request whose cache is on the way, or one whose grammar compiles, was counted in a
    slot and as waiting but its tokens in no figure of load: its source lists it no more, so the
    planner and dispatch saw its new worker lighter by all of it (a review)."""
    from dlora.services.dispatcher.choose import WorkerLoad

    engine = make_engine(tiny_llama)
    engine.add_request("here", prompt_token_ids=[5, 6, 7], params=SamplingParams(max_tokens=9))
    grammar = GenerateRequest(request_id="g", reply_to="", params=SamplingParams(max_tokens=30))
    preparing = [_moved("m1", 10, 50), _moved("m2", 0, 20, min_tokens=20), grammar]
    st = worker_stats("w0", engine, OutputLengths(), preparing=preparing)
    assert st.unlisted_remaining_tokens == 40 + 20 + 30 and st.unlisted_by_version == {"": (0, 3)}
    # and their KV blocks (prompt and tokens made; the grammar's request has no tokens yet): uncounted,
    # the next plan read this worker as roomy as before its moves came, and filled it again
    size = engine.blocks.block_size
    assert st.unlisted_kv_blocks == -(-(3 + 10) // size) + -(-3 // size)
    assert st.arriving_kv_blocks == st.unlisted_kv_blocks + -(-3 // size)  # ("here", queued, holds none yet)
    assert WorkerLoad.of(st).queued_tokens == 9 + 90
    lengths = OutputLengths()
    for _ in range(lengths.min_samples):
        lengths.observe(2, cut_off=False)  # requests here end after two tokens: min_tokens still holds
    st = worker_stats("w0", engine, lengths, preparing=[_moved("m2", 5, 20, min_tokens=15)])
    assert st.unlisted_remaining_tokens == 10


def test_a_request_delivered_twice_counts_once(tiny_llama: TinyOutput) -> None:
    """A copy of a request the engine holds, queued for the loop (``Commands.queued``) until it is
    taken up and dropped (or replaces the first: ``admit``), is that request: counted as waiting
    beside it, its work and KV counted twice until then (left by the last session). Two copies
    waiting (on arrival and queued) count once too."""
    engine = make_engine(tiny_llama)
    engine.add_request("m1", prompt_token_ids=[5, 6, 7], params=SamplingParams(max_tokens=50))
    st = worker_stats("w0", engine, OutputLengths(), preparing=[_moved("m1", 0, 50), _moved("m2", 10, 50)] * 2)
    assert (st.running + st.waiting, st.unlisted_remaining_tokens) == (2, 40)
    assert st.unlisted_kv_blocks == -(-(3 + 10) // engine.blocks.block_size)


def test_kv_room_counts_the_blocks_queued_requests_will_take(tiny_llama: TinyOutput) -> None:
    """``free_blocks`` less ``arriving_kv_blocks`` is the room the dispatcher's placement reads. A
    request moved here by recompute queues in the engine (no cache on its way, so not waiting on
    arrival), as a new one does: counted only for those waiting on arrival, a worker with its
    queue full of them looked as roomy as an idle one. A running request holds its blocks already."""
    engine = make_engine(tiny_llama)
    size = engine.blocks.block_size
    engine.add_request("run", prompt_token_ids=[5] * (size + 1), params=SamplingParams(max_tokens=9))
    engine.step()  # (admitted: its blocks taken from free_blocks)
    held = engine.blocks.num_free
    engine.add_request("new", prompt_token_ids=[5] * (2 * size), params=SamplingParams(max_tokens=9))
    params = SamplingParams(max_tokens=40)
    engine.add_request("moved", prompt_token_ids=[5, 6, 7], params=params, resume_token_ids=[9] * (size + 2))
    st = worker_stats("w0", engine, OutputLengths(), preparing=[_moved("m1", 10, 50)])
    assert st.free_blocks == held and (st.running, st.waiting) == (1, 3)
    assert st.arriving_kv_blocks == 2 + -(-(3 + size + 2) // size) + -(-(3 + 10) // size)
    engine.step()  # (the queued ones admitted: their blocks taken, no longer counted twice)
    st = worker_stats("w0", engine, OutputLengths())
    assert st.running == 3 and st.arriving_kv_blocks == 0


def _busy(tiny_llama: TinyOutput, worker: str, kept: int, arriving: int) -> WorkerStats:
    """``worker``'s stats holding ``kept`` requests of 50 tokens to go and ``arriving`` more moved
    to it, their caches on the way; priced alike (a step's measure is the clock's)."""
    import msgspec

    engine = make_engine(tiny_llama)
    for i in range(kept):
        engine.add_request(f"{worker}-{i}", prompt_token_ids=[5, 6, 7], params=SamplingParams(max_tokens=50))
    moved = [_moved(f"to-{worker}-{i}", 0, 50) for i in range(arriving)]
    st = worker_stats(worker, engine, OutputLengths(), preparing=moved)
    return msgspec.structs.replace(st, seconds_per_token=0.01)


def test_a_worker_taking_moves_is_not_the_lightest_while_they_arrive(tiny_llama: TinyOutput) -> None:
    """A plan moved 6 of w0's 10 requests to w1 and their caches are on the way: w0 lists 4, w1
    none. Read as idle, w1 drew the next request and the next plan's moves (onto the worker that
    just took a plan's); it holds 300 tokens to w0's 200."""
    from dlora.services.dispatcher.choose import choose_worker
    from dlora.services.migrator.planner import plan
    from dlora.services.migrator.trigger import snapshot_from_stats

    stats = [_busy(tiny_llama, "w0", kept=4, arriving=0), _busy(tiny_llama, "w1", kept=0, arriving=6)]
    assert choose_worker(stats, None) == "w0"
    snap = snapshot_from_stats(stats, {}, recompute_seconds_per_token=0.0, kv_transfer_seconds_per_token=0.0)
    assert not any(m.to_worker == "w1" for m in plan(snap).moves)
