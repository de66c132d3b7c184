"""What a response says of its tokens beyond the text: usage (per event with vLLM's
continuous_usage_stats, the prefix cache's share in OpenAI's prompt_tokens_details) and the token
ids themselves (vLLM's return_token_ids)."""

from __future__ import annotations

import asyncio

import aiohttp

from dlora.common.messages import GenerateRequest, SamplingParams
from dlora.services.dispatcher.affinity import request_keys
from tests.integration.conftest import ADMIN_KEY, Stack
from tests.integration.test_gateway import PROMPTS, post, stream


async def test_continuous_usage_stats_put_the_usage_so_far_in_every_event(stack: Stack) -> None:
    """vLLM's stream_options.continuous_usage_stats (a 400 as an unknown field before: clients
    that send it got nothing)."""
    options = {"include_usage": True, "continuous_usage_stats": True}
    body = {"model": "lora-0", "prompt": PROMPTS[0], "max_tokens": 5, "ignore_eos": True, "stream": True}
    events = await stream(stack, "/v1/completions", {**body, "stream_options": options})
    counted = [e["usage"]["completion_tokens"] for e in events[:-1] if e["choices"]]
    assert counted == sorted(counted) and counted[-1] == 5 and events[-2]["usage"]["completion_tokens"] == 5
    assert all(e["usage"]["prompt_tokens"] == events[-2]["usage"]["prompt_tokens"] for e in events[:-1])
    plain = await stream(stack, "/v1/completions", body)
    assert all("usage" not in e for e in plain[:-1])  # only when asked
    # and only with include_usage, as vLLM (every event carried it, and no usage chunk came)
    alone = await stream(stack, "/v1/completions", {**body, "stream_options": {"continuous_usage_stats": True}})
    assert all("usage" not in e for e in alone[:-1])
    # chat, n = 2: each choice's role event precedes its tokens (the first one's counted the token
    # whose arrival opened the stream), then each token event counts one more
    chat = {"model": "lora-0", "messages": [{"role": "user", "content": "kalo"}], "max_tokens": 3, "n": 2}
    events = await stream(stack, "/v1/chat/completions", {**chat, "ignore_eos": True, "stream_options": options})
    for index in (0, 1):
        mine = [e for e in events[:-1] if e["choices"] and e["choices"][0]["index"] == index]
        assert "role" in mine[0]["choices"][0]["delta"] and mine[0]["usage"]["completion_tokens"] == 0
        assert [e["usage"]["completion_tokens"] for e in mine[1:]] == [1, 2, 3]
    # two prompts: each choice's events count its own prompt (they said both prompts' tokens)
    both = {**body, "prompt": ["kalo remi", "a"], "max_tokens": 2}
    events = await stream(stack, "/v1/completions", {**both, "stream_options": options})
    sizes = [
        len((await post(stack, "/tokenize", {"model": "lora-0", "prompt": p}))[1]["tokens"]) for p in both["prompt"]
    ]
    for index in (0, 1):
        mine = [e for e in events[:-1] if e["choices"] and e["choices"][0]["index"] == index]
        assert {e["usage"]["prompt_tokens"] for e in mine} == {sizes[index]}, (index, sizes)
    assert events[-2]["usage"]["prompt_tokens"] == sum(sizes)  # the request's usage: every prompt


async def test_usage_says_how_many_prompt_tokens_came_from_the_prefix_cache(stack: Stack) -> None:
    """OpenAI's usage.prompt_tokens_details.cached_tokens (a user's trial: the worker counted the
    hits, the response said nothing): 0 the first time, the cached blocks' tokens the next time,
    in a JSON body and in a stream's usage chunk, each prompt once."""
    prompt = " ".join(["kalo remi sona"] * 12)
    body = {"model": "lora-1", "prompt": prompt, "max_tokens": 2}
    status, first = await post(stack, "/v1/completions", body)
    assert status == 200 and first["usage"]["prompt_tokens_details"] == {"cached_tokens": 0}, first["usage"]
    # as a chat's user reads between turns, the workers' stats (every 0.1 s here) say the first is
    # over; the dispatcher then sends the same prefix where it went (two workers: either before)
    await asyncio.sleep(0.4)
    status, again = await post(stack, "/v1/completions", body)
    cached, size = again["usage"]["prompt_tokens_details"]["cached_tokens"], again["usage"]["prompt_tokens"]
    assert status == 200 and 0 < cached < size and cached % 16 == 0, again["usage"]  # whole blocks, not the last token
    options = {"include_usage": True}
    await asyncio.sleep(0.4)
    events = await stream(stack, "/v1/completions", {**body, "prompt": [prompt, prompt], "stream_options": options})
    assert events[-2]["usage"]["prompt_tokens_details"] == {"cached_tokens": 2 * cached}
    status, other = await post(stack, "/v1/completions", {**body, "model": "lora-2"})  # other weights: no hit
    assert other["usage"]["prompt_tokens_details"] == {"cached_tokens": 0}


async def test_a_requests_choices_run_on_one_worker_and_compute_their_prompt_once(stack: Stack) -> None:
    """A user's trial: n = 8 choices spread over both workers, each computing the prompt, and a cold
    prompt's usage said nearly all of it came from the cache (the choice that found the most)."""
    queried = [w.engine.stats.prefix_cache_queries for w in stack.workers]
    hits = [w.engine.stats.prefix_cache_hits for w in stack.workers]
    body = {"model": "lora-0", "prompt": " ".join(["remi sona kalo"] * 14), "max_tokens": 2, "n": 8}
    status, done = await post(stack, "/v1/completions", body)
    assert status == 200 and done["usage"]["prompt_tokens_details"] == {"cached_tokens": 0}, done["usage"]
    grew = [w.engine.stats.prefix_cache_queries - q for w, q in zip(stack.workers, queried)]
    assert sorted(grew) == [0, 8 * done["usage"]["prompt_tokens"]], grew
    there = grew.index(max(grew))  # the prompt computed there once: 7 of 8 found its full blocks cached
    full = (done["usage"]["prompt_tokens"] - 1) // 16 * 16
    assert stack.workers[there].engine.stats.prefix_cache_hits - hits[there] == 7 * full > 0


async def test_an_admin_resets_every_workers_prefix_cache(stack: Stack) -> None:
    """vLLM's POST /reset_prefix_cache (SGLang's /flush_cache), admin only: the next request for a
    prompt cached before computes all of it, on any worker."""
    body = {"model": "lora-2", "prompt": " ".join(["sona kalo"] * 16), "max_tokens": 2}
    await post(stack, "/v1/completions", body)
    ids = (await post(stack, "/tokenize", {"model": "lora-2", "prompt": body["prompt"]}))[1]["tokens"]
    version = (await stack.store.get_adapter("lora-2")).version
    sent = GenerateRequest(
        request_id="r",
        reply_to="x",
        adapter="lora-2",
        adapter_version=version,
        prompt_token_ids=ids,
        params=SamplingParams(),
    )
    assert stack.dispatcher.state.affinity.worker_for(request_keys(sent), {"w0", "w1"}) is not None
    await asyncio.sleep(0.4)  # the stats say it is over: the next goes where it went
    assert (await post(stack, "/v1/completions", body))[1]["usage"]["prompt_tokens_details"]["cached_tokens"] > 0
    assert (await post(stack, "/reset_prefix_cache", {}))[0] == 401
    status, done = await post(stack, "/reset_prefix_cache", {}, {"Authorization": f"Bearer {ADMIN_KEY}"})
    assert status == 200 and set(done["workers"]) == {"w0", "w1"} and done["missing"] == [], done
    assert sum(done["workers"].values()) > 0
    assert stack.dispatcher.state.affinity.worker_for(request_keys(sent), {"w0", "w1"}) is None  # cached nowhere
    await asyncio.sleep(0.4)
    assert (await post(stack, "/v1/completions", body))[1]["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
    # SGLang's name for it, POST and (its older clients') GET: a 404 before
    async with aiohttp.ClientSession() as http:
        for method in ("POST", "GET"):
            async with http.request(method, stack.url + "/flush_cache") as r:
                assert r.status == 401, await r.text()
            auth = {"Authorization": f"Bearer {ADMIN_KEY}"}
            async with http.request(method, stack.url + "/flush_cache", headers=auth) as r:
                assert r.status == 200 and set((await r.json())["workers"]) == {"w0", "w1"}, await r.text()


async def test_return_token_ids_gives_each_choices_tokens_and_its_prompts(stack: Stack) -> None:
    """vLLM's return_token_ids (a 400 as an unknown field before): RL trainers read the token ids
    instead of tokenizing the text again. The same ids whole and streamed (the prompt's with each
    choice's first event, a chat response's at its top), the stream's deltas adding up to them."""
    body = {"model": "lora-0", "prompt": "kalo remi", "max_tokens": 4, "ignore_eos": True, "n": 2, "seed": 3}
    prompt = (await post(stack, "/tokenize", {"model": "lora-0", "prompt": "kalo remi"}))[1]["tokens"]
    status, whole = await post(stack, "/v1/completions", {**body, "return_token_ids": True})
    assert status == 200, whole
    for c in whole["choices"]:
        assert c["prompt_token_ids"] == prompt and len(c["token_ids"]) == 4, c
    events = await stream(stack, "/v1/completions", {**body, "return_token_ids": True})
    for c in whole["choices"]:
        mine = [e["choices"][0] for e in events[:-1] if e["choices"] and e["choices"][0]["index"] == c["index"]]
        assert [e.get("prompt_token_ids") for e in mine if "prompt_token_ids" in e] == [prompt]
        assert [t for e in mine for t in e["token_ids"]] == c["token_ids"]  # seeded: the same draws
    status, plain = await post(stack, "/v1/completions", body)
    assert "token_ids" not in plain["choices"][0]  # only when asked
    chat = {"model": "lora-0", "messages": [{"role": "user", "content": "kalo"}], "max_tokens": 3, "seed": 5}
    status, answer = await post(stack, "/v1/chat/completions", {**chat, "return_token_ids": True})
    assert status == 200 and answer["prompt_token_ids"] and len(answer["choices"][0]["token_ids"]) <= 3, answer
    events = await stream(stack, "/v1/chat/completions", {**chat, "return_token_ids": True})
    assert events[0]["prompt_token_ids"] == answer["prompt_token_ids"]
    # one prompt whatever n: in the response's first event alone (each choice's repeated it; vLLM: once)
    several = await stream(stack, "/v1/chat/completions", {**chat, "n": 3, "return_token_ids": True})
    assert [e["prompt_token_ids"] for e in several if "prompt_token_ids" in e] == [answer["prompt_token_ids"]]
    assert [t for e in events[:-1] if e["choices"] for t in e["choices"][0]["token_ids"]] == answer["choices"][0][
        "token_ids"
    ]


async def test_return_token_ids_keeps_every_id_of_a_tool_call_stream(stack: Stack) -> None:
    """A review: a tool-call answer's events whose text is held back are not sent, and their token
    ids went with them; with return_token_ids such an event goes out for its ids."""
    params = {"type": "object", "properties": {"city": {"enum": ["kalo", "remi"]}}, "required": ["city"]}
    tools = [{"type": "function", "function": {"name": "weather", "parameters": params}}]
    chat = {
        "model": "lora-0",
        "messages": [{"role": "user", "content": "kalo"}],
        "max_tokens": 40,
        "temperature": 0,
        "tools": tools,
        "tool_choice": "required",
        "return_token_ids": True,
    }
    status, whole = await post(stack, "/v1/chat/completions", chat)
    assert status == 200 and "content" in whole["choices"][0]["message"], whole  # calls, whole or cut off
    events = await stream(stack, "/v1/chat/completions", chat)
    streamed = [t for e in events[:-1] if e["choices"] for t in e["choices"][0].get("token_ids", [])]
    assert streamed == whole["choices"][0]["token_ids"] and len(streamed) > 3


async def test_return_token_ids_streams_the_prompts_ids_with_an_echo_that_has_logprobs(stack: Stack) -> None:
    """A helper's replay of vLLM #22587's kind: streamed with echo and logprobs (lm-eval's
    loglikelihood request, max_tokens 0), the echoed prompt's event carried neither token_ids nor
    the prompt's ids, which came with the next event, or never where the prompt's was the only one;
    the whole response had them."""
    prompt = (await post(stack, "/tokenize", {"model": "lora-0", "prompt": "kalo remi"}))[1]["tokens"]
    for max_tokens in (0, 3):
        body = {"model": "lora-0", "prompt": "kalo remi", "echo": True, "logprobs": 1, "max_tokens": max_tokens}
        body |= {"n": 2, "seed": 4, "ignore_eos": True, "return_token_ids": True}
        status, whole = await post(stack, "/v1/completions", body)
        assert status == 200, whole
        events = await stream(stack, "/v1/completions", body)
        for c in whole["choices"]:
            mine = [e["choices"][0] for e in events[:-1] if e["choices"] and e["choices"][0]["index"] == c["index"]]
            assert mine[0]["text"] == "kalo remi" and mine[0]["prompt_token_ids"] == prompt == c["prompt_token_ids"]
            assert all("prompt_token_ids" not in e for e in mine[1:]), mine
            assert [t for e in mine for t in e["token_ids"]] == c["token_ids"] and len(c["token_ids"]) == max_tokens
