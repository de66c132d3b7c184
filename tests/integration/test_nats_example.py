"""The runnable NATS application example (examples/nats_client.py), against real NATS: it is what
README tells an application to do, so it must never wait for ever."""

from __future__ import annotations

import asyncio
import importlib.util
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import msgspec
import nats
import pytest
from nats.aio.msg import Msg

from dlora.common import bus, subjects
from dlora.common.messages import AbortRequest, ErrorCode, FinishReason, TokenChunk
from dlora.services.servers import Server
from tests.integration.conftest import Stack
from tests.integration.test_gateway import PROMPTS, post


def _example() -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        "nats_client", Path(__file__).parents[2] / "examples" / "nats_client.py"
    )
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    return example


async def test_nats_native_example(stack: Stack) -> None:
    text = await _example().generate(stack.nc._current_server.uri.geturl(), "lora-0", PROMPTS[0], max_tokens=6)
    _, resp = await post(
        stack, "/v1/completions", {"model": "lora-0", "prompt": PROMPTS[0], "max_tokens": 6, "temperature": 0}
    )
    assert text == resp["choices"][0]["text"]


def test_the_nats_example_run_without_its_arguments_says_what_to_give() -> None:
    """A new user's first try, with no arguments, ended in an IndexError's traceback."""
    example = Path(__file__).parents[2] / "examples" / "nats_client.py"
    done = subprocess.run([sys.executable, str(example)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert "usage: " in done.stderr and "NATS_URL ADAPTER PROMPT" in done.stderr


async def test_the_nats_example_says_at_once_that_no_dispatcher_runs(nats_server: Server) -> None:
    """A helper's finding: with the dispatcher stopped or restarting, or just after NATS restarted,
    the example's request was published to nobody and it waited for chunks for ever (``timeout 20``
    ended it). Sent as a NATS request, the server answers "no responders" at once."""
    # At once: "no dispatcher is running" is NATS's "no responders"; the example's dispatch
    # timeout says "no dispatcher took the request within", and a wait for chunks that never
    # come is the TimeoutError of the 60 s here (no time bound, which a loaded machine breaks).
    with pytest.raises(RuntimeError, match="no dispatcher is running"):
        async with asyncio.timeout(60):
            await _example().generate(nats_server.url, "lora-0", "kalo")


async def test_the_nats_example_says_a_refusal_and_gives_up_on_silence(
    nats_server: Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A dispatcher's at-once refusal (an error chunk as its answer) is raised with its text; a
    request taken (an empty answer) whose chunks never come is aborted after the chunk timeout,
    as the gateway does, not waited for for ever."""
    example = _example()
    monkeypatch.setattr(example, "CHUNK_TIMEOUT_S", 0.3, raising=False)  # (an example without one hangs)
    nc = await nats.connect(nats_server.url)
    asked: list[Msg] = []
    refusal = TokenChunk(
        request_id="r", seq=0, error="no", error_code=ErrorCode.BAD_REQUEST, finish_reason=FinishReason.ERROR
    )

    async def dispatcher(msg: Msg) -> None:  # refuses the first request, takes the next and says nothing
        asked.append(msg)
        if len(asked) == 1:  # as a dispatcher refuses a request that does not decode: on its reply_to too
            await nc.publish(msgspec.json.decode(msg.data)["reply_to"], msgspec.json.encode(refusal))
        await msg.respond(msgspec.json.encode(refusal) if len(asked) == 1 else b"")

    # the example's connection with a shorter drain bound, its errors seen: the refusal's chunk left
    # unread on reply_to held its drain() for nats-py's 30 s, then a DrainTimeoutError (20 s here, not
    # 2: a drain's round trips on a loaded machine are no failure; a passing run never waits for it)
    connect, errors = nats.connect, []

    async def connect_watched(*args: Any, **kwargs: Any) -> nats.NATS:
        async def seen(e: Exception) -> None:
            errors.append(e)
            await kwargs["error_cb"](e)

        return await connect(*args, **kwargs | {"drain_timeout": 20, "error_cb": seen})

    monkeypatch.setattr(example.nats, "connect", connect_watched)

    try:
        await nc.subscribe(subjects.requests_of("app"), queue=subjects.DISPATCHERS, cb=dispatcher)
        aborts = await nc.subscribe(subjects.aborts_of("app"))
        await bus.flush(nc)
        with pytest.raises(RuntimeError, match="^no$"):
            await asyncio.wait_for(example.generate(nats_server.url, "lora-0", "kalo"), 60)
        with pytest.raises(RuntimeError, match="no chunk came for 0.3 s"):
            await asyncio.wait_for(example.generate(nats_server.url, "lora-0", "kalo"), 60)
        abort = msgspec.json.decode((await aborts.next_msg(timeout=60)).data, type=AbortRequest)
        sent = msgspec.json.decode(asked[1].data)
        assert abort.request_id == sent["request_id"]
        # a dispatcher answers only inboxes its sender may read (with users, only its own)
        assert all(m.reply.startswith("_INBOX.app.") for m in asked)
        assert not [e for e in errors if isinstance(e, nats.errors.DrainTimeoutError)]
    finally:
        await nc.close()
