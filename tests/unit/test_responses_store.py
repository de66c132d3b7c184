"""Stored responses' pure parts (services/gateway/responses_store.py, responses_routes.py): the
conversation a previous_response_id and item_references make, input_items' pages, the size bound.
The rest runs against the real stack in tests/integration/test_responses_store.py."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any

import msgspec
import pytest

from dlora.services.gateway.openai import APIError
from dlora.services.gateway.responses_api import ResponsesBody, to_chat
from dlora.services.gateway.responses_routes import page
from dlora.services.gateway.responses_store import Keeping, ResponsesStore, answered, conversation
from dlora.services.gateway.settings import GatewaySettings

PRIOR: list[dict[str, Any]] = [
    {"id": "msg_a_in0", "type": "message", "role": "user", "content": "kalo"},
    {"id": "msg_a_0", "type": "message", "role": "assistant", "status": "completed", "content": []},
]


def test_a_previous_conversation_comes_first_and_a_reference_is_its_item() -> None:
    assert conversation([], "kalo") == "kalo"  # (no previous: the input as sent, its prompt unchanged)
    assert conversation(PRIOR, "remi") == [*PRIOR, {"type": "message", "role": "user", "content": "remi"}]
    other = {"id": "msg_b_0", "type": "message", "role": "assistant", "content": "x"}  # (another response's)
    assert conversation([], [{"type": "item_reference", "id": "msg_b_0"}], {"msg_b_0": other}) == [other]
    for prior, ref, status, param in (
        (PRIOR, {"type": "item_reference", "id": "msg_nobody"}, 404, "input[0].id"),
        (PRIOR, {"type": "item_reference"}, 400, "input[0].id"),
        ([], {"type": "item_reference", "id": "msg_a_0"}, 404, "input[0].id"),  # (none stored by that id)
    ):
        with pytest.raises(APIError) as refused:
            conversation(prior, [ref])
        assert (refused.value.status, refused.value.param) == (status, param)


def test_an_item_twice_in_the_conversation_is_refused_as_openai_refuses_it() -> None:
    """OpenAI's 400 "Duplicate item found with id ..." (vercel/ai#15492: the previous response's
    items sent again, or referenced, beside previous_response_id): kept, input_items listed an id
    twice, and paging after it (the openai package's pager: after=last_id) came back to the same
    page for ever."""
    again = {"id": "msg_a_0", "type": "message", "role": "assistant", "content": "x"}
    for prior, given in (
        (PRIOR, [{"type": "item_reference", "id": "msg_a_0"}, {"role": "user", "content": "remi"}]),
        (PRIOR, [again, {"role": "user", "content": "remi"}]),
        ([], [again, {**again, "role": "user"}]),
    ):
        with pytest.raises(APIError) as refused:
            conversation(prior, given)
        assert (refused.value.status, refused.value.param) == (400, "input")
        assert "Duplicate item found with id msg_a_0" in refused.value.message


def test_each_of_a_previous_responses_function_calls_needs_its_output_after_it() -> None:
    """OpenAI's 400 (openai-agents-python#673): parallel calls, one answered, the other named."""
    calls = [{"type": "function_call", "call_id": c, "name": "f", "arguments": "{}"} for c in ("call_a", "call_b")]
    out = {"type": "function_call_output", "call_id": "call_a", "output": "x"}
    answered([PRIOR[1]], [])  # (an answer of text: nothing owed)
    answered(calls, [out, {**out, "call_id": "call_b"}, {"role": "user", "content": "remi"}])
    with pytest.raises(APIError) as refused:
        answered(calls, [out, {"role": "user", "content": "remi"}])
    assert (refused.value.status, refused.value.param) == (400, "input")
    assert refused.value.message == "No tool output found for function call call_b."


def _served(prior: list[dict[str, Any]], given: list[Any], stored: dict[str, Any] | None = None) -> list[str]:
    """The chat messages' roles a request is served as, its conversation made as ``prepared`` makes it."""
    body = msgspec.json.decode(b'{"model": "m", "input": "x"}', type=ResponsesBody)
    body = msgspec.structs.replace(body, input=conversation(prior, given, stored))
    return [m.role for m in to_chat(body).messages]


def test_an_output_answers_a_call_of_its_chain_of_a_reference_or_beside_it() -> None:
    """The 400 for an output answering no call (``responses_api._messages``: OpenAI's "No tool call
    found ...") counts every call before it in the conversation served: the previous response's
    (its output's parallel calls, answered in either order, beside its conversation's, the chain's
    earlier turns) and an item_reference's item; a reference after the output made no call before it."""

    def call(c: str) -> dict[str, Any]:
        return {"id": f"fc_{c}", "type": "function_call", "call_id": c, "name": "f", "arguments": "{}"}

    def out(c: str) -> dict[str, Any]:
        return {"type": "function_call_output", "call_id": c, "output": "x"}

    chain = [*PRIOR, call("call_0"), {**out("call_0"), "id": "fco_0"}, call("call_a"), call("call_b")]
    assert _served(chain, [out("call_b"), out("call_a")])[-2:] == ["tool", "tool"]
    ref = {"type": "item_reference", "id": "fc_call_c"}
    assert _served([], [ref, out("call_c")], {"fc_call_c": call("call_c")}) == ["assistant", "tool"]
    with pytest.raises(APIError) as refused:
        _served([], [out("call_c"), ref], {"fc_call_c": call("call_c")})
    assert (refused.value.status, refused.value.param) == (400, "input")
    assert refused.value.message == "No tool call found for function call output with call_id call_c."


ITEMS = [{"id": f"i{k}", "type": "message", "role": "user", "content": str(k)} for k in range(5)]


def _ids(listing: dict[str, Any]) -> list[str]:
    return [i["id"] for i in listing["data"]]


def test_input_items_page_as_openai_lists_them() -> None:
    newest = page(ITEMS, "desc", 2, None, None)
    assert _ids(newest) == ["i4", "i3"] and newest["has_more"] is True
    assert (newest["object"], newest["first_id"], newest["last_id"]) == ("list", "i4", "i3")
    assert _ids(page(ITEMS, "desc", 2, "i3", None)) == ["i2", "i1"]
    last = page(ITEMS, "asc", 20, "i2", None)
    assert _ids(last) == ["i3", "i4"] and last["has_more"] is False
    assert _ids(page(ITEMS, "asc", 2, None, "i4")) == ["i2", "i3"]  # the page just before it
    assert _ids(page(ITEMS, "asc", 5, "i0", "i3")) == ["i1", "i2"]
    assert page(ITEMS, "asc", 2, "i4", None) == {
        "object": "list",
        "data": [],
        "first_id": None,
        "last_id": None,
        "has_more": False,
    }
    # a string content as its one text part, the answer's an output_text
    [listed] = page([{"id": "m", "role": "assistant", "content": "x"}], "asc", 1, None, None)["data"]
    assert listed == {
        "type": "message",
        "status": "completed",
        "id": "m",
        "role": "assistant",
        "content": [{"type": "output_text", "text": "x", "annotations": []}],
    }
    with pytest.raises(APIError) as refused:
        page(ITEMS, "asc", 2, "nobody", None)
    assert refused.value.param == "after"


@contextlib.asynccontextmanager
async def _unbound() -> AsyncIterator[None]:
    yield


def test_a_response_over_the_bound_is_answered_not_kept_and_new_items_get_ids() -> None:
    store = ResponsesStore(None, _unbound, 60.0, 400)  # type: ignore[arg-type]  # (no Redis: keep() is pure)
    response = {"id": "resp_b", "output": [{"type": "message", "content": [{"text": "remi"}]}]}
    given = [{"type": "message", "role": "user", "content": "kalo"}, {"type": "function_call_output", "output": "x"}]
    keeping = Keeping(store, "acme", [*PRIOR, *given])
    assert keeping.keep(response) is True
    assert [i["id"] for i in keeping.items] == ["msg_a_in0", "msg_a_0", "msg_b_in2", "fco_b_in3"]
    huge = {"id": "resp_c", "output": [{"type": "message", "content": [{"text": "x" * 400}]}]}
    assert Keeping(store, "acme", list(given)).keep(huge) is False


def test_a_background_response_over_the_bound_counts_too_large_once() -> None:
    """Its final object over the bound, then its failed object, then that shrunk (``final``'s
    tries, each over it here): each try counted another ``too_large`` write for one response."""
    from prometheus_client import CollectorRegistry

    from dlora.services.gateway.responses_metrics import StoreCounts

    counts = StoreCounts(registry := CollectorRegistry())
    keeping = Keeping(ResponsesStore(None, _unbound, 60.0, 100, counts), "", [])  # type: ignore[arg-type]
    for status in ("completed", "failed", "failed"):
        assert keeping.keep({"id": "resp_e", "status": status, "output": [], "instructions": "x" * 100}) is False
    assert registry.get_sample_value("dlora_responses_store_total", {"op": "write", "outcome": "too_large"}) == 1


async def test_a_background_response_whose_end_is_over_the_bound_leaves_its_queued_object_unwritten() -> None:
    """Its queued object kept (and written), its final one over the bound: ``finishing`` wrote the
    queued object again over the running one, so the response read ``queued`` for ever instead of
    ``failed`` (``background``)."""
    written: list[bytes] = []

    class Redis:
        async def put_response(self, _id: str, _tenant: str, response: bytes, *args: Any, **named: Any) -> bool:
            written.append(response)
            return True

    store = ResponsesStore(Redis(), _unbound, 60.0, 400)  # type: ignore[arg-type]
    keeping = Keeping(store, "acme", [{"type": "message", "role": "user", "content": "kalo"}])
    assert keeping.keep({"id": "resp_q", "status": "queued", "output": []}) is True
    await keeping.finishing()
    huge = {"id": "resp_q", "status": "completed", "output": [{"type": "message", "content": [{"text": "x" * 400}]}]}
    assert keeping.keep(huge) is False
    keeping.written = None
    await keeping.finishing()
    assert len(written) == 1 and keeping.written is None


async def test_a_chains_earlier_items_are_indexed_with_each_later_turn() -> None:
    """A turn after previous_response_id indexes the earlier turns' items too (as one more holder
    of each): indexed only by the turn that first stored them, they were 404s to an item_reference
    once that turn expired or was deleted, though this turn still held them."""

    import msgspec

    from dlora.services.gateway.responses_api import ResponsesBody

    class Redis:
        ids: list[str] = []

        async def response_fields(self, response_id: str, tenant: str, *names: str) -> list[bytes]:
            stored = {"input": msgspec.json.encode(PRIOR[:1]), "response": msgspec.json.encode({"output": PRIOR[1:]})}
            return [tenant.encode(), *(stored[n] for n in names)]

        async def put_response(self, *args: Any, **named: Any) -> None:
            self.ids = list(args[-1])

    state = Redis()
    asked = ResponsesBody(input="x", previous_response_id="resp_a")
    _, keeping = await ResponsesStore(state, _unbound, 60.0, 1 << 20).prepared(asked, "acme")  # type: ignore[arg-type]
    assert keeping is not None
    assert keeping.keep({"id": "resp_b", "output": [{"id": "msg_b_0", "type": "message", "content": []}]})
    assert await keeping.finishing() is True
    assert state.ids == ["msg_a_in0", "msg_a_0", "msg_b_in2", "msg_b_0"]


def test_the_store_settings_are_checked() -> None:
    base = {"model": "m", "nats_url": "nats://x", "redis_url": "redis://x"}
    # (1e17 s: Redis refused its PEXPIRE after the HSET beside it was done: a key with no TTL)
    for field, value in (
        ("responses_ttl_s", -1.0),
        ("responses_ttl_s", float("nan")),
        ("responses_ttl_s", 1e17),
        ("responses_max_bytes", 0),
    ):
        assert field in {bad[0] for bad in GatewaySettings(**base, **{field: value}).check()}, (field, value)
    assert not GatewaySettings(**base, responses_ttl_s=0.0).check()  # 0: nothing stored


def test_a_streams_last_object_is_kept_once_a_failed_one_with_its_status() -> None:
    from dlora.services.gateway.completion_shape import Shape
    from dlora.services.gateway.responses_api import ResponsesBody
    from dlora.services.gateway.responses_shape import ResponsesShape

    for end, status in ((None, "completed"), (APIError(400, "the output cannot go on", "response_format"), "failed")):
        kept: list[dict[str, Any]] = []

        def keep(response: dict[str, Any]) -> bool:
            kept.append(response)
            return False  # (over the bound, say)

        shape = ResponsesShape.of(Shape(True, "chatcmpl-abc", "m", 7), ResponsesBody(input="kalo"), keep=keep)
        first = shape.events(shape.chunk("", None, first=True))
        shape.events(shape.chunk("kalo", "stop" if end is None else None))
        last = shape.events(shape.usage_chunk(5, 1, 0) if end is None else end.body())
        assert b'"store":true' in first[0] and b'"previous_response_id":null' in first[0]
        assert [k["status"] for k in kept] == [status] and kept[0]["output"][0]["content"][0]["text"] == "kalo"
        assert b'"store":false' in last[-1]  # (keep said no: the last event tells it)


def test_a_background_streams_object_too_large_to_keep_ends_it_failed_as_its_record() -> None:
    """A background response is its record alone: one whose final object is not kept is stored
    ``failed`` (its error saying why), and its stream's last event is that object's
    response.failed, not the response.completed its record contradicted."""
    from dlora.services.gateway.completion_shape import Shape
    from dlora.services.gateway.responses_api import ResponsesBody
    from dlora.services.gateway.responses_shape import TOO_LARGE, ResponsesShape

    kept: list[dict[str, Any]] = []

    def keep(response: dict[str, Any]) -> bool:
        kept.append(dict(response))
        return response["status"] == "failed"  # (the answer over the bound; the failed one within)

    asked = ResponsesBody(input="kalo", background=True)
    shape = ResponsesShape.of(Shape(True, "chatcmpl-abc", "m", 7), asked, keep=keep)
    shape.events(shape.chunk("", None, first=True))
    shape.events(shape.chunk("kalo", "stop"))
    *_, last = shape.events(shape.usage_chunk(5, 1, 0))
    assert [k["status"] for k in kept] == ["completed", "failed"]
    assert last.startswith(b"event: response.failed\n"), last
    assert kept[-1]["output"] == [] and kept[-1]["error"] == {"code": "server_error", "message": TOO_LARGE}
    assert b'"store":true' in last  # (the failed object is stored)


def test_a_background_streams_failed_object_too_large_to_keep_is_shrunk_and_kept() -> None:
    """Its failed object over the bound too (long instructions, its conversation near the bound):
    it was not kept, so its stream's last event, stored with its record, was dropped, and its
    run's fallback ended the stream saying Redis had failed. Shrunk (the request's echoes
    emptied, its id, status and error kept), it is kept and ends the stream."""
    from openai.types.responses import Response

    from dlora.services.gateway.completion_shape import Shape
    from dlora.services.gateway.responses_api import ResponsesBody
    from dlora.services.gateway.responses_shape import TOO_LARGE, ResponsesShape

    kept: list[dict[str, Any]] = []

    def keep(response: dict[str, Any]) -> bool:
        kept.append(dict(response))
        return len(msgspec.json.encode(response)) < 2000  # (the long instructions alone are 3,000)

    asked = ResponsesBody(input="kalo", background=True, instructions="Be brief. " * 300, metadata={"k": "v"})
    shape = ResponsesShape.of(Shape(True, "chatcmpl-abc", "m", 7), asked, keep=keep)
    shape.events(shape.chunk("", None, first=True))
    shape.events(shape.chunk("kalo", "stop"))
    *_, last = shape.events(shape.usage_chunk(5, 1, 0))
    assert [k["status"] for k in kept] == ["completed", "failed", "failed"]
    assert last.startswith(b"event: response.failed\n") and b'"store":true' in last, last
    event = msgspec.json.decode(last.split(b"data: ", 1)[1])
    ended = Response.model_validate(event["response"])  # (still OpenAI's Response, every field typed)
    assert (ended.id, ended.status, ended.instructions, ended.metadata) == ("resp_abc", "failed", None, {})
    assert ended.error is not None and ended.error.message == TOO_LARGE and ended.output == []


async def test_redis_failing_to_store_loses_the_store_not_the_answer() -> None:
    from redis.exceptions import ConnectionError as RedisConnectionError

    class Down:
        async def put_response(self, *args: Any, **named: Any) -> None:
            raise RedisConnectionError("down")

    from prometheus_client import CollectorRegistry

    from dlora.services.gateway.responses_metrics import StoreCounts

    counts = StoreCounts(registry := CollectorRegistry())
    store = ResponsesStore(Down(), _unbound, 60.0, 1 << 20, counts)  # type: ignore[arg-type]
    keeping = Keeping(store, "", [{"role": "user", "content": "x"}])
    response = {"id": "resp_d", "output": [], "store": True}
    assert keeping.keep(response) is True
    await keeping.finishing()  # (raised nothing: the answer goes out)
    assert response["store"] is False  # (a whole answer says so)
    failed = registry.get_sample_value("dlora_responses_store_total", {"op": "write", "outcome": "failed"})
    assert failed == 1 and registry.get_sample_value("dlora_responses_stored_bytes_total") == 0


async def test_with_the_store_off_nothing_is_kept_and_previous_response_id_refused() -> None:
    from dlora.services.gateway.responses_api import ResponsesBody

    off = ResponsesStore(None, _unbound, 0.0, 1 << 20)  # type: ignore[arg-type]  # (no Redis read is made)
    body, keeping = await off.prepared(ResponsesBody(input="kalo"), "")
    assert body.input == "kalo" and keeping is None
    for asked, param in (
        (ResponsesBody(input="kalo", previous_response_id="resp_a"), "previous_response_id"),
        (ResponsesBody(input=[{"type": "item_reference", "id": "msg_a"}]), "input"),
        (ResponsesBody(input="kalo", previous_response_id=3), "previous_response_id"),
    ):
        with pytest.raises(APIError) as refused:
            await off.prepared(asked, "")
        assert (refused.value.status, refused.value.param) == (400, param)


async def test_background_needs_the_response_stored() -> None:
    """OpenAI's and vLLM's 400 for background with store false (a null store is true, vLLM's
    fix); with the store off (responses_ttl_s 0) it is refused too, naming why: nowhere to read
    the response back from."""
    from dlora.services.gateway.auth import Principal
    from dlora.services.gateway.dialects import Responses

    nobody = Principal(key_id=None, tenant=None, inference=True, admin=False)
    on = ResponsesStore(None, _unbound, 60.0, 1 << 20)  # type: ignore[arg-type]  # (no Redis read is made)
    off = ResponsesStore(None, _unbound, 0.0, 1 << 20)  # type: ignore[arg-type]
    for store, extra, param, words in (
        (on, ', "store": false', "background", "background can only be used when `store` is true"),
        (off, "", "background", "background needs the response stored: responses are not stored here"),
        (off, ', "store": null', "background", "background needs the response stored"),
    ):
        with pytest.raises(APIError) as refused:
            await Responses(store).decode(b'{"input": "kalo", "background": true' + extra.encode() + b"}", nobody)
        assert (refused.value.status, refused.value.param) == (400, param), refused.value.message
        assert refused.value.message.startswith(words), refused.value.message
    body = await Responses(on).decode(b'{"input": "kalo", "background": true, "store": null}', nobody)
    assert body.messages[0].content == "kalo"  # (taken: a null store is true)


async def test_a_stream_whose_store_fails_ends_saying_store_false() -> None:
    """Its last event, framed before the write, said "store": true over a response that was not
    kept (a retrieve then a 404): said again, its number kept, once the write failed."""
    import json

    import aiohttp
    from aiohttp import web
    from aiohttp.test_utils import TestServer
    from redis.exceptions import ConnectionError as RedisConnectionError

    from dlora.services.gateway.completion_shape import Shape
    from dlora.services.gateway.dialects import Responses
    from dlora.services.gateway.responses import ResponseWriter
    from dlora.services.gateway.responses_api import ResponsesBody
    from dlora.services.gateway.shaping import Job

    class Redis:
        def __init__(self, up: bool) -> None:
            self.up = up

        async def put_response(self, *args: Any, **named: Any) -> None:
            if not self.up:
                raise RedisConnectionError("down")

    for up in (True, False):
        dialect = Responses(ResponsesStore(Redis(up), _unbound, 60.0, 1 << 20))  # type: ignore[arg-type]
        dialect.asked, dialect.keeping = await dialect.store.prepared(ResponsesBody(input="kalo", stream=True), "")
        job = dialect.answer(Job(Shape(True, "chatcmpl-abc", "m", 7), None, 1, True, True, []))

        async def handler(request: web.Request) -> web.StreamResponse:
            return await ResponseWriter(request, job, [], None).finish(0)  # type: ignore[arg-type]  # (no tokens)

        app = web.Application()
        app.router.add_post("/", handler)
        async with TestServer(app, host="127.0.0.1") as server, aiohttp.ClientSession() as session:
            async with session.post(server.make_url("/")) as resp:
                body = await resp.read()
        events = [json.loads(line[6:]) for line in body.splitlines() if line.startswith(b"data: ")]
        assert [e["sequence_number"] for e in events] == list(range(len(events)))
        assert events[-1]["type"] == "response.completed" and events[-1]["response"]["store"] is up, events[-1]


async def test_a_refused_reference_is_counted_as_refused() -> None:
    """item_references naming items of 17 responses (more than MAX_REFERENCED): the 400, and each
    item counted under ``reference`` ``refused``: such a request showed in no outcome of it."""
    from prometheus_client import CollectorRegistry

    from dlora.services.gateway.responses_metrics import StoreCounts
    from dlora.services.gateway.responses_store import MAX_REFERENCED

    class Holders:
        async def responses_of_items(self, item_ids: list[str], tenant: str) -> list[str]:
            return [f"resp_{i}" for i in item_ids]  # (each item a response of its own)

    counts = StoreCounts(registry := CollectorRegistry())
    store = ResponsesStore(Holders(), _unbound, 60.0, 1 << 20, counts)  # type: ignore[arg-type]
    refs = [{"type": "item_reference", "id": f"msg_{k}"} for k in range(MAX_REFERENCED + 1)]
    with pytest.raises(APIError) as refused:
        await store.referenced(refs, [], "t")
    assert (refused.value.status, refused.value.param) == (400, "input")
    counted = registry.get_sample_value("dlora_responses_store_total", {"op": "reference", "outcome": "refused"})
    assert counted == MAX_REFERENCED + 1


async def test_a_retrieves_and_a_cancels_read_checks_a_records_shape_without_its_items_built() -> None:
    """A GET answers a stored response's bytes as stored (a streamed one, and a cancel of one
    over, judge it by its status and background alone), yet its read decoded the record whole
    (every item of its output built) to judge it, for a 404 in place of a record no gateway
    writes (a string of bad UTF-8, a number past a double's range): 20-35 times the memory and up
    to 30 times the time of a check of its shape (an 8 MiB record of short items: 1.3 s of the
    event loop, not 43 ms). Its items are checked as JSON, left as bytes: the read allocates a
    small part of the record's size (bytes counted by tracemalloc); a record of another shape is
    still not there."""
    import tracemalloc

    item = {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "x" * 1000}]}
    made = {"status": "completed", "background": True, "output": [item] * 500}
    stored = {"response": msgspec.json.encode(made), "streamed": b"1"}

    class Redis:
        async def response_fields(self, response_id: str, tenant: str, *names: str) -> list[bytes]:
            return [tenant.encode(), *(stored[n] for n in names)]

    store = ResponsesStore(Redis(), _unbound, 60.0, 1 << 30)  # type: ignore[arg-type]
    for names in (("response",), ("response", "streamed")):  # (a plain GET's and a cancel's; a streamed GET's)
        tracemalloc.start()
        try:
            got = await store.fields("resp_a", "t", *names, whole=False)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert (got[0].raw, got[0].status, got[0].background, got[1:]) == (
            stored["response"],
            "completed",
            True,
            [b"1"][: len(names) - 1],
        )
        assert peak < len(stored["response"]) // 4, (names, peak)
    for other in (b'{"status": 1}', b'{"background": "yes"}', b'{"output": {}}'):
        stored["response"] = other
        with pytest.raises(APIError) as e:
            await store.fields("resp_a", "t", "response", whole=False)
        assert e.value.status == 404, other
