"""The gateway's and the workers' metrics, end to end against real NATS and Redis: what a
request counts (its latencies from arrival, an abort once), and what the bus refused."""

from __future__ import annotations

import asyncio
import contextlib
import re
import threading
import time

import aiohttp
import pytest

from dlora.common import bus
from tests.integration.conftest import Stack
from tests.integration.test_gateway import post, stream


async def test_bus_messages_that_do_not_decode_are_counted_not_lost_silently(stack: Stack) -> None:
    from dlora.common import subjects

    async def rejects() -> float:
        async with aiohttp.ClientSession() as http, http.get(stack.url + "/metrics") as r:
            text = await r.text()
        return sum(
            float(line.rsplit(" ", 1)[1])
            for line in text.splitlines()
            if line.startswith('dlora_bus_rejected_messages_total{subject="dlora.stats.*",type="WorkerStats"}')
        )

    before = await rejects()
    await stack.nc.publish(subjects.stats("w-from-the-future"), b'{"worker": 3}')
    await bus.flush(stack.nc)
    for _ in range(100):
        if await rejects() > before:
            break
        await asyncio.sleep(0.02)
    assert await rejects() > before
    status, _ = await post(stack, "/v1/completions", {"model": "model", "prompt": "kalo", "max_tokens": 2})
    assert status == 200  # and nothing else minded


async def test_metrics_are_exposed(stack: Stack) -> None:
    await post(stack, "/v1/completions", {"model": "lora-1", "prompt": "kalo", "max_tokens": 3, "ignore_eos": True})
    # A refusal is counted under the model it named where that is served, else under "?" (a name
    # nobody serves must not make a label).
    assert (await post(stack, "/v1/completions", {"model": "lora-2", "prompt": "k", "temperature": -1}))[0] == 400
    assert (await post(stack, "/v1/completions", {"model": "lora-3", "prompt": "k", "max_tokens": "five"}))[0] == 400
    assert (await post(stack, "/v1/completions", {"model": "nobody-x", "prompt": "k"}))[0] == 404

    async def base_400s() -> float:
        async with aiohttp.ClientSession() as http, http.get(stack.url + "/metrics") as r:
            found = re.search(r'dlora_requests_total\{adapter="model",status="400"\} (\S+)', await r.text())
        return float(found[1]) if found else 0.0

    before = await base_400s()  # a body naming no model is the base model's, refused or not (it was "?")
    assert (await post(stack, "/v1/completions", {"prompt": "k", "max_tokens": "five"}))[0] == 400
    assert await base_400s() == before + 1
    await asyncio.sleep(0.3)  # a stats interval
    async with aiohttp.ClientSession() as http, http.get(stack.url + "/metrics") as r:
        text = await r.text()
    for name in (
        'dlora_requests_total{adapter="lora-1",status="200"} 1.0',
        'dlora_requests_total{adapter="lora-2",status="400"}',
        'dlora_requests_total{adapter="lora-3",status="400"}',  # a body the schema refuses, too
        'dlora_requests_total{adapter="?",status="404"}',
        "dlora_time_to_first_token_seconds",
        "dlora_time_per_output_token_seconds",
        "dlora_request_queue_time_seconds",
    ):
        assert name in text, name
    # The workers export their own (tests/integration/test_exporters.py), not the gateway from the bus.
    assert "dlora_num_requests_running" not in text and "vllm:num_requests_running" not in text
    # The latencies under vLLM's names too, for its dashboards: by the served model alone, no
    # adapter named (the lora-1 request counts there), and the same counts as ours
    for ours, theirs in (
        ("time_to_first_token_seconds", "time_to_first_token_seconds"),
        ("time_per_output_token_seconds", "request_time_per_output_token_seconds"),
        ("e2e_request_latency_seconds", "e2e_request_latency_seconds"),
        ("request_queue_time_seconds", "request_queue_time_seconds"),
    ):
        mine = sum(float(n) for n in re.findall(rf"dlora_{ours}_count\{{adapter=\S+\}} (\S+)", text))
        [vllm] = re.findall(rf'vllm:{theirs}_count\{{model_name="model"\}} (\S+)', text)
        assert float(vllm) == mine >= 1, (ours, text)


async def test_latencies_are_timed_from_the_requests_arrival_its_tokenizing_included(
    stack: Stack, monkeypatch: pytest.MonkeyPatch
) -> None:
    """docs/metrics.md says time to first token and end-to-end latency run from the request's
    arrival, as vLLM's do (its arrival time is taken before the prompt is tokenized); the gateway
    started its timer after tokenizing (on its one shaping thread, where a request also waits
    behind others' long prompts) and compiling a structured output's grammar: a request that spent
    seconds there read as fast. A helper's finding, replaying vLLM's arrival_time fixes (#37498)."""
    from dlora.services.gateway import main as gateway_main

    shape = gateway_main.shape_request

    def slow_shape(*args, **kwargs):  # type: ignore[no-untyped-def]  # a long prompt's tokenizing
        time.sleep(0.6)
        return shape(*args, **kwargs)

    monkeypatch.setattr(gateway_main, "shape_request", slow_shape)
    m = stack.gateway.metrics
    status, _ = await post(stack, "/v1/completions", {"model": "lora-1", "prompt": "kalo", "max_tokens": 2})
    assert status == 200
    for family in (m.ttft, m.e2e):
        [sum_] = [s.value for f in family.collect() for s in f.samples if s.name.endswith("_sum")]
        assert sum_ >= 0.6, (family, sum_)
    [ttft] = [s.value for f in m.vllm["time_to_first_token_seconds"].collect() for s in f.samples if "_sum" in s.name]
    assert ttft >= 0.6


async def test_a_client_gone_while_its_request_is_shaped_is_counted_aborted(
    stack: Stack, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A client that went away while the gateway tokenized its prompt or compiled its grammar
    (its handler cancelled there, before the relay) was counted nowhere in dlora_requests_total,
    though the access log said 499: a dashboard's abort rate missed every client that gave up on
    a slow long-prompt or schema request. Counted "aborted" now, once. A helper's finding,
    replaying "metrics wrong after abort" reports."""
    from dlora.services.gateway import main as gateway_main

    shape = gateway_main.shape_request

    shaped = threading.Event()

    def slow_shape(*args, **kwargs):  # type: ignore[no-untyped-def]  # a long prompt's tokenizing
        time.sleep(1.0)
        try:
            return shape(*args, **kwargs)
        finally:
            shaped.set()

    monkeypatch.setattr(gateway_main, "shape_request", slow_shape)
    counter = stack.gateway.metrics.requests

    def aborted() -> float:
        return sum(s.value for f in counter.collect() for s in f.samples if s.labels.get("status") == "aborted")

    before = aborted()
    async with aiohttp.ClientSession() as http:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(0.3):
                await http.post(stack.url + "/v1/completions", json={"model": "lora-1", "prompt": "kalo"})
    async with asyncio.timeout(60):  # its shaping over, and counted (a fixed 1.5 s: not under load)
        while not shaped.is_set() or aborted() < before + 1:
            await asyncio.sleep(0.05)
    await asyncio.sleep(0.1)  # whatever came after the shaping: not counted again
    assert aborted() == before + 1
    samples = {(s.labels["adapter"], s.labels["status"]) for f in counter.collect() for s in f.samples}
    assert ("lora-1", "aborted") in samples


async def test_the_status_document_is_made_off_the_event_loop(stack: Stack, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every open status page polls GET /v1/status once a second, and its document grows with
    adapters x workers: made on the event loop it held every stream for tens of milliseconds a
    poll at 4,000 adapters (more with each worker's residency; a helper's measure). It is made on a
    thread from the figures the loop held when the poll came, the same figures."""
    from dlora.services.gateway import status
    from tests.integration.conftest import ADMIN_KEY

    made_on: list[threading.Thread] = []
    make = status.cluster_status

    def recording(*args):  # type: ignore[no-untyped-def]
        made_on.append(threading.current_thread())
        return make(*args)

    monkeypatch.setattr(status, "cluster_status", recording)
    body = {"model": "lora-1", "prompt": "kalo", "max_tokens": 3, "ignore_eos": True}
    assert (await post(stack, "/v1/completions", body))[0] == 200
    headers = {"Authorization": f"Bearer {ADMIN_KEY}"}
    async with aiohttp.ClientSession() as http, http.get(stack.url + "/v1/status", headers=headers) as r:
        assert r.status == 200
        doc = await r.json()
    assert made_on and threading.current_thread() not in made_on, made_on
    (lora_1,) = [a for a in doc["adapters"] if a["name"] == "lora-1"]
    assert lora_1["requests"] == 1 and lora_1["tokens"] == 3 and lora_1["ttft_p50_s"] is not None, lora_1


async def test_finished_requests_are_counted_by_finish_reason_as_vllm_counts_them(stack: Stack) -> None:
    """vllm:request_success_total{finished_reason} (vLLM's count of the requests its engine
    finished: stop, length, abort) was missing, so a vLLM dashboard's success and abort rates read
    nothing. Counted per choice, as vLLM runs each of n as a request; a client gone mid-stream
    counts its choice as an abort, as vLLM #31503 expects (its own count stayed 0 there)."""
    counter = stack.gateway.metrics.success

    def by_reason() -> dict[str, float]:
        samples = [s for f in counter.collect() for s in f.samples if s.name.endswith("_total")]
        return {s.labels["finished_reason"]: s.value for s in samples}

    assert set(by_reason()) >= {"stop", "length", "abort", "error"}  # declared from the start, as vLLM's
    before = by_reason()
    greedy = {"model": "lora-1", "prompt": "kalo", "temperature": 0, "ignore_eos": True, "return_token_ids": True}
    status, out = await post(stack, "/v1/completions", {**greedy, "max_tokens": 3})  # length
    assert status == 200
    second = out["choices"][0]["token_ids"][1]
    status, out = await post(stack, "/v1/completions", {**greedy, "max_tokens": 8, "stop_token_ids": [second]})
    assert status == 200 and out["choices"][0]["finish_reason"] == "stop", out
    status, _ = await post(stack, "/v1/completions", {**greedy, "max_tokens": 2, "n": 2})  # two lengths
    assert status == 200
    assert (await post(stack, "/v1/completions", {**greedy, "temperature": -1}))[0] == 400  # never ran: none
    async with aiohttp.ClientSession() as http:
        body = {**greedy, "max_tokens": 300, "stream": True}
        async with http.post(stack.url + "/v1/completions", json=body) as r:
            await r.content.readline()  # its first event, then gone
    for _ in range(1000):  # (up to 10 s: a loaded CI host)
        if by_reason()["abort"] > before["abort"] and not any(w.engine.has_unfinished() for w in stack.workers):
            break
        await asyncio.sleep(0.01)
    after = by_reason()
    assert {k: after[k] - before.get(k, 0.0) for k in after} == {"stop": 1, "length": 3, "abort": 1, "error": 0}
    async with aiohttp.ClientSession() as http, http.get(stack.url + "/metrics") as r:
        assert 'vllm:request_success_total{finished_reason="abort",model_name="model"}' in await r.text()


async def test_the_status_page_counts_a_client_gone_as_aborted(stack: Stack) -> None:
    """/v1/status gave each adapter's requests (answered) and errors, and a request whose client
    went away mid-stream in neither: the page said nothing of traffic /metrics counted as
    "aborted" and vLLM counts finished (finished_reason "abort"). Its own figure now, so the three
    sum to dlora_requests_total."""
    from tests.integration.conftest import ADMIN_KEY

    async with aiohttp.ClientSession() as http:
        body = {"model": "lora-1", "prompt": "kalo", "max_tokens": 300, "ignore_eos": True, "stream": True}
        async with http.post(stack.url + "/v1/completions", json=body) as r:
            await r.content.readline()  # its first event, then gone
        for _ in range(1000):
            if stack.gateway.metrics.requests.labels("lora-1", "aborted")._value.get():
                break
            await asyncio.sleep(0.01)
        headers = {"Authorization": f"Bearer {ADMIN_KEY}"}
        async with http.get(stack.url + "/v1/status", headers=headers) as r:
            (lora_1,) = [a for a in (await r.json())["adapters"] if a["name"] == "lora-1"]
    assert (lora_1["requests"], lora_1["errors"], lora_1["aborted"]) == (0, 0, 1), lora_1


async def test_vllm_latency_histograms_observe_each_choice_as_vllm_observes_each_of_n(stack: Stack) -> None:
    """vLLM runs each of a request's n as a request of its own and observes each one's time to
    first token, queue time, end-to-end latency and time per output token
    (vllm/v1/metrics/stats.py, IterationStats). The gateway observed an n > 1 request once under
    vLLM's names: an n = 3 request weighed as one in every quantile, its time to first token the
    fastest of its three, and the histograms' _count fell behind vllm:request_success_total (which
    counts choices), so a dashboard's requests-per-second from either read two figures. Ours stay
    one a request, as its client saw it."""
    m = stack.gateway.metrics

    def counts() -> dict[str, float]:
        got = {}
        latencies = [(n, m.vllm[n]) for n in ("time_to_first_token_seconds", "request_time_per_output_token_seconds")]
        latencies += [(n, m.vllm[n]) for n in ("e2e_request_latency_seconds", "request_queue_time_seconds")]
        for name, family in [*latencies, ("ours_e2e", m.e2e), ("ours_ttft", m.ttft)]:
            got[name] = sum(s.value for f in family.collect() for s in f.samples if s.name.endswith("_count"))
        got["success"] = sum(
            s.value
            for f in m.success.collect()
            for s in f.samples
            if s.name.endswith("_total") and s.labels["finished_reason"] in ("stop", "length")
        )
        return got

    before = counts()
    body = {"model": "lora-1", "prompt": "kalo", "max_tokens": 4, "ignore_eos": True, "n": 3, "temperature": 1.0}
    assert (await post(stack, "/v1/completions", body))[0] == 200
    chat = {k: v for k, v in body.items() if k != "prompt"} | {"n": 2, "messages": [{"role": "user", "content": "k"}]}
    assert (await stream(stack, "/v1/chat/completions", chat))[-1] == "[DONE]"
    after = counts()
    delta = {k: after[k] - before[k] for k in after}
    assert delta == {
        "time_to_first_token_seconds": 5,
        "request_time_per_output_token_seconds": 5,
        "e2e_request_latency_seconds": 5,
        "request_queue_time_seconds": 5,
        "ours_e2e": 2,
        "ours_ttft": 2,
        "success": 5,
    }, delta


async def test_vllms_latency_histograms_count_what_request_success_counts_finished_under_a_mixed_load(
    stack: Stack,
) -> None:
    """vLLM observes end-to-end latency, queue time and time per output token in one loop over
    its finished requests, the one that counts vllm:request_success_total (vllm/v1/metrics/
    loggers.py): their _count is the same. A mixed load (n > 1, streamed and not, one-token
    answers, a client gone mid-stream): the queue time was observed at each choice's first
    token, the gone client's choices too, and the time per output token left out one-token
    choices: three _counts for one figure."""
    m = stack.gateway.metrics

    def counts() -> dict[str, float]:
        got = {
            n: sum(s.value for f in h.collect() for s in f.samples if s.name.endswith("_count"))
            for n, h in m.vllm.items()
        }
        by_reason = {
            s.labels["finished_reason"]: s.value
            for f in m.success.collect()
            for s in f.samples
            if s.name.endswith("_total")
        }
        return got | by_reason

    before = counts()
    body = {"model": "lora-1", "prompt": "kalo", "max_tokens": 4, "ignore_eos": True, "n": 3, "temperature": 1.0}
    jobs = [
        post(stack, "/v1/completions", body),
        post(stack, "/v1/completions", {**body, "max_tokens": 1, "n": 2}),
        stream(stack, "/v1/completions", {**body, "n": 2}),
    ]
    await asyncio.gather(*jobs)
    async with aiohttp.ClientSession() as http:
        gone = {**body, "max_tokens": 300, "stream": True, "n": 2}
        async with http.post(stack.url + "/v1/completions", json=gone) as r:
            await r.content.readline()  # its first event, then gone
    for _ in range(1000):  # (up to 10 s: a loaded CI host)
        if counts()["abort"] >= before["abort"] + 2 and not any(w.engine.has_unfinished() for w in stack.workers):
            break
        await asyncio.sleep(0.01)
    delta = {k: v - before[k] for k, v in counts().items()}
    finished = delta["stop"] + delta["length"]
    assert (finished, delta["abort"], delta["error"]) == (7, 2, 0), delta
    for name in ("e2e_request_latency_seconds", "request_queue_time_seconds", "request_time_per_output_token_seconds"):
        assert delta[name] == finished, (name, delta)
    assert 7 <= delta["time_to_first_token_seconds"] <= 9, delta  # (a gone choice's first token may not have come)
