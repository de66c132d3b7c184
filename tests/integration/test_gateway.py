"""End to end through the gateway, against real NATS and Redis, with two workers."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import shutil
import threading
from pathlib import Path

import aiohttp
import torch

from dlora.services.worker.engine import LLMEngine
from dlora.services.worker.engine.offline import generate_lines
from tests.integration.conftest import ADMIN_KEY, Stack, small_engine, sse_events

PROMPTS = ["kalo remi suta", "nevo rida pole", "sumu gano befi tuza"]


async def post(stack: Stack, path: str, body, headers=None) -> tuple[int, dict]:
    async with aiohttp.ClientSession() as http:
        data = body if isinstance(body, (bytes, str, io.BytesIO)) else json.dumps(body)
        async with http.post(
            stack.url + path, data=data, headers={"Content-Type": "application/json", **(headers or {})}
        ) as r:
            return r.status, await r.json()


async def get(stack: Stack, path: str) -> dict:
    async with aiohttp.ClientSession() as http:
        async with http.get(stack.url + path) as r:
            return await r.json()


async def stream(stack: Stack, path: str, body: dict) -> list:
    async with aiohttp.ClientSession() as http:
        async with http.post(stack.url + path, json={**body, "stream": True}) as r:
            assert r.status == 200 and r.headers["Content-Type"] == "text/event-stream; charset=utf-8"
            return [event async for event in sse_events(r)]


def offline(tiny, requests: list[dict]) -> list[dict]:
    engine = LLMEngine(str(tiny.model), small_engine())
    for name, path in tiny.adapters.items():
        engine.register_adapter(name, path)
    return generate_lines(engine, [json.dumps(r) for r in requests])


async def test_completions_for_several_adapters_at_once_equal_offline_generation(round_robin_stack: Stack) -> None:
    """Dispatched round-robin, so that both workers take part: proactive dispatch may rightly keep
    five 10-token requests on one worker of this tiny model, where their queue costs less than an
    adapter's read on the other (a CI run, once requests were priced at their max_tokens)."""
    stack = round_robin_stack
    models = ["model", "lora-0", "lora-1", "lora-2", "lora-3"]
    bodies = [{"model": m, "prompt": PROMPTS[i % 3], "max_tokens": 10, "temperature": 0} for i, m in enumerate(models)]
    results = await asyncio.gather(*(post(stack, "/v1/completions", b) for b in bodies))
    expected = offline(
        stack.tiny,
        [
            {
                "id": str(i),
                "adapter": None if b["model"] == "model" else b["model"],
                "prompt": b["prompt"],
                "max_tokens": 10,
            }
            for i, b in enumerate(bodies)
        ],
    )
    for (status, resp), exp, body in zip(results, expected, bodies):
        assert status == 200, resp
        assert resp["object"] == "text_completion" and resp["model"] == body["model"]
        choice = resp["choices"][0]
        assert choice["text"] == exp["text"] and choice["finish_reason"] == "length"
        assert resp["usage"]["completion_tokens"] == 10
        assert resp["usage"]["total_tokens"] == resp["usage"]["prompt_tokens"] + 10
    # Both workers took part.
    assert all(w.engine.stats.steps > 0 for w in stack.workers)


async def test_streaming_completion_matches_the_plain_one(stack: Stack) -> None:
    body = {"model": "lora-1", "prompt": PROMPTS[0], "max_tokens": 8, "temperature": 0}
    _, plain = await post(stack, "/v1/completions", body)
    events = await stream(stack, "/v1/completions", {**body, "stream_options": {"include_usage": True}})
    assert events[-1] == "[DONE]"
    usage = events[-2]
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] == 8
    chunks = events[:-2]
    assert "".join(c["choices"][0]["text"] for c in chunks) == plain["choices"][0]["text"]
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert all(c["id"] == chunks[0]["id"] and c["object"] == "text_completion" for c in chunks)


async def test_chat_plain_and_streaming(stack: Stack) -> None:
    body = {
        "model": "lora-2",
        "messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "kalo remi?"}],
        "max_tokens": 6,
        "temperature": 0,
    }
    status, resp = await post(stack, "/v1/chat/completions", body)
    assert status == 200 and resp["object"] == "chat.completion"
    message = resp["choices"][0]["message"]
    assert message["role"] == "assistant" and resp["usage"]["completion_tokens"] == 6
    events = await stream(stack, "/v1/chat/completions", body)
    assert events[-1] == "[DONE]" and events[0]["choices"][0]["delta"]["role"] == "assistant"
    assert all(e["object"] == "chat.completion.chunk" for e in events[:-1])
    assert "".join(e["choices"][0]["delta"].get("content", "") for e in events[:-1]) == message["content"]
    # vLLM's echo: a continued assistant message comes back whole, streamed or not
    cont = {"add_generation_prompt": False, "continue_final_message": True, "echo": True}
    body["messages"] = [*body["messages"], {"role": "assistant", "content": "suta"}]
    status, echoed = await post(stack, "/v1/chat/completions", body | cont)
    alone = (await post(stack, "/v1/chat/completions", body | cont | {"echo": False}))[1]
    whole = "suta" + alone["choices"][0]["message"]["content"]
    assert status == 200 and echoed["choices"][0]["message"]["content"] == whole
    events = await stream(stack, "/v1/chat/completions", body | cont)
    assert "".join(e["choices"][0]["delta"].get("content") or "" for e in events[:-1]) == whole


async def test_models_lists_the_base_and_every_adapter(stack: Stack) -> None:
    async with aiohttp.ClientSession() as http, http.get(stack.url + "/v1/models") as r:
        data = (await r.json())["data"]
    assert data[0]["id"] == "model" and data[0]["parent"] is None
    # the stack's two workers, on what `auto` picks on this machine
    expected_device = ("cuda:0", "bfloat16") if torch.cuda.is_available() else ("cpu", "float32")
    assert sorted((w["worker"], w["device"], w["dtype"]) for w in data[0]["served_by"]) == [
        ("w0", *expected_device),
        ("w1", *expected_device),
    ]
    adapters = {d["id"]: d for d in data[1:]}
    assert set(adapters) == set(stack.tiny.adapters)
    assert all(d["parent"] == "model" and d["object"] == "model" for d in adapters.values())
    # vLLM's max_model_len on every card (clients size prompts by it)
    assert {d["max_model_len"] for d in data} == {stack.gateway.served.context}
    # where the files lie is for admin callers only
    assert all(d["root"] == d["id"] for d in adapters.values())
    async with (
        aiohttp.ClientSession() as http,
        http.get(stack.url + "/v1/models", headers={"Authorization": f"Bearer {ADMIN_KEY}"}) as r,
    ):
        admin = {d["id"]: d for d in (await r.json())["data"][1:]}
    assert all(admin[n]["root"] == str(Path(p).resolve()) for n, p in stack.tiny.adapters.items())
    # each card alone, as the OpenAI client's models.retrieve asks for it
    async with aiohttp.ClientSession() as http:
        for card in data:
            async with http.get(f"{stack.url}/v1/models/{card['id']}") as r:
                assert (r.status, await r.json()) == (200, card | {"created": (await r.json())["created"]})
        async with http.get(stack.url + "/v1/models/no-such-model") as r:
            error = (await r.json())["error"]
        assert (r.status, error["type"], error["code"], error["param"]) == (
            404,
            "invalid_request_error",
            "model_not_found",
            "model",
        )
        # completions and tokenize say it in the same (OpenAI's) words: there were three wordings
        for path, body in (
            ("/v1/completions", {"model": "no-such-model", "prompt": "a", "max_tokens": 1}),
            ("/tokenize", {"model": "no-such-model", "prompt": "a"}),
        ):
            async with http.post(stack.url + path, json=body) as r:
                assert (r.status, (await r.json())["error"]) == (404, error), path
    assert error["message"] == "The model 'no-such-model' does not exist or you do not have access to it."


async def test_prompts_are_tokenized_off_the_event_loop(stack: Stack, monkeypatch) -> None:
    """A long prompt's tokenizing (a 1 MB one takes about a second) must not stall other requests'
    streams: shaping runs on the gateway's own thread, for both endpoints."""
    tokenizer, threads = stack.gateway.tokenizer, []
    encode = tokenizer.encode

    def recording(*args, **kwargs):
        threads.append(threading.current_thread() is threading.main_thread())
        return encode(*args, **kwargs)

    monkeypatch.setattr(tokenizer, "encode", recording)
    body = {"model": "lora-0", "prompt": "kalo remi", "max_tokens": 1}
    assert (await post(stack, "/v1/completions", body))[0] == 200
    chat = {"model": "lora-0", "messages": [{"role": "user", "content": "kalo"}], "max_tokens": 1}
    assert (await post(stack, "/v1/chat/completions", chat))[0] == 200
    assert len(threads) == 2 and not any(threads)


async def test_logprobs_token_tables_are_built_with_the_tokenizer_off_the_event_loop(stack: Stack, monkeypatch) -> None:
    """A logprobs entry reads each token's bytes (llguidance's form of the tokenizer) and the
    byte-fallback pieces: about 2 s to build for a 256k vocabulary, which the first logprobs
    request spent on the event loop, every stream held meanwhile. They are built with the
    tokenizer, on the thread ``serve`` constructs the gateway on."""
    from dlora.model import token_bytes
    from dlora.services.gateway.main import Gateway

    built, build = [], token_bytes.llg_tokenizer

    def recording(*args, **kwargs):
        built.append(threading.current_thread() is threading.main_thread())
        return build(*args, **kwargs)

    monkeypatch.setattr(token_bytes, "llg_tokenizer", recording)
    gateway = await asyncio.to_thread(Gateway, stack.gateway.s, stack.nc, stack.store)  # as serve() does
    try:
        assert built == [False] and {"_tokenizer", "_byte_pieces"} <= vars(gateway.token_text).keys()
        monkeypatch.setattr(stack.gateway, "token_text", gateway.token_text)
        body = {"model": "lora-0", "prompt": "kalo remi", "max_tokens": 3, "logprobs": 2, "echo": True}
        status, resp = await post(stack, "/v1/completions", body)
        assert status == 200 and len(resp["choices"][0]["logprobs"]["tokens"]) > 3
        assert built == [False]  # nothing more built at the request
    finally:
        gateway.close()


async def test_served_model_name_names_the_base_model(stack: Stack) -> None:
    import msgspec

    from dlora.services.gateway.main import Gateway

    settings = msgspec.structs.replace(stack.gateway.s, served_model_name="my-llama")
    assert Gateway(settings, stack.nc, stack.store).base_name == "my-llama"
    stack.gateway.base_name = "my-llama"  # the running gateway, as that setting makes it
    try:
        status, resp = await post(stack, "/v1/completions", {"model": "my-llama", "prompt": "kalo", "max_tokens": 2})
        assert status == 200 and resp["model"] == "my-llama"
        status, _ = await post(stack, "/v1/completions", {"model": "model", "prompt": "kalo", "max_tokens": 2})
        assert status == 404
        assert (await get(stack, "/v1/models"))["data"][0]["id"] == "my-llama"
    finally:
        stack.gateway.base_name = "model"


def _narrow_q(path: Path) -> None:
    """Cut one column off every q_proj lora_A: the shapes no longer fit the base."""
    from safetensors.torch import load_file, save_file

    f = path / "adapter_model.safetensors"
    t = load_file(str(f))
    save_file({k: (v[:, :-1] if "q_proj.lora_A" in k else v).contiguous() for k, v in t.items()}, str(f))


def _nan_in_b(path: Path) -> None:
    from safetensors.torch import load_file, save_file

    f = path / "adapter_model.safetensors"
    t = load_file(str(f))
    next(v for k, v in sorted(t.items()) if "lora_B" in k)[0, 0] = float("nan")
    save_file(t, str(f))


def _config_links_out(path: Path) -> None:
    """adapter_config.json a link to a file beside the adapter roots (the tiny model's folder)."""
    target = path.parents[1] / f"{path.name}.json"
    (path / "adapter_config.json").rename(target)
    (path / "adapter_config.json").symlink_to(target)


BROKEN_ADAPTERS = {
    "only safetensors": lambda p: (p / "adapter_model.safetensors").rename(p / "adapter_model.bin"),
    "do not fit the base": _narrow_q,
    "holds NaN": _nan_in_b,
    "resolves to": _config_links_out,  # then: ", outside the configured adapter roots"
}


async def test_bad_input_gets_4xx_and_disturbs_nothing(stack: Stack, tmp_path: Path) -> None:
    long_body = {"model": "lora-0", "prompt": PROMPTS[2], "max_tokens": 40, "temperature": 0}
    in_flight = asyncio.create_task(post(stack, "/v1/completions", long_body))
    auth = {"Authorization": f"Bearer {ADMIN_KEY}"}
    ok = {"model": "model", "prompt": "kalo", "max_tokens": 4}
    cases = [
        ({**ok, "model": "nope"}, 404, "does not exist"),
        ({**ok, "prompt": "kalo " * 400}, 400, "maximum context length"),
        ({**ok, "max_tokens": -1}, 400, "max_tokens"),
        ({**ok, "temperature": 5}, 400, "temperature"),
        ({**ok, "top_p": 1.5}, 400, "top_p"),
        ({**ok, "max_tokens": "ten"}, 400, "max_tokens"),
        ({**ok, "n": 200}, 400, "n must be in [1, 128]"),
        ({**ok, "prompt": [1, 99999]}, 400, "token ids"),
        (b"{not json", 400, "malformed JSON"),
        (b'{"model": "model"}', 400, "prompt"),
        (io.BytesIO(b"x" * (2 << 20)), 413, "exceeds"),
        # Valid and under the limit, but sent in many pieces: read whole, then judged on its content.
        ({**ok, "prompt": list(range(5, 105)) * 1500}, 400, "maximum context length"),
        (b'{"model": "model", "prompt": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", 400, "nested too deeply"),
        # deep in an unknown field, which the model's name is read past (for the metrics' label)
        (b'{"model": "model", "x": ' + b"[" * 200_000 + b"]" * 200_000 + b"}", 400, "unknown field"),
        ({**ok, "prompt": "kalo", "extra": None}, 400, "unknown field"),
    ]
    for body, status, fragment in cases:
        got, resp = await post(stack, "/v1/completions", body)
        assert got == status and fragment in resp["error"]["message"], (
            body if isinstance(body, dict) else body[:20],
            resp,
        )
        assert resp["error"]["type"]
    status, resp = await post(stack, "/v1/chat/completions", {"model": "model", "messages": []})
    assert status == 400 and "messages" in resp["error"]["message"]
    # Under the body limit, but over what the bus carries once the schema is re-encoded as a string
    # (each quote escaped twice): a 413 naming the size, not a 503 that clients would retry for ever.
    described = {"type": "string", "description": '"' * 300_000}  # 0.6 MB in the body, 1.2 MB sent on
    schema = {"type": "json_schema", "json_schema": {"name": "x", "schema": described}}
    chat = {"model": "model", "messages": [{"role": "user", "content": "kalo"}], "response_format": schema}
    status, resp = await post(stack, "/v1/chat/completions", chat)
    assert status == 413 and "bytes as sent to the workers" in resp["error"]["message"], resp
    # A form post (what a web page can send cross-site without a preflight) is refused.
    status, resp = await post(stack, "/v1/completions", json.dumps(ok), {"Content-Type": "text/plain"})
    assert status == 415 and "application/json" in resp["error"]["message"]

    # Admin: no key, then bad adapter directories; the registry never changes.
    before = [e.name for e in await stack.store.list_adapters()]
    status, _ = await post(stack, "/v1/adapters", {"name": "x", "path": str(stack.tiny.adapters["lora-0"])})
    assert status == 401
    outside = tmp_path / "outside"
    shutil.copytree(stack.tiny.adapters["lora-0"], outside)
    bad_dirs = {
        "outside the adapter roots [": outside,
        "not a directory": stack.tiny.adapters_dir / "missing",
        # found by the fuzzer (test_fuzz.py): these were a 500
        "NUL character": "lora\x00",
        "cannot be read: File name too long": stack.tiny.adapters_dir / ("x" * 300),
    }
    for fragment, breaker in BROKEN_ADAPTERS.items():
        d = stack.tiny.adapters_dir / fragment.replace(" ", "-")
        shutil.rmtree(d, ignore_errors=True)
        shutil.copytree(stack.tiny.adapters["lora-0"], d)
        breaker(d)
        bad_dirs[fragment] = d
    for fragment, path in bad_dirs.items():
        status, resp = await post(stack, "/v1/adapters", {"name": "bad", "path": str(path)}, auth)
        assert status == 400 and fragment in resp["error"]["message"], resp
    # a misspelt field is refused, not dropped: "ownr" made a private adapter public
    body = {"name": "bad", "path": str(stack.tiny.adapters["lora-0"]), "ownr": "acme"}
    status, resp = await post(stack, "/v1/adapters", body, auth)
    assert (status, resp["error"]["param"]) == (400, "ownr"), resp
    assert [e.name for e in await stack.store.list_adapters()] == before

    status, resp = await in_flight
    assert status == 200 and resp["usage"]["completion_tokens"] == 40


async def test_one_request_cannot_take_down_a_worker(round_robin_stack: Stack) -> None:
    """A temperature inside the API's range that overflows a naive sampler: served greedily, on
    every worker, and everything after it still is. Dispatched round-robin so that every worker
    takes some (by load, eight 4-token requests of one adapter may all stay where it is held: a CI
    run)."""
    stack = round_robin_stack
    body = {"model": "lora-0", "prompt": "kalo remi", "max_tokens": 4}
    greedy = await post(stack, "/v1/completions", {**body, "temperature": 0})
    tiny = await asyncio.gather(
        *(
            post(stack, "/v1/completions", {**body, "temperature": t, "top_p": p})
            for t in (1e-39, 1e-39, 5e-324, 1e-6)
            for p in (1.0, 0.0)
        )
    )
    assert all(
        status == 200 and resp["choices"][0]["text"] == greedy[1]["choices"][0]["text"] for status, resp in tiny
    ), tiny
    assert all(w.engine.stats.steps > 0 for w in stack.workers)
    assert (await post(stack, "/v1/completions", body))[0] == 200


async def test_ready_with_live_workers(stack: Stack) -> None:
    async with aiohttp.ClientSession() as http:
        async with http.get(stack.url + "/healthz") as r:
            body = await r.json()
    assert r.status == 200 and body["status"] == "ok" and body["workers"] == 2 and body["nats"] is True


async def test_client_disconnect_aborts_the_request(stack: Stack) -> None:
    body = {
        "model": "lora-2",
        "prompt": PROMPTS[0],
        "max_tokens": 400,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
    }
    async with aiohttp.ClientSession() as http:
        r = await http.post(stack.url + "/v1/completions", json=body)
        await r.content.readline()  # the first event: the request is running
        r.close()
    for _ in range(100):
        if not any(w.engine.has_unfinished() for w in stack.workers):
            break
        await asyncio.sleep(0.05)
    assert not any(w.engine.has_unfinished() for w in stack.workers)
    assert sum(w.engine.stats.steps for w in stack.workers) < 400  # stopped long before max_tokens


async def test_every_disconnect_aborts_streamed_or_not(stack: Stack) -> None:
    """Clients that go away mid-request, streamed and not, many times over: each request is aborted
    on its worker (a swallowed cancellation used to let some non-streamed ones run to the end)."""
    aborted = stack.gateway.metrics.requests
    for attempt in range(8):
        streamed = attempt % 2 == 0
        body = {
            "model": "lora-1",
            "prompt": PROMPTS[attempt % 3],
            "max_tokens": 300,
            "temperature": 0,
            "ignore_eos": True,
            "stream": streamed,
        }
        steps = sum(w.engine.stats.steps for w in stack.workers)

        async def client(http: aiohttp.ClientSession) -> None:
            async with http.post(stack.url + "/v1/completions", json=body) as r:
                await r.read()

        async with aiohttp.ClientSession() as http:
            task = asyncio.create_task(client(http))
            while not any(w.engine.has_unfinished() for w in stack.workers):
                await asyncio.sleep(0.005)
            await asyncio.sleep(0.01 * attempt)  # vary the moment against the chunk stream
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        for _ in range(200):
            if not any(w.engine.has_unfinished() for w in stack.workers):
                break
            await asyncio.sleep(0.01)
        assert not any(w.engine.has_unfinished() for w in stack.workers), (attempt, streamed)
        assert sum(w.engine.stats.steps for w in stack.workers) - steps < 300, (attempt, streamed)
    assert aborted.labels("lora-1", "aborted")._value.get() >= 8


async def test_workers_checkpoint_their_policy(stack: Stack) -> None:
    await post(stack, "/v1/completions", {"model": "lora-0", "prompt": "kalo", "max_tokens": 3})
    await asyncio.sleep(0.3)
    state = await stack.store.load_policy("w0")
    assert state is not None and "credits" in state and "r" in state
