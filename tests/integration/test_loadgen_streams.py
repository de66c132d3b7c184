"""The load generator against servers written here: the streams OpenAI-compatible servers send,
when the run's clock starts, and when it stops (its duration, Ctrl-C)."""

from __future__ import annotations

import asyncio
import io
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
from aiohttp import web
from rich.console import Console

from dlora.loadgen.clients import HttpClient
from dlora.loadgen.main import RunOptions, run
from dlora.loadgen.metrics import RequestResult
from dlora.loadgen.runner import Clock, replay
from dlora.loadgen.spec import WorkloadSpec
from dlora.loadgen.workload import RequestSpec
from dlora.services.servers import free_port

CHUNK = {"choices": [{"index": 0, "text": "a", "finish_reason": None}]}
LAST = {"choices": [{"index": 0, "text": "b", "finish_reason": "length"}]}
# One stream a request, each of a form some server sends and each a completion of 4 tokens.
STREAMS = {
    # llama.cpp's last chunk and vLLM's continuous usage: usage beside the choices (every request failed)
    "usage-beside": [CHUNK, CHUNK, CHUNK, LAST | {"usage": {"completion_tokens": 4}}],
    # Azure's first chunk: no choices (IndexError)
    "no-choices": [{"choices": [], "prompt_filter_results": []}, CHUNK, CHUNK, CHUNK, LAST],
    # "error": null in each chunk (failed with the reason None)
    "error-null": [CHUNK | {"error": None}] * 3 + [LAST | {"error": None}],
    # a usage whose count is null (a TypeError ended the whole run)
    "usage-null": [CHUNK, CHUNK, CHUNK, LAST, {"choices": [], "usage": {"completion_tokens": None}}],
}


@asynccontextmanager
async def serving(completions, models_delay_s: float = 0.0, chat=None) -> AsyncIterator[str]:  # type: ignore[no-untyped-def]
    """An OpenAI-compatible server with these completions (and chat completions), its model list
    after ``models_delay_s``."""

    async def models(_: web.Request) -> web.Response:
        await asyncio.sleep(models_delay_s)
        return web.json_response({"object": "list", "data": [{"id": "model", "object": "model"}]})

    app = web.Application()
    app.router.add_get("/v1/models", models)
    app.router.add_post("/v1/completions", completions)
    if chat is not None:
        app.router.add_post("/v1/chat/completions", chat)
    runner = web.AppRunner(app, shutdown_timeout=0.5)  # a request still held: not 60 s at the clean-up
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        await runner.cleanup()


async def _stream(request: web.Request, events: list[dict], space: bool = True) -> web.StreamResponse:
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await response.prepare(request)
    for event in events:
        await response.write(f"data:{' ' * space}{json.dumps(event)}\n\n".encode())
    await response.write(b"data: [DONE]\n\n")
    await response.write_eof()
    return response


async def _replayed(url: str, specs: list[RequestSpec]) -> list[RequestResult]:
    """``specs`` replayed against ``url`` over HTTP (10 s of run), their results."""
    clock = Clock()
    client = HttpClient(url, "model", clock)
    try:
        results, _ = await replay(specs, client, clock, 10.0, asyncio.Event())
    finally:
        await client.close()
    return results


async def test_streams_in_the_forms_servers_send_complete() -> None:
    async def completions(request: web.Request) -> web.StreamResponse:
        name = (await request.json())["model"]
        if name == "no-space":  # SSE allows "data:" without its space
            return await _stream(request, [CHUNK, CHUNK, CHUNK, LAST], space=False)
        if name == "split-lines":  # an event's data over several data: lines, joined by newlines (SSE's)
            response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
            await response.prepare(request)
            for event in (CHUNK, CHUNK, CHUNK, LAST):
                first, second = json.dumps(event, indent=1).split("\n", 1)
                await response.write(f"data: {first}\ndata: {second.replace(chr(10), ' ')}\n\n".encode())
            await response.write_eof()
            return response
        return await _stream(request, STREAMS[name])

    names = [*STREAMS, "no-space", "split-lines"]
    async with serving(completions) as url:
        specs = [RequestSpec(arrival_s=0.0, adapter=n, prompt_len=4, output_len=4) for n in names]
        results = await _replayed(url, specs)
    assert {n: (r.error, r.completed, r.tokens) for n, r in zip(names, results)} == {n: (None, True, 4) for n in names}


async def test_the_run_starts_after_the_target_answered_its_model_list(tmp_path: Path) -> None:
    """The clock ran from before GET /v1/models: a model list that took 2 s made the arrivals one
    burst and each TTFT 2 s long, though the server answered at once."""

    async def completions(request: web.Request) -> web.StreamResponse:
        return await _stream(request, [CHUNK, CHUNK, CHUNK, LAST])

    spec = WorkloadSpec(requests=3, rate=50.0, lengths="fixed", prompt_len=4, output_len=4)
    async with serving(completions, models_delay_s=2.0) as url:
        summary = await run(spec, url, tmp_path, Console(file=io.StringIO()))
    assert summary["completed"] == 3 and summary["ttft_s"]["p99"] < 1.0


async def test_an_arrival_past_the_duration_is_not_waited_for() -> None:
    """The runner waited for the next arrival whole, then looked at the duration: --rate 1e-9 ran
    for ever."""

    async def completions(request: web.Request) -> web.StreamResponse:
        return await _stream(request, [LAST])

    async with serving(completions) as url:
        clock = Clock()
        client = HttpClient(url, "model", clock)
        specs = [RequestSpec(arrival_s=s, adapter=None, prompt_len=4, output_len=1) for s in (0.0, 1e9)]
        try:
            async with asyncio.timeout(30):
                results, _ = await replay(specs, client, clock, 0.5, asyncio.Event())
        finally:
            await client.close()
    assert [r.sent for r in results] == [True, False] and results[0].completed


async def test_ctrl_c_after_the_last_request_went_out_stops_the_wait() -> None:
    """Heard only once every request in flight had ended (up to the duration and 30 s more)."""

    async def completions(request: web.Request) -> web.StreamResponse:
        await asyncio.sleep(3600)
        raise AssertionError("unreachable")

    stop = asyncio.Event()
    async with serving(completions) as url:
        clock = Clock()
        client = HttpClient(url, "model", clock)
        specs = [RequestSpec(arrival_s=0.0, adapter=None, prompt_len=4, output_len=4)]
        asyncio.get_running_loop().call_later(0.5, stop.set)
        try:
            async with asyncio.timeout(20):  # the duration and grace: 60 + 30 s
                results, _ = await replay(specs, client, clock, 60.0, stop, grace_s=30.0)
        finally:
            await client.close()
    assert results[0].sent and results[0].cut


async def test_max_concurrency_holds_arrivals_until_a_slot_frees_and_times_them_from_their_send() -> None:
    """vLLM's benchmark_serving --max-concurrency (an upstream component capping what is in flight):
    dlora loadgen had none. Capped at 2 against a server taking 0.5 s a request, six arrivals at
    once go out two at a time, each timed from its send; sending ending leaves the waiting unsent.
    Timed with room: the last pair waited 1 s for its slot, its own 0.5 s is what counts."""
    in_flight, most = 0, 0

    async def completions(request: web.Request) -> web.StreamResponse:
        nonlocal in_flight, most
        in_flight += 1
        most = max(most, in_flight)
        try:
            await asyncio.sleep(0.5)
            return await _stream(request, [CHUNK, CHUNK, CHUNK, LAST])
        finally:
            in_flight -= 1

    specs = [RequestSpec(arrival_s=0.0, adapter=None, prompt_len=4, output_len=4) for _ in range(6)]
    async with serving(completions) as url:
        clock = Clock()
        client = HttpClient(url, "model", clock)
        try:
            results, _ = await replay(specs, client, clock, 30.0, asyncio.Event(), max_concurrency=2)
            assert most == 2 and all(r.completed for r in results)
            sends = sorted(r.arrival_s for r in results)
            assert sends[2] >= 0.45 and sends[4] >= 0.95, sends  # each pair after the one before it
            # Not the wait for a slot: that is each one's queue time, kept apart (the last pair
            # waited a request's 0.5 s at least), and its times count from its send (arrival_s,
            # above). (A 0.9 s bound on its own 0.5 s said no more, and a loaded machine breaks it.)
            queued = sorted(r.queued_s for r in results)
            assert queued[4] >= 0.45 and all(r.arrival_s >= r.queued_s for r in results), queued
            clock = Clock()
            client.clock = clock
            cut, _ = await replay(specs, client, clock, 0.2, asyncio.Event(), max_concurrency=2)
            assert [r.sent for r in cut].count(True) == 2 and sum(r.completed for r in cut) == 2
        finally:
            await client.close()


async def test_the_run_is_also_recorded_under_vllms_names_and_units(tmp_path: Path) -> None:
    """Users feed vLLM's benchmark records (``--save-result``) to their dashboards: flat names,
    milliseconds; result.json has none of them (nested, seconds). vllm-result.json has them, with
    vLLM's meanings: ``failed`` every sent request that did not complete, TPOT per request of two
    tokens or more, goodput only where an SLO was given, the rate ``"inf"``."""
    import numpy as np

    async def completions(request: web.Request) -> web.StreamResponse:
        body = await request.json()
        if body["model"] == "lora-1":
            return web.json_response({"error": {"message": "no"}}, status=500)
        events = [CHUNK] * (body["max_tokens"] - 1) + [LAST | {"usage": {"completion_tokens": body["max_tokens"]}}]
        return await _stream(request, events)

    spec = WorkloadSpec(requests=8, rate=float("inf"), lengths="fixed", prompt_len=5, output_len=3, adapters=2)
    async with serving(completions) as url:
        await run(spec, url, tmp_path, Console(file=io.StringIO()), RunOptions(base_model="model", max_concurrency=2))
    result = json.loads((tmp_path / "result.json").read_text())
    ours, refused = result["summary"], result["by_adapter"]["lora-1"]["sent"]

    def no_constants(c: str) -> None:
        raise AssertionError(f"{c} is not JSON")

    v = json.loads((tmp_path / "vllm-result.json").read_text(), parse_constant=no_constants)
    done = ours["completed"]
    assert 0 < refused < 8 and done == 8 - refused
    assert (v["completed"], v["failed"], v["num_prompts"]) == (done, refused, 8)
    assert (v["request_rate"], v["burstiness"], v["max_concurrency"], v["request_goodput"]) == ("inf", 1.0, 2, None)
    assert (v["total_input_tokens"], v["total_output_tokens"]) == (5 * done, 3 * done)
    assert v["total_token_throughput"] == pytest.approx(8 * done / ours["duration_s"])
    assert v["request_throughput"] == ours["throughput_req_s"] and v["output_throughput"] == ours["throughput_tok_s"]
    for name, theirs in (("ttft_s", "ttft"), ("tpot_s", "tpot"), ("itl_s", "itl"), ("e2e_s", "e2el")):
        assert v[f"mean_{theirs}_ms"] == pytest.approx(ours[name]["mean"] * 1000)
        assert v[f"median_{theirs}_ms"] == pytest.approx(ours[name]["p50"] * 1000)
        assert v[f"p99_{theirs}_ms"] == pytest.approx(ours[name]["p99"] * 1000) and v[f"std_{theirs}_ms"] >= 0
    assert sorted(v["output_lens"]) == [0] * refused + [3] * done and v["input_lens"] == [5] * 8
    assert sum(e != "" for e in v["errors"]) == refused and all(
        len(i) == 2 for i, n in zip(v["itls"], v["output_lens"]) if n
    )
    assert np.mean([t for t in v["ttfts"] if t]) * 1000 == pytest.approx(v["mean_ttft_ms"])
    # vLLM's per-request E2E seconds and send times, in the same order as its other lists
    assert len(v["latencies"]) == len(v["start_times"]) == 8 and min(v["start_times"]) >= 0
    assert np.mean([t for t in v["latencies"] if t]) * 1000 == pytest.approx(v["mean_e2el_ms"])
    assert [t == 0 for t in v["latencies"]] == [n == 0 for n in v["output_lens"]]


async def test_a_target_that_ends_outputs_early_is_named_on_the_terminal(tmp_path: Path) -> None:
    """Every request asks ignore_eos, so outputs are the workload's lengths; a server that does not
    honour it (OpenAI's, many others) ended them at EOS and the run's throughput and TPOT were of
    other lengths, said only as "short" in result.json (vLLM's benchmark users hit the same)."""

    async def completions(request: web.Request) -> web.StreamResponse:
        stop = {"choices": [{"index": 0, "text": "b", "finish_reason": "stop"}], "usage": {"completion_tokens": 2}}
        return await _stream(request, [CHUNK, stop])

    spec = WorkloadSpec(requests=3, rate=50.0, lengths="fixed", prompt_len=4, output_len=8, adapter_names=(None,))
    console = Console(file=io.StringIO(), width=300)
    async with serving(completions) as url:
        summary = await run(spec, url, tmp_path, console)
    assert summary["short"] == 3
    assert "3 of 3 completed requests ended before the tokens they asked for" in console.file.getvalue()


async def test_a_target_that_answers_whole_instead_of_streaming_is_named() -> None:
    """A server that ignores "stream": true answers one JSON body; the request failed as "the
    stream ended without a finish", which sent users looking for a cut connection."""

    async def completions(request: web.Request) -> web.Response:
        return web.json_response({"choices": [{"index": 0, "text": "abcd", "finish_reason": "length"}]})

    async with serving(completions) as url:
        specs = [RequestSpec(arrival_s=0.0, adapter=None, prompt_len=4, output_len=4)]
        results = await _replayed(url, specs)
    assert results[0].error is not None and "not a stream of events" in results[0].error and "abcd" in results[0].error


async def test_a_stream_labelled_application_json_is_read_as_the_stream_it_is() -> None:
    """Servers and proxies that stream valid ``data:`` events under a mislabelled Content-Type
    (application/json) are read by the openai package and vLLM's benchmark, which look at the
    lines, not the header; 43e3db8 failed every such request as "one JSON answer, not a stream"
    (the kind of tinyagents#56's review: keep parsing SSE when the header is missing or wrong)."""

    async def completions(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "application/json"})
        await response.prepare(request)
        for event in [CHUNK, CHUNK, CHUNK, LAST]:
            await response.write(f"data: {json.dumps(event)}\n\n".encode())
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response

    async with serving(completions) as url:
        specs = [RequestSpec(arrival_s=0.0, adapter=None, prompt_len=4, output_len=4)]
        results = await _replayed(url, specs)
    assert results[0].error is None and results[0].completed and results[0].tokens == 4


async def test_chat_backend_sends_vllms_chat_body_and_reads_deltas(tmp_path: Path) -> None:
    """--backend openai-chat sends what vLLM's benchmark's openai-chat sends (one user message whose
    content is a list of one text part, as vLLM's ``_get_chat_content`` builds it, not a string;
    max_completion_tokens, ignore_eos, streamed with usage), and reads the deltas: the role's
    opening event is no token (it made one ITL too many), the usage's prompt_tokens the prompt's
    length (the server's template adds tokens to the workload's)."""
    bodies: list[dict] = []

    async def chat(request: web.Request) -> web.StreamResponse:
        bodies.append(body := await request.json())
        n = body["max_completion_tokens"]
        delta = {"choices": [{"index": 0, "delta": {"content": "a"}, "finish_reason": None}]}
        events = [{"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}]}]
        events += [delta] * (n - 1) + [
            {"choices": [{"index": 0, "delta": {"content": "b"}, "finish_reason": "length"}]}
        ]
        return await _stream(
            request, events + [{"choices": [], "usage": {"prompt_tokens": 30, "completion_tokens": n}}]
        )

    async def completions(_: web.Request) -> web.Response:
        raise AssertionError("the chat backend posted to /v1/completions")

    specs = [RequestSpec(arrival_s=0.0, adapter=None, prompt_len=5, output_len=3)] * 2
    async with serving(completions, chat=chat) as url:
        client = HttpClient(url, "model", Clock(), chat_text=lambda _, ids: " ".join(map(str, ids)))
        try:
            results, _ = await replay(specs, client, Clock(), 10.0, asyncio.Event())
        finally:
            await client.close()
    body = bodies[0]
    [part] = body["messages"][0]["content"]
    assert [m["role"] for m in body["messages"]] == ["user"] and part["type"] == "text"
    assert len(part["text"].split()) == 5
    assert (body["max_completion_tokens"], body["ignore_eos"], body["stream"]) == (3, True, True)
    assert body["stream_options"] == {"include_usage": True} and "prompt" not in body
    assert all(r.completed and r.tokens == 3 and len(r.token_times) == 3 and r.prompt_len == 30 for r in results)


@pytest.mark.parametrize(
    "opening",
    [
        {"role": "assistant", "content": ""},  # vLLM's, dlora's
        {"role": "assistant", "content": "", "refusal": None},  # OpenAI's
        {"role": "assistant", "content": "", "reasoning_content": None, "tool_calls": None},  # SGLang's
        {"role": "assistant", "content": None, "reasoning": None},
    ],
)
async def test_a_chat_streams_opening_is_no_token_whatever_null_fields_it_carries(opening: dict) -> None:
    """The role's opening event carries no token whether its delta lists the fields it leaves
    empty or not (OpenAI's says ``refusal: null``, SGLang's ``reasoning_content`` and ``tool_calls``
    null): read as a token, each request had one ITL too many and a TTFT of no token. Reasoning
    deltas (a server's reasoning parser: ``reasoning`` with no content) are tokens, as vLLM's
    benchmark times them; an event of several tokens is one arrival, its count the usage's."""

    async def chat(request: web.Request) -> web.StreamResponse:
        def event(delta: dict, finish: str | None = None) -> dict:
            return {"choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}

        events = [event(opening), event({"reasoning": "th"}), event({"reasoning_content": "ink"})]
        events += [event({"content": "two tokens"}), event({"content": "b"}, "length")]
        return await _stream(request, events + [{"choices": [], "usage": {"prompt_tokens": 9, "completion_tokens": 5}}])

    async def completions(_: web.Request) -> web.Response:
        raise AssertionError("the chat backend posted to /v1/completions")

    specs = [RequestSpec(arrival_s=0.0, adapter=None, prompt_len=5, output_len=5)]
    async with serving(completions, chat=chat) as url:
        client = HttpClient(url, "model", Clock(), chat_text=lambda _, ids: " ".join(map(str, ids)))
        try:
            results, _ = await replay(specs, client, Clock(), 10.0, asyncio.Event())
        finally:
            await client.close()
    [r] = results
    assert r.completed and r.tokens == 5 and r.prompt_len == 9
    assert len(r.token_times) == 4 and r.first_token_s == r.token_times[0]


async def test_vllms_record_counts_the_prompts_its_lists_hold_when_the_duration_cuts_the_run(tmp_path: Path) -> None:
    """vLLM's record has one entry a prompt in each per-request list and ``completed + failed ==
    num_prompts``; a --duration that ended sending before the workload's last arrivals wrote the
    workload's size as num_prompts beside lists of the requests sent (a reader that indexes the
    lists by range(num_prompts) failed). The planned count stays in result.json."""

    async def completions(request: web.Request) -> web.StreamResponse:
        return await _stream(request, [CHUNK, LAST])

    spec = WorkloadSpec(requests=50, rate=2.0, duration=1.0, lengths="fixed", prompt_len=4, output_len=2)
    async with serving(completions) as url:
        summary = await run(spec, url, tmp_path, Console(file=io.StringIO()))
    v = json.loads((tmp_path / "vllm-result.json").read_text())
    assert summary["planned"] == 50 and summary["sent"] < 50
    lists = ("input_lens", "output_lens", "ttfts", "itls", "latencies", "start_times", "errors")
    assert [len(v[k]) for k in lists] == [v["num_prompts"]] * len(lists)
    assert v["completed"] + v["failed"] == v["num_prompts"]


@pytest.mark.parametrize("backend", ["openai", "openai-chat"])
async def test_prompts_leave_out_the_special_tokens_of_the_models_tokenizer(
    backend: str, special_tokenizer: Path, tmp_path: Path
) -> None:
    """Prompts were ids 3..255 whatever the model: a real one's control tokens lie there (Mistral
    v0.3's ids 3-770), so a benchmark sent mostly ``[INST]`` and ``[control_N]``, where `vllm bench
    serve`'s random dataset draws from its tokenizer's vocabulary less its special ids. The
    tokenizer is the --model/--base-model folder's (completions and chat alike)."""
    from dlora.model.tokenizer import load_tokenizer

    tok = load_tokenizer(special_tokenizer)
    sent: list[list[int]] = []

    async def completions(request: web.Request) -> web.StreamResponse:
        sent.append((await request.json())["prompt"])
        return await _stream(request, [CHUNK, LAST])

    async def chat(request: web.Request) -> web.StreamResponse:
        [part] = (await request.json())["messages"][0]["content"]
        sent.append(tok.encode(part["text"], add_special_tokens=False))
        delta = {"choices": [{"index": 0, "delta": {"content": "a"}, "finish_reason": None}]}
        return await _stream(request, [delta, delta | {"choices": [delta["choices"][0] | {"finish_reason": "length"}]}])

    spec = WorkloadSpec(requests=6, rate=float("inf"), lengths="fixed", prompt_len=64, output_len=2)
    async with serving(completions, chat=chat) as url:
        await run(
            spec,
            url,
            tmp_path,
            Console(file=io.StringIO()),
            RunOptions(base_model=str(special_tokenizer), backend=backend),
        )
    assert len(sent) == 6 and all(len(p) >= 60 for p in sent)
    assert not {t for p in sent for t in p} & set(tok.all_special_ids)
