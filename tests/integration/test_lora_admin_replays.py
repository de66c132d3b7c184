"""Public vLLM reports about loading and unloading LoRA adapters at runtime, replayed through the
gateway against the real stack: each bad adapter is a 400 naming why, the adapter loaded is listed
and served, the one unloaded leaves every worker, and a request in flight meanwhile is not lost."""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest
from redis.asyncio import Redis
from safetensors.torch import load_file, save_file

from dlora.model.adapters import AdapterLimits
from dlora.model.make_tiny import TinyOutput
from dlora.services.servers import Server
from tests.integration.conftest import ADMIN_KEY, Stack, run_stack
from tests.integration.test_gateway import PROMPTS, get, post

AUTH = {"Authorization": f"Bearer {ADMIN_KEY}"}


async def call(stack: Stack, path: str, payload: dict) -> tuple[int, str]:
    async with aiohttp.ClientSession() as http, http.post(stack.url + path, json=payload, headers=AUTH) as r:
        return r.status, await r.text()


@contextlib.contextmanager
def copies(tiny: TinyOutput, **sources: str) -> Iterator[dict[str, Path]]:
    """Copies of the tiny adapters (name -> source), inside the adapter roots, removed after."""
    dirs = {name: tiny.adapters_dir / f"replay-{name}" for name in sources}
    for name, source in sources.items():
        shutil.rmtree(dirs[name], ignore_errors=True)
        shutil.copytree(tiny.adapters[source], dirs[name])
    try:
        yield dirs
    finally:
        for path in dirs.values():
            shutil.rmtree(path, ignore_errors=True)


def _held_while_good_runs(stack: Stack, monkeypatch: pytest.MonkeyPatch, release: threading.Event) -> None:
    """Each worker's steps wait for ``release`` while it holds a request of ``good``: the unload
    meets that request running, however fast it would have ended (the steps run in a thread; the
    loop goes on)."""
    for w in stack.workers:

        def gated(w=w, step=w.engine.step):  # type: ignore[no-untyped-def]
            if any(s.adapter and s.adapter.startswith("good@") for s in list(w.engine.seqs.values())):
                release.wait(60)
            return step()

        monkeypatch.setattr(w.engine, "step", gated)


async def test_runtime_loads_and_unloads_as_the_reports_expect(
    nats_server: Server, redis: Redis, tiny_llama: TinyOutput, monkeypatch: pytest.MonkeyPatch
) -> None:
    """vllm-project/vllm #18372 (a path that does not exist answered "Success"), #11702 / PR #11727
    (an adapter that does not fit the base accepted, then the engine crashing at its first
    request), gpustack/gpustack #5438 and vllm-project/vllm #2847 ("LoRA rank 64 is greater than
    max_lora_rank 16" raised in the engine), #11761 (an adapter loaded but missing from
    /v1/models), #54839 (unload only forgot the name: the adapter stayed in a worker's slot) and
    ai-dynamo/dynamo PR #11520's review (an unload racing a request of the adapter): an in-place
    reload with bad files keeps the version served, and a request running on an adapter unloaded
    meanwhile ends whole on it before the workers drop it."""
    ranks = {
        name: json.loads((path / "adapter_config.json").read_text())["r"] for name, path in tiny_llama.adapters.items()
    }
    big = next(name for name, r in ranks.items() if r > 16)
    small = next(name for name, r in ranks.items() if r <= 16)
    limits = AdapterLimits(max_lora_rank=16)
    with copies(tiny_llama, good=small, misfit=small, big=big) as dirs:
        weights = dirs["misfit"] / "adapter_model.safetensors"
        tensors = load_file(weights)
        save_file({k: v[:, :-1].contiguous() if ".lora_A." in k else v for k, v in tensors.items()}, weights)
        async with run_stack(nats_server, redis, tiny_llama, adapter_limits=limits) as stack:
            long = {"model": "lora-0", "prompt": PROMPTS[0], "max_tokens": 24, "temperature": 0, "ignore_eos": True}
            in_flight = asyncio.create_task(post(stack, "/v1/completions", long))

            status, text = await call(stack, "/v1/load_lora_adapter", {"lora_name": "gone", "lora_path": "/nowhere"})
            assert status == 400 and json.loads(text)["error"]["param"] == "lora_path", text
            status, text = await call(
                stack, "/v1/load_lora_adapter", {"lora_name": "misfit", "lora_path": str(dirs["misfit"])}
            )
            assert status == 400 and "do not fit the base" in text, text
            status, text = await call(
                stack, "/v1/load_lora_adapter", {"lora_name": "big", "lora_path": str(dirs["big"])}
            )
            assert status == 400 and f"rank {ranks[big]} is above max_lora_rank=16" in text, text
            for refused in ("gone", "misfit", "big"):
                status, err = await post(stack, "/v1/completions", {**long, "model": refused, "max_tokens": 1})
                assert status == 404, (refused, err)

            load = {"lora_name": "good", "lora_path": str(dirs["good"])}
            assert await call(stack, "/v1/load_lora_adapter", load) == (
                200,
                "Success: LoRA adapter 'good' added successfully.",
            )
            listed = {m["id"]: m for m in (await get(stack, "/v1/models"))["data"]}
            assert listed["good"]["parent"] == stack.gateway.base_name
            short = {"prompt": PROMPTS[1], "max_tokens": 5, "temperature": 0}
            status, served = await post(stack, "/v1/completions", {**short, "model": "good"})
            _, same = await post(stack, "/v1/completions", {**short, "model": small})
            assert status == 200 and served["choices"][0]["text"] == same["choices"][0]["text"]
            inplace = {"lora_name": "good", "lora_path": str(dirs["misfit"]), "load_inplace": True}
            status, text = await call(stack, "/v1/load_lora_adapter", inplace)
            assert status == 400 and "do not fit the base" in text, text
            assert (await post(stack, "/v1/completions", {**short, "model": "good"}))[1]["choices"] == served["choices"]

            using = {"model": "good", "prompt": PROMPTS[2], "max_tokens": 24, "temperature": 0, "ignore_eos": True}
            release = threading.Event()
            _held_while_good_runs(stack, monkeypatch, release)
            try:
                in_use = asyncio.create_task(post(stack, "/v1/completions", using))
                for _ in range(1200):  # (held from its first step: it cannot end unseen under load)
                    if any(
                        s.adapter.startswith("good@")
                        for w in stack.workers
                        for s in w.engine.seqs.values()
                        if s.adapter
                    ):
                        break
                    await asyncio.sleep(0.05)
                else:
                    raise AssertionError("the request of 'good' never reached a worker")
                unload = {"lora_name": "good"}
                assert await call(stack, "/v1/unload_lora_adapter", unload) == (
                    200,
                    "Success: LoRA adapter 'good' removed successfully.",
                )
                assert any(
                    s.adapter and s.adapter.startswith("good@") for w in stack.workers for s in w.engine.seqs.values()
                )
            finally:
                release.set()
            for _ in range(200):  # each worker retires it once it hears (its requests have ended)
                if not any(key.startswith("good@") for w in stack.workers for key in w.engine.adapters):
                    break
                await asyncio.sleep(0.05)
            assert not any(key.startswith("good@") for w in stack.workers for key in w.engine.adapters)
            assert "good" not in {m["id"] for m in (await get(stack, "/v1/models"))["data"]}

            answers = [await in_flight, await in_use]
            assert all(not t.done() for t in stack.services)  # no service died
            # each whole, as the same request gives now (lora-0 on its own, good's files as small's)
            again = [await post(stack, "/v1/completions", body) for body in (long, {**using, "model": small})]
    assert [(status, resp["choices"][0]) for status, resp in answers] == [
        (200, resp["choices"][0]) for _, resp in again
    ]
    assert all(resp["usage"]["completion_tokens"] == 24 for _, resp in answers)
