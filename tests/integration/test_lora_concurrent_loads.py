"""vLLM's runtime LoRA endpoints called for one name at once, as an orchestrator's retries and a
fleet's controllers call them, through the gateway against the real stack."""

from __future__ import annotations

import asyncio

from tests.integration.conftest import Stack
from tests.integration.test_gateway import PROMPTS, get, post
from tests.integration.test_lora_admin_replays import call, copies


async def test_concurrent_loads_and_unloads_of_one_name_leave_one_adapter_or_none(stack: Stack) -> None:
    """vllm-project/vllm PR #20636 (adding and removing an adapter were not atomic: concurrent
    calls for one name could both pass the check, and the second removal raised KeyError, a 500)
    and PR #15733 (several requests loading one adapter at once): eight loads of one name at once
    are one 200 and seven 400s (vLLM's "already loaded", set load_inplace), the adapter listed once
    and served; eight unloads at once are one 200 and seven 404s, and it is gone; eight in-place
    loads at once all succeed, one registration left. No 500, no service down."""
    with copies(stack.tiny, same="lora-1") as dirs:
        load = {"lora_name": "same", "lora_path": str(dirs["same"])}
        answers = await asyncio.gather(*(call(stack, "/v1/load_lora_adapter", load) for _ in range(8)))
        assert sorted(s for s, _ in answers) == [200] + [400] * 7, answers
        listed = [m["id"] for m in (await get(stack, "/v1/models"))["data"]]
        assert listed.count("same") == 1
        body = {"prompt": PROMPTS[0], "max_tokens": 4, "temperature": 0}
        status, served = await post(stack, "/v1/completions", {**body, "model": "same"})
        _, want = await post(stack, "/v1/completions", {**body, "model": "lora-1"})
        assert status == 200 and served["choices"][0]["text"] == want["choices"][0]["text"]
        unload = {"lora_name": "same"}
        answers = await asyncio.gather(*(call(stack, "/v1/unload_lora_adapter", unload) for _ in range(8)))
        assert sorted(s for s, _ in answers) == [200] + [404] * 7, answers
        assert "same" not in {m["id"] for m in (await get(stack, "/v1/models"))["data"]}
        inplace = {**load, "load_inplace": True}
        answers = await asyncio.gather(*(call(stack, "/v1/load_lora_adapter", inplace) for _ in range(8)))
        assert [s for s, _ in answers] == [200] * 8, answers
        assert [m["id"] for m in (await get(stack, "/v1/models"))["data"]].count("same") == 1
        assert (await post(stack, "/v1/completions", {**body, "model": "same"}))[1]["choices"] == served["choices"]
    assert all(not t.done() for t in stack.services)
