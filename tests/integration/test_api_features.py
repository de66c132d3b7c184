"""API features clients rely on, through the gateway: n > 1, several prompts, echo (logprobs:
``test_api_logprobs``)."""

from __future__ import annotations

import asyncio
import json
import time

import pytest

from dlora.common import bus
from dlora.services.gateway import openai, shaping
from tests.integration.conftest import Stack
from tests.integration.test_gateway import PROMPTS, offline, post, stream


async def test_n_samples_and_several_prompts(stack: Stack) -> None:
    greedy = {"model": "lora-0", "prompt": [PROMPTS[0], PROMPTS[1]], "max_tokens": 5, "temperature": 0, "n": 2}
    status, resp = await post(stack, "/v1/completions", greedy)
    assert status == 200, resp
    expected = offline(
        stack.tiny,
        [{"id": str(i), "adapter": "lora-0", "prompt": p, "max_tokens": 5} for i, p in enumerate(PROMPTS[:2])],
    )
    assert [c["index"] for c in resp["choices"]] == [0, 1, 2, 3]
    assert [c["text"] for c in resp["choices"]] == [expected[0]["text"]] * 2 + [expected[1]["text"]] * 2
    assert resp["usage"]["completion_tokens"] == 20
    sampled = {"model": "lora-0", "prompt": PROMPTS[0], "max_tokens": 8, "temperature": 1.0, "n": 3, "seed": 7}
    # vLLM's request_id, or its X-Request-Id header first, names the response; the samples are
    # as without it (the requests inside keep their own ids)
    first = await post(stack, "/v1/completions", {**sampled, "request_id": "trace-1"})
    again = await post(stack, "/v1/completions", {**sampled, "request_id": "x"}, headers={"X-Request-Id": "trace-2"})
    assert (first[1]["id"], again[1]["id"]) == ("cmpl-trace-1", "cmpl-trace-2")
    status, odd = await post(stack, "/v1/completions", {**sampled, "n": 1}, headers={"X-Request-Id": "x" * 300})
    assert status == 200 and len(odd["id"]) == len("cmpl-") + 32  # a proxy's odd header is ignored, not a 400
    texts = [c["text"] for c in first[1]["choices"]]
    assert len(set(texts)) == 3 and texts == [c["text"] for c in again[1]["choices"]]  # distinct, reproducible
    events = await stream(
        stack,
        "/v1/chat/completions",
        {"model": "lora-0", "max_tokens": 3, "n": 2, "messages": [{"role": "user", "content": "kalo"}]},
    )
    finishes = [e["choices"][0]["index"] for e in events[:-1] if e["choices"][0]["finish_reason"] is not None]
    assert sorted(finishes) == [0, 1]  # one finish per choice, under its own index (vLLM #4220)
    # streamed, every event under its own choice: the texts put together are the body's
    events = await stream(stack, "/v1/completions", greedy)
    texts = ["", "", "", ""]
    for e in events[:-1]:
        texts[e["choices"][0]["index"]] += e["choices"][0]["text"]
    assert texts == [c["text"] for c in resp["choices"]]


async def test_echo(stack: Stack) -> None:
    status, resp = await post(
        stack, "/v1/completions", {"model": "model", "prompt": PROMPTS[2], "max_tokens": 0, "echo": True}
    )
    assert status == 200 and resp["choices"][0]["text"] == PROMPTS[2]
    assert resp["usage"]["completion_tokens"] == 0
    status, resp = await post(
        stack,
        "/v1/completions",
        {"model": "model", "prompt": PROMPTS[2], "max_tokens": 3, "echo": True, "temperature": 0},
    )
    plain = await post(
        stack, "/v1/completions", {"model": "model", "prompt": PROMPTS[2], "max_tokens": 3, "temperature": 0}
    )
    assert resp["choices"][0]["text"] == PROMPTS[2] + plain[1]["choices"][0]["text"]
    # with logprobs: the prompt's too, its first token's null (lm-eval-harness's loglikelihood
    # requests: echo, logprobs 1, max_tokens 1); a prompt that goes on from another shares its entries
    body = {"model": "lora-1", "prompt": PROMPTS[0], "max_tokens": 1, "echo": True, "logprobs": 2, "temperature": 0}
    status, resp = await post(stack, "/v1/completions", body)
    assert status == 200, resp
    lp, n = resp["choices"][0]["logprobs"], len(stack.gateway.tokenizer.encode(PROMPTS[0]))
    assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["text_offset"]) == n + 1
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    assert all(v <= 0 for v in lp["token_logprobs"][1:]) and resp["usage"]["completion_tokens"] == 1
    echoed = resp["choices"][0]["text"]
    assert all(echoed[at:].startswith(t) for at, t in zip(lp["text_offset"][:n], lp["tokens"][:n]))  # where each is
    # a special token written out in the text, or in token ids echoed as the output shows them
    # (skip_special_tokens false: the echo left them out whatever it said): every offset indexes
    # the echo (vLLM #5334's kind; the literal "</s>" moved every offset before it by its length)
    eos = stack.gateway.tokenizer.eos_token
    specials = stack.gateway.tokenizer.encode(f"{PROMPTS[0]}{eos} {PROMPTS[1]}")
    for extra in ({"prompt": f"{PROMPTS[0]}{eos} {PROMPTS[1]}"}, {"prompt": specials, "skip_special_tokens": False}):
        status, got = await post(stack, "/v1/completions", {**body, **extra})
        assert status == 200, got
        lp, text = got["choices"][0]["logprobs"], got["choices"][0]["text"]
        assert eos in text, text
        for t, at in zip(lp["tokens"][:-1], lp["text_offset"]):
            assert text.startswith(t, at) or text.startswith(t[1:], at) or t == "<s>", (t, at, text, lp)
    # a one-token prompt: its token listed, with no logprob (vLLM); it was left out
    status, one = await post(stack, "/v1/completions", {**body, "prompt": [74]})
    assert one["choices"][0]["logprobs"]["token_logprobs"][0] is None
    assert len(one["choices"][0]["logprobs"]["tokens"]) == 2
    status, longer = await post(stack, "/v1/completions", {**body, "prompt": PROMPTS[0] + " nevo rida"})
    shared = longer["choices"][0]["logprobs"]["token_logprobs"][1:n]
    assert shared == pytest.approx(lp["token_logprobs"][1:n], abs=1e-5)
    # max_tokens 0 (OpenAI's own loglikelihood request; a 400 before): the prompt and its logprobs
    # alone, nothing generated; the entries those of the request above
    status, zero = await post(stack, "/v1/completions", {**body, "max_tokens": 0})
    assert status == 200, zero
    full = [3 + i % 97 for i in range(stack.gateway.served.context)]  # echoed alone it fits; its logprobs: no
    assert (await post(stack, "/v1/completions", {**body, "prompt": full, "max_tokens": 0, "logprobs": None}))[0] == 200
    status, refused = await post(stack, "/v1/completions", {**body, "prompt": full, "max_tokens": 0})
    assert (status, refused["error"]["param"]) == (400, "prompt") and "need one position" in refused["error"]["message"]
    [choice] = zero["choices"]
    assert choice["text"] == PROMPTS[0] and choice["finish_reason"] == "length"
    assert zero["usage"]["completion_tokens"] == 0 and len(choice["logprobs"]["tokens"]) == n
    assert choice["logprobs"]["token_logprobs"] == pytest.approx(lp["token_logprobs"][:n], abs=1e-5, nan_ok=True)
    # streamed (a 400 before): the echoed prompt's event carries its logprobs; the events put
    # together are the response above, for each of two prompts
    for extra, whole in (({}, resp), ({"max_tokens": 0}, zero)):
        two = {**body, **extra, "prompt": [PROMPTS[0], PROMPTS[1]]}
        events = [e for e in await stream(stack, "/v1/completions", two) if isinstance(e, dict)]
        assert {e["choices"][0]["index"] for e in events} == {0, 1}
        mine = [e["choices"][0] for e in events if e["choices"][0]["index"] == 0]
        assert "".join(c["text"] for c in mine) == whole["choices"][0]["text"]
        assert mine[-1]["finish_reason"] == whole["choices"][0]["finish_reason"]
        joined = {k: [v for c in mine if c["logprobs"] for v in c["logprobs"][k]] for k in ("tokens", "text_offset")}
        assert joined == {k: whole["choices"][0]["logprobs"][k] for k in joined}
    # vLLM's prompt_logprobs field: the same entries, as vLLM answers them (a choice's on
    # completions, the response's on chat), beside an echo that asks for fewer alternatives
    plain_body = {**body, "echo": False, "logprobs": None, "prompt_logprobs": 3}
    for asked in (plain_body, {**body, "prompt_logprobs": 3}, {**plain_body, "max_tokens": 0}):
        status, field = await post(stack, "/v1/completions", asked)
        assert status == 200, field
        entries = field["choices"][0]["prompt_logprobs"]
        ids = stack.gateway.tokenizer.encode(PROMPTS[0])
        assert entries[0] is None and len(entries) == n
        got = [e[str(t)]["logprob"] for e, t in zip(entries[1:], ids[1:])]
        assert got == pytest.approx(lp["token_logprobs"][1:n], abs=1e-5)
        # the token and its 3 alternatives (ranked 1..3): 3 entries where it is one of them, else
        # its rank in the vocabulary is past them
        assert all(len(e) in (3, 4) and {1, 2, 3} <= {v["rank"] for v in e.values()} for e in entries[1:])
        assert all((e[str(t)]["rank"] > 3) == (len(e) == 4) for e, t in zip(entries[1:], ids[1:]))
        if asked.get("echo"):  # the echo keeps its own 2 alternatives (the chosen token may add one)
            assert all(len(t) <= 3 for t in field["choices"][0]["logprobs"]["top_logprobs"][1:n])
    chat = {"model": "lora-1", "messages": [{"role": "user", "content": "kalo"}], "max_tokens": 2, "prompt_logprobs": 1}
    status, chatted = await post(stack, "/v1/chat/completions", {**chat, "n": 2})
    assert status == 200 and chatted["prompt_logprobs"][0] is None and len(chatted["prompt_logprobs"]) > 2, chatted
    assert "prompt_logprobs" not in chatted["choices"][0]
    status, refused = await post(stack, "/v1/chat/completions", {**chat, "stream": True})
    assert (status, refused["error"]["param"]) == (400, "prompt_logprobs"), refused
    # entries that would not fit the bus in one reply are refused up front (the reply was dropped
    # and the client waited out the chunk timeout); here the bus is made to carry 20 kB
    carried, stack.gateway.nc._max_payload = stack.gateway.nc._max_payload, 20_000
    try:
        status, resp = await post(stack, "/v1/completions", {**body, "prompt": list(range(3, 203)), "logprobs": 5})
    finally:
        stack.gateway.nc._max_payload = carried
    assert (status, resp["error"]["param"]) == (413, "logprobs") and "200 prompt tokens" in resp["error"]["message"]


async def test_more_members_of_the_fault_kinds(stack: Stack, tmp_path) -> None:
    import aiohttp

    base = {"model": "lora-0", "prompt": "kalo", "max_tokens": 2}
    # a penalty that would overflow a naive sampler (taken, as vLLM takes any above 0): served, not a crash
    status, resp = await post(stack, "/v1/completions", {**base, "repetition_penalty": 1e-40})
    assert status == 200, resp
    status, resp = await post(stack, "/v1/completions", {**base, "repetition_penalty": 0})
    assert (status, resp["error"]["param"]) == (400, "repetition_penalty"), resp
    # integral floats in integer fields, as vLLM's server takes them; a fraction is a 400 naming its field
    status, resp = await post(stack, "/v1/completions", {**base, "max_tokens": 2.0, "top_k": 40.0, "seed": 3.0})
    assert status == 200 and resp["usage"]["completion_tokens"] <= 2, resp
    status, resp = await post(stack, "/v1/completions", {**base, "top_k": 40.5})
    assert (status, resp["error"]["param"]) == (400, "top_k"), resp
    status, _ = await post(stack, "/v1/completions", {**base, "repetition_penalty": 0.01, "temperature": 2e-5})
    assert status == 200
    # max_tokens 0 is in the spec's range: nothing generated
    status, resp = await post(stack, "/v1/completions", {**base, "max_tokens": 0})
    assert status == 200 and resp["choices"][0]["text"] == "" and resp["usage"]["completion_tokens"] == 0
    # best_of other than n, and too many choices, are refused by name
    status, resp = await post(stack, "/v1/completions", {**base, "n": 3, "best_of": 2})
    assert status == 400 and "best_of" in resp["error"]["message"]
    status, resp = await post(stack, "/v1/completions", {**base, "prompt": ["kalo"] * 20, "n": 20})
    assert status == 400 and "choices" in resp["error"]["message"]
    # an admin header that is not ASCII is a 401, not a 500
    async with aiohttp.ClientSession() as http:
        async with http.get(stack.url + "/v1/models", headers={"Authorization": "Bearer k\u00e9y"}) as r:
            assert r.status == 200
        async with http.delete(stack.url + "/v1/adapters/lora-0", headers={"Authorization": "Bearer k\u00e9y"}) as r:
            assert r.status == 401
        # a wrong method is a 405 that says which are allowed (RFC 9110 requires Allow)
        async with http.get(stack.url + "/v1/chat/completions") as r:
            assert r.status == 405 and "POST" in r.headers["Allow"] and (await r.json())["error"]["message"]
        async with http.get(stack.url + "/dashboard/", allow_redirects=False) as r:  # was a 403
            assert (r.status, r.headers["Location"]) == (308, "../dashboard")  # (under a proxy's prefix too)
        async with http.get(stack.url + "/dashboard/") as r:  # followed: the page
            assert r.status == 200 and str(r.url).endswith("/dashboard")
        async with http.get(stack.url + "/dashboard/nope.js") as r:  # was an empty octet-stream
            assert r.status == 404 and "nope.js" in (await r.json())["error"]["message"]
        async with http.get(stack.url + "/dashboard/dashboard.js") as r:
            assert r.status == 200 and "javascript" in r.content_type
    # echo gives the prompt as written
    status, resp = await post(stack, "/v1/completions", {**base, "prompt": "kalo  remi", "echo": True, "max_tokens": 0})
    assert resp["choices"][0]["text"] == "kalo  remi"


async def test_a_chat_template_that_refuses_the_messages_is_a_400(stack: Stack) -> None:
    tok = stack.gateway.tokenizer
    saved = getattr(tok, "chat_template", None)
    tok.chat_template = (
        "{% for m in messages %}{% if m['role'] == 'user' and loop.index0 % 2 == 1 %}"
        "{{ raise_exception('Conversation roles must alternate user/assistant') }}{% endif %}"
        "{{ m['content'] }}{% endfor %}"
    )
    try:
        status, resp = await post(
            stack,
            "/v1/chat/completions",
            {
                "model": "model",
                "max_tokens": 2,
                "messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}],
            },
        )
        assert status == 400 and "must alternate" in resp["error"]["message"]
    finally:
        tok.chat_template = saved


async def test_an_abort_that_overtakes_its_request_still_stops_it(stack: Stack) -> None:
    import msgspec

    from dlora.common import subjects
    from dlora.common.messages import AbortRequest, GenerateRequest, SamplingParams

    worker = stack.workers[0]
    await stack.nc.publish(subjects.ABORT, msgspec.json.encode(AbortRequest(request_id="overtaken")))
    await bus.flush(stack.nc)
    for _ in range(100):
        if worker.aborted.lately("overtaken", None, time.monotonic()):
            break
        await asyncio.sleep(0.01)
    req = GenerateRequest(
        request_id="overtaken",
        reply_to="test.overtaken",
        prompt="kalo",
        params=SamplingParams(max_tokens=300, ignore_eos=True),
    )
    await stack.nc.publish(subjects.worker_requests(worker.s.worker_id), msgspec.json.encode(req))
    await bus.flush(stack.nc)
    await asyncio.sleep(0.3)
    assert "overtaken" not in worker.engine.seqs and "overtaken" not in worker.streams


async def test_logit_bias_min_tokens_and_stop_reason(stack: Stack) -> None:
    """OpenAI's logit_bias and vLLM's min_tokens and stop_reason, equal to offline generation."""
    base = {"model": "lora-2", "prompt": PROMPTS[1], "max_tokens": 8, "temperature": 0}
    status, plain = await post(stack, "/v1/completions", base)
    assert status == 200 and plain["choices"][0]["stop_reason"] is None, plain
    line = {"id": "0", "adapter": "lora-2", "prompt": PROMPTS[1], "max_tokens": 8}
    [unbiased] = offline(stack.tiny, [line])
    bias = {str(unbiased["token_ids"][0]): -100}  # the greedy first token, banned
    status, biased = await post(stack, "/v1/completions", {**base, "logit_bias": bias})
    assert status == 200, biased
    [expected] = offline(stack.tiny, [{**line, "logit_bias": bias}])
    assert biased["choices"][0]["text"] == expected["text"] != plain["choices"][0]["text"] == unbiased["text"]
    # the second greedy token as a stop token: it ends the request at once, or after min_tokens
    second = unbiased["token_ids"][1]
    for extra, stops_at in (({}, 2), ({"min_tokens": 4}, None)):
        body = {**base, "stop_token_ids": [second], **extra}
        [want] = offline(stack.tiny, [{**line, "stop_token_ids": [second], **extra}])
        status, got = await post(stack, "/v1/completions", body)
        assert got["choices"][0]["text"] == want["text"] and got["choices"][0]["stop_reason"] == want["stop_reason"]
        assert got["usage"]["completion_tokens"] == len(want["token_ids"]) and (stops_at is None) == (
            len(want["token_ids"]) > 2
        )
        # streamed: the last event names it too
        events = await stream(stack, "/v1/completions", body)
        assert events[-2]["choices"][0]["stop_reason"] == want["stop_reason"]
    chat = {
        "model": "lora-2",
        "max_tokens": 3,
        "messages": [{"role": "user", "content": "a"}],
        "stop_token_ids": [second],
    }
    events = await stream(stack, "/v1/chat/completions", chat)
    assert all("stop_reason" in e["choices"][0] for e in events[:-1] if e.get("choices"))  # chat streams name it too
    # what ended it, named: the stop string
    stop = plain["choices"][0]["text"][2:4]
    status, stopped = await post(stack, "/v1/completions", {**base, "stop": [stop, "\u00a7"]})
    assert stopped["choices"][0]["stop_reason"] == stop and stopped["choices"][0]["finish_reason"] == "stop"
    # refused by name: a token id past the vocabulary, min_tokens above max_tokens
    status, resp = await post(stack, "/v1/completions", {**base, "logit_bias": {"1000000": 5}})
    assert (status, resp["error"]["param"]) == (400, "logit_bias"), resp
    status, resp = await post(stack, "/v1/completions", {**base, "min_tokens": 9})
    assert (status, resp["error"]["param"]) == (400, "min_tokens"), resp


async def test_tokenize_and_detokenize_as_vllm_answers_them(stack: Stack) -> None:
    """vLLM's /tokenize and /detokenize: the ids a completion's prompt, or a chat's rendered
    conversation, is given, and back."""
    status, got = await post(stack, "/tokenize", {"model": "lora-1", "prompt": PROMPTS[0], "return_token_strs": True})
    ids = stack.gateway.tokenizer.encode(PROMPTS[0])
    assert status == 200 and got["tokens"] == ids and got["count"] == len(ids)
    assert got["token_strs"] == stack.gateway.tokenizer.convert_ids_to_tokens(
        ids
    )  # vLLM's: as the vocabulary spells them
    assert got["max_model_len"] == stack.gateway.served.context
    status, got = await post(stack, "/tokenize", {"prompt": PROMPTS[0], "return_token_strs": None})
    assert status == 200 and got.get("token_strs") is None, got  # null: false, as vLLM (it was a 400)
    messages = [{"role": "user", "content": "kalo"}]
    status, chat = await post(stack, "/tokenize", {"model": "model", "messages": messages})
    job = shaping.shape_request(
        openai.decode_body(json.dumps({"model": "model", "messages": messages}).encode(), openai.ChatBody),
        None,
        stack.gateway.served,
        base_name="model",
        request_id="x",
        gateway_id="g",
        now=0.0,
    )
    assert status == 200 and chat["tokens"] == job.choices[0].request.prompt_token_ids and chat["token_strs"] is None
    tools = [{"type": "function", "function": {"name": "f"}}]  # a chat request's tools are taken too (vLLM's)
    status, with_tools = await post(stack, "/tokenize", {"model": "model", "messages": messages, "tools": tools})
    assert status == 200 and with_tools["tokens"] == chat["tokens"]  # this model has no template to render them
    status, text = await post(stack, "/detokenize", {"model": "model", "tokens": ids})
    assert (status, text) == (200, {"prompt": stack.gateway.tokenizer.decode(ids)})
    # no model: the base model's tokenizer, as vLLM answers lm-eval's remote tokenizer (it sends none)
    assert (await post(stack, "/detokenize", {"tokens": ids}))[1] == text
    status, bare = await post(stack, "/tokenize", {"prompt": PROMPTS[0], "add_special_tokens": False})
    assert bare["tokens"] == stack.gateway.tokenizer.encode(PROMPTS[0], add_special_tokens=False)
    for path, body, code in (
        ("/tokenize", {"model": "nope", "prompt": "a"}, 404),
        ("/tokenize", {"model": "model"}, 400),
        ("/detokenize", {"model": "model", "tokens": [10**9]}, 400),
        ("/tokenize", {"model": "model", "messages": messages, "add_special_tokens": True}, 400),
    ):
        assert (await post(stack, path, body))[0] == code, (path, body)


async def test_a_request_that_names_no_model_is_served_by_the_base_model(stack: Stack) -> None:
    """vLLM serves a body without ``model`` with its base model (OpenAI requires it; curl examples
    and some clients leave it out); it was a 400."""
    greedy = {"max_tokens": 4, "temperature": 0}
    for path, body in (
        ("/v1/completions", {"prompt": PROMPTS[0], **greedy}),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "kalo"}], **greedy}),
    ):
        status, bare = await post(stack, path, body)
        named = (await post(stack, path, {**body, "model": "model"}))[1]
        assert status == 200 and bare["model"] == "model", bare
        assert bare["choices"] == named["choices"] and bare["usage"] == named["usage"]
    for model in (None, ""):  # vLLM takes an empty name for the base model too
        status, resp = await post(stack, "/v1/completions", {"model": model, "prompt": "a", "max_tokens": 1})
        assert (status, resp["model"]) == (200, "model"), resp


async def test_vllm_s_allowed_token_ids_bad_words_and_truncate_prompt_tokens(stack: Stack) -> None:
    """vLLM's sampling extras (unknown fields, a 400, before): only allowed tokens come out, a
    bad word never does, and a truncated prompt is its last tokens (as if sent alone)."""
    base = {"model": "lora-1", "prompt": PROMPTS[1], "max_tokens": 6, "temperature": 0, "ignore_eos": True}
    tokenizer = stack.gateway.tokenizer
    allowed = tokenizer.encode(" kalo remi suta", add_special_tokens=False)  # whole characters: as shown
    status, resp = await post(stack, "/v1/completions", {**base, "logprobs": 0, "allowed_token_ids": allowed})
    assert status == 200, resp
    tokens = resp["choices"][0]["logprobs"]["tokens"]
    assert len(tokens) == 6 and set(tokens) <= {tokenizer.decode([t]) for t in allowed}
    plain = (await post(stack, "/v1/completions", base))[1]["choices"][0]["text"]
    word = plain.split()[0]
    status, resp = await post(stack, "/v1/completions", {**base, "bad_words": [word]})
    assert status == 200 and word not in resp["choices"][0]["text"].split()
    ids = tokenizer.encode(PROMPTS[1])
    status, cut = await post(stack, "/v1/completions", {**base, "truncate_prompt_tokens": 3, "echo": True})
    alone = (await post(stack, "/v1/completions", {**base, "prompt": ids[-3:], "echo": True}))[1]
    assert status == 200 and cut["usage"] == alone["usage"] and cut["usage"]["prompt_tokens"] == 3
    assert cut["choices"][0]["text"] == alone["choices"][0]["text"]  # the kept tokens echoed
    for bad, param in (
        ({"allowed_token_ids": []}, "allowed_token_ids"),
        ({"allowed_token_ids": [10**6]}, "allowed_token_ids"),
        ({"bad_words": [" "]}, "bad_words"),
        ({"truncate_prompt_tokens": 0}, "truncate_prompt_tokens"),
        ({"truncate_prompt_tokens": 10**6}, "truncate_prompt_tokens"),  # past the context: vLLM refuses it
    ):
        status, resp = await post(stack, "/v1/completions", {**base, **bad})
        assert (status, resp["error"]["param"]) == (400, param), (bad, resp)
