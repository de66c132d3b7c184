"""vLLM's per-request series on the gateway's /metrics beyond its latencies (token counts, the
request's n and max_tokens, prefill/decode/inference time, inter-token latency), scraped over HTTP
from a real stack and checked against what the requests were and did, as vLLM observes each
(vllm/v1/metrics/loggers.py, stats.py; the dashboards' panels in examples/observability)."""

from __future__ import annotations

import asyncio

import aiohttp
import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families
from redis.asyncio import Redis

from dlora.model.make_tiny import TinyOutput
from dlora.services.servers import Server
from dlora.services.worker.main import WorkerService
from tests.integration.conftest import Stack, run_stack
from tests.integration.test_gateway import post, stream

TIMES = ("prefill", "decode", "inference", "queue")
COUNTS = ("prompt_tokens", "generation_tokens", "params_max_tokens", "params_n", "max_num_generation_tokens")


async def _scrape(stack: Stack) -> dict[str, float]:
    """The gateway's vllm:* samples (those labelled by the served model), by sample name (and
    finished_reason for vllm:request_success_total), as Prometheus reads them."""
    async with aiohttp.ClientSession() as http, http.get(stack.url + "/metrics") as r:
        text = await r.text()
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name.startswith("vllm:") and s.labels.get("model_name") == "model" and "le" not in s.labels:
                reason = s.labels.get("finished_reason")
                out[f"{s.name}:{reason}" if reason else s.name] = s.value
    return out


def _delta(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    return {k: v - before.get(k, 0.0) for k, v in after.items()}


async def test_vllms_token_count_and_parameter_histograms_observe_each_choice_and_each_request(stack: Stack) -> None:
    """vLLM's dashboards draw prompt and generation lengths (heatmaps of
    vllm:request_prompt_tokens / vllm:request_generation_tokens) and "max generation token in
    sequence group" (vllm:request_max_num_generation_tokens), and the production stack reads
    vllm:request_params_n / _max_tokens: a dlora gateway exported none of them, and those panels
    read nothing. vLLM observes the lengths and max_tokens of each request it finishes (each of n
    its own), n and the longest choice's length once a request (a completion's list of prompts:
    one request a prompt)."""
    before = await _scrape(stack)
    body = {"model": "lora-1", "prompt": "kalo", "max_tokens": 4, "ignore_eos": True, "n": 3, "temperature": 1.0}
    status, out = await post(stack, "/v1/completions", body)
    assert status == 200, out
    prompt = out["usage"]["prompt_tokens"]  # (the prompt's, once: its choices share it)
    status, two = await post(stack, "/v1/completions", {**body, "prompt": ["kalo", "ka"], "n": 1, "max_tokens": 2})
    assert status == 200, two
    prompts = two["usage"]["prompt_tokens"]  # both prompts'
    d = _delta(before, await _scrape(stack))
    assert d["vllm:request_success_total:length"] == 5
    for name in ("prompt_tokens", "generation_tokens", "params_max_tokens"):  # each choice
        assert d[f"vllm:request_{name}_count"] == 5, (name, d)
    assert d["vllm:request_prompt_tokens_sum"] == 3 * prompt + prompts
    assert d["vllm:request_generation_tokens_sum"] == 3 * 4 + 2 * 2
    assert d["vllm:request_params_max_tokens_sum"] == 3 * 4 + 2 * 2
    # once a request: the n = 3 one, and each of the two prompts (n = 1)
    assert (d["vllm:request_params_n_count"], d["vllm:request_params_n_sum"]) == (3, 3 + 1 + 1)
    assert d["vllm:request_max_num_generation_tokens_count"] == 3
    assert d["vllm:request_max_num_generation_tokens_sum"] == 4 + 2 + 2


async def test_vllms_phase_times_and_inter_token_latency_add_up_as_vllms_do(stack: Stack) -> None:
    """vLLM's "requests prefill and decode time" panel (vllm:request_prefill_time_seconds,
    vllm:request_decode_time_seconds) and its inter-token latency panel
    (vllm:inter_token_latency_seconds, the v1 name of the deprecated time_per_output_token) read
    nothing from a dlora gateway. Observed as vLLM does: prefill from the worker's first step
    of the choice to its first token (the worker's measure, on the first chunk), decode from its
    first token to its last, inference the two; one inter-token latency an output after a
    choice's first, so that their sum is the decode time."""
    before = await _scrape(stack)
    body = {"model": "lora-1", "prompt": "kalo", "max_tokens": 6, "ignore_eos": True, "n": 2, "temperature": 1.0}
    assert (await post(stack, "/v1/completions", body))[0] == 200
    assert (await stream(stack, "/v1/completions", {**body, "n": 1}))[-1] == "[DONE]"
    assert (await post(stack, "/v1/completions", {**body, "max_tokens": 1}))[0] == 200  # no decode at all
    d = _delta(before, await _scrape(stack))
    finished = d["vllm:request_success_total:length"]
    assert finished == 5
    for phase in TIMES:  # in the loop over finished requests that counts request_success, as vLLM's
        assert d[f"vllm:request_{phase}_time_seconds_count"] == finished, (phase, d)
    assert d["vllm:request_prefill_time_seconds_sum"] > 0
    assert d["vllm:request_inference_time_seconds_sum"] == pytest.approx(
        d["vllm:request_prefill_time_seconds_sum"] + d["vllm:request_decode_time_seconds_sum"]
    )
    # the worker's queue and prefill lie within the gateway's time to first token
    worker = d["vllm:request_queue_time_seconds_sum"] + d["vllm:request_prefill_time_seconds_sum"]
    assert worker <= d["vllm:time_to_first_token_seconds_sum"]
    # each output with tokens after a choice's first: at most 5 for each 6-token choice, none for a
    # one-token one; the gaps sum to the decode times (its last output carries its last token)
    assert 1 <= d["vllm:inter_token_latency_seconds_count"] <= 3 * 5
    assert d["vllm:inter_token_latency_seconds_sum"] == pytest.approx(d["vllm:request_decode_time_seconds_sum"])


async def test_preempted_requests_count_their_tokens_once_in_every_vllm_series(
    nats_server: Server, redis: Redis, tiny_llama: TinyOutput
) -> None:
    """vLLM reports of counts doubled by preemption (a recomputed prompt counted again in
    prompt_tokens, a preempted request's tokens or lengths twice), replayed under KV pressure:
    each worker's counters and tokens-per-step histogram and the gateway's per-request histograms
    count each request's prompt and output once, as its usage says, however often it was evicted
    and recomputed."""
    engine = {"num_blocks": 6, "block_size": 16, "max_num_seqs": 4}  # 96 tokens of KV for 4 requests
    async with run_stack(nats_server, redis, tiny_llama, engine=engine) as stack:
        before = await _scrape(stack)
        body = {"model": "model", "prompt": "kalo remi " * 4, "max_tokens": 40, "ignore_eos": True, "temperature": 0}
        answers = await asyncio.gather(*(post(stack, "/v1/completions", body) for _ in range(6)))
        assert all(status == 200 for status, _ in answers), answers
        prompt = sum(out["usage"]["prompt_tokens"] for _, out in answers)
        generated = sum(out["usage"]["completion_tokens"] for _, out in answers)
        worker = {n: sum(_sample(w, n) for w in stack.workers) for n in _WORKER}
        d = _delta(before, await _scrape(stack))
    assert worker["vllm:num_preemptions_total"] > 0, worker  # the pressure this replays
    assert (worker["vllm:prompt_tokens_total"], worker["vllm:generation_tokens_total"]) == (prompt, generated)
    computed = prompt - worker["vllm:prefix_cache_hits_total"]
    assert worker["vllm:iteration_tokens_total_sum"] == computed + generated, worker
    assert (d["vllm:request_prompt_tokens_sum"], d["vllm:request_generation_tokens_sum"]) == (prompt, generated)
    assert d["vllm:request_prompt_tokens_count"] == d["vllm:request_success_total:length"] == 6


_WORKER = (
    "vllm:num_preemptions_total",
    "vllm:prompt_tokens_total",
    "vllm:generation_tokens_total",
    "vllm:prefix_cache_hits_total",
    "vllm:iteration_tokens_total_sum",
)


def _sample(worker: WorkerService, name: str) -> float:
    """A worker's sample ``name``, as its exporter serves it (its one series)."""
    text = generate_latest(worker.metrics.registry).decode()
    return sum(s.value for f in text_string_to_metric_families(text) for s in f.samples if s.name == name)
