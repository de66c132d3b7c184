"""API keys and tenancy end to end (issue 16, item 2): the gateway with ``auth = "keys"`` in front
of the real stack (NATS with JetStream, Redis, dispatcher, two workers). Keys are made, listed and
revoked over /v1/keys and with `dlora keys`; a tenant sees and uses only its own and the public
adapters; limits answer 429 with Retry-After; keys come back from their durable copy after Redis
loses everything."""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

import aiohttp
import msgspec
import pytest
from nats.aio.msg import Msg

from dlora.common import apikeys, log, subjects
from dlora.common.key_registry import KEYS_RECONCILE_S
from dlora.common.messages import GenerateRequest
from dlora.services.cli import main
from dlora.services.servers import Server
from tests.integration.conftest import ADMIN_KEY, Stack

ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}
ONE = {"model": "model", "prompt": "kalo remi", "max_tokens": 1, "temperature": 0}


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


async def call(
    stack: Stack, method: str, path: str, body: Any = None, headers: dict[str, str] | None = None
) -> tuple[int, Any, dict[str, str]]:
    async with aiohttp.ClientSession() as http:
        async with http.request(method, stack.url + path, json=body, headers=headers) as r:
            return r.status, await r.json(), dict(r.headers)


async def make_key(stack: Stack, tenant: str, **fields: Any) -> tuple[str, dict]:
    status, made, _ = await call(stack, "POST", "/v1/keys", {"tenant": tenant, **fields}, ADMIN)
    assert status == 201, made
    return made["key"], made


async def test_inference_takes_only_a_valid_unrevoked_key(keyed_stack: Stack) -> None:
    stack = keyed_stack
    key, made = await make_key(stack, "acme")
    assert key.startswith("sk-dlora-") and made["scopes"] == ["inference"] and "digest" not in made
    chat = {"model": "model", "messages": [{"role": "user", "content": "kalo"}], "max_tokens": 1}
    for method, path, body in (
        ("POST", "/v1/completions", ONE),
        ("POST", "/v1/chat/completions", chat),
        ("GET", "/v1/models", None),
    ):
        status, err, headers = await call(stack, method, path, body)  # no key
        assert status == 401 and err["error"]["type"] == "invalid_request_error", (path, err)
        assert "didn't provide an API key" in err["error"]["message"] and headers["WWW-Authenticate"].startswith(
            "Bearer"
        )
        status, err, _ = await call(stack, method, path, body, bearer(key[:-1] + "?"))
        assert status == 401 and err["error"]["code"] == "invalid_api_key", (path, err)
        status, _, _ = await call(stack, method, path, body, bearer(key))
        assert status == 200, path
    # another scheme is named (it read as no key at all), and a key shown back is plain text
    status, err, _ = await call(stack, "GET", "/v1/models", headers={"Authorization": f"Basic {key}"})
    assert status == 401 and "It came with the 'Basic' scheme: use Bearer." in err["error"]["message"], err
    # a bare "Bearer" is said so, and a key sent without a scheme is never echoed (a user's trial)
    status, err, _ = await call(stack, "GET", "/v1/models", headers={"Authorization": "Bearer"})
    assert status == 401 and "The Bearer scheme came with no key" in err["error"]["message"], err
    status, err, _ = await call(stack, "GET", "/v1/models", headers={"Authorization": key})
    assert status == 401 and "write 'Bearer ' before the key" in err["error"]["message"], err
    assert key[:12] not in err["error"]["message"]
    status, err, _ = await call(stack, "GET", "/v1/models", headers=bearer("é" + "x" * 20))
    assert status == 401 and err["error"]["message"].isascii(), err

    # the admin endpoints list keys without their secret, and revoke them
    status, listing, _ = await call(stack, "GET", "/v1/keys", headers=ADMIN)
    assert status == 200 and [k["id"] for k in listing["data"]] == [made["id"]]
    assert key not in json.dumps(listing) and made["hint"] == f"sk-dlora-...{key[-4:]}"
    status, revoked, _ = await call(stack, "DELETE", f"/v1/keys/{made['id']}", headers=ADMIN)
    assert status == 200 and revoked["revoked"] is True
    status, err, _ = await call(stack, "POST", "/v1/completions", ONE, bearer(key))
    assert status == 401 and "revoked" in err["error"]["message"] and err["error"]["code"] == "invalid_api_key"
    status, err, _ = await call(stack, "DELETE", "/v1/keys/key-nope", headers=ADMIN)
    assert status == 404

    # scopes: an inference key administers nothing (403); an admin-scope key does
    user, _ = await make_key(stack, "acme")
    adapter = {"name": "mine", "path": str(stack.tiny.adapters["lora-0"])}
    for method, path, body in (("POST", "/v1/adapters", adapter), ("POST", "/v1/keys", {"tenant": "x"})):
        status, err, _ = await call(stack, method, path, body, bearer(user))
        assert status == 403 and err["error"]["code"] == "insufficient_scope", err
    status, _, _ = await call(stack, "DELETE", "/v1/adapters/lora-0", headers=bearer(user))
    assert status == 403
    boss, _ = await make_key(stack, "ops", scopes=["inference", "admin"])
    status, _, _ = await call(stack, "POST", "/v1/adapters", adapter, bearer(boss))
    assert status == 201
    # an admin-only key lists the models it registers (it was refused with 403), and uses none
    admin_only, _ = await make_key(stack, "ops", scopes=["admin"])
    status, models, _ = await call(stack, "GET", "/v1/models", headers=bearer(admin_only))
    assert status == 200 and "mine" in {m["id"] for m in models["data"]}, models
    status, err, _ = await call(stack, "POST", "/v1/completions", ONE, bearer(admin_only))
    assert status == 403 and err["error"]["code"] == "insufficient_scope", err
    status, err, _ = await call(stack, "POST", "/v1/keys", {"tenant": "bad tenant"}, bearer(boss))
    assert status == 400 and err["error"]["param"] == "tenant"


async def test_a_tenant_sees_and_uses_only_its_own_and_public_adapters(keyed_stack: Stack) -> None:
    stack = keyed_stack
    for name, owner, src in (("acme-sql", "acme", "lora-0"), ("globex-sql", "globex", "lora-1")):
        body = {"name": name, "path": str(stack.tiny.adapters[src]), "owner": owner}
        status, entry, _ = await call(stack, "POST", "/v1/adapters", body, ADMIN)
        assert status == 201 and entry["owner"] == owner
    # an empty owner silently made the adapter public (a user's trial): said, naming the field
    body = {"name": "nobodys", "path": str(stack.tiny.adapters["lora-2"]), "owner": ""}
    status, err, _ = await call(stack, "POST", "/v1/adapters", body, ADMIN)
    assert (status, err["error"]["param"]) == (400, "owner"), err
    acme, _ = await make_key(stack, "acme")
    public = set(stack.tiny.adapters)

    status, models, _ = await call(stack, "GET", "/v1/models", headers=bearer(acme))
    listed = {m["id"]: m for m in models["data"][1:]}
    assert status == 200 and set(listed) == public | {"acme-sql"}
    assert listed["acme-sql"]["owned_by"] == "acme" and listed["lora-0"]["owned_by"] == "dlora"
    assert all(m["root"] == m["id"] for m in listed.values())  # no file paths but to admins
    status, models, _ = await call(stack, "GET", "/v1/models", headers=ADMIN)
    every = {m["id"]: m for m in models["data"][1:]}
    assert set(every) == public | {"acme-sql", "globex-sql"} and every["globex-sql"]["root"].startswith("/")
    # another tenant's adapter is as unknown to retrieve as to the list
    assert (await call(stack, "GET", "/v1/models/globex-sql", headers=bearer(acme)))[0] == 404
    assert (await call(stack, "GET", "/v1/models/acme-sql", headers=bearer(acme)))[1]["owned_by"] == "acme"

    # the tenant's requests carry its tenant (not the body's user)
    seen: list[GenerateRequest] = []

    async def on_request(msg: Msg) -> None:
        seen.append(msgspec.json.decode(msg.data, type=GenerateRequest))

    sub = await stack.nc.subscribe(subjects.REQUESTS, cb=on_request)
    for model in ("acme-sql", "lora-2", "model"):
        status, resp, _ = await call(
            stack, "POST", "/v1/completions", {**ONE, "model": model, "user": "u"}, bearer(acme)
        )
        assert status == 200 and resp["model"] == model
    await sub.unsubscribe()
    assert [r.tenant for r in seen] == ["acme"] * 3

    # another tenant's adapter is answered exactly as a name never registered
    status, theirs, _ = await call(stack, "POST", "/v1/completions", {**ONE, "model": "globex-sql"}, bearer(acme))
    _, unknown, _ = await call(stack, "POST", "/v1/completions", {**ONE, "model": "nothing-sq"}, bearer(acme))
    assert status == 404
    assert theirs["error"]["message"].replace("globex-sql", "X") == unknown["error"]["message"].replace(
        "nothing-sq", "X"
    )
    assert {k: v for k, v in theirs["error"].items() if k != "message"} == {
        k: v for k, v in unknown["error"].items() if k != "message"
    }
    status, _, _ = await call(
        stack, "POST", "/v1/chat/completions", {"model": "globex-sql", "messages": [], "max_tokens": 1}, bearer(acme)
    )
    assert status == 404
    # nor does the gateway's /metrics, open to anyone, name a tenant's adapter: its requests (the
    # 200 to acme-sql above, the refusal naming globex-sql) count under "(private)"
    async with aiohttp.ClientSession() as http, http.get(stack.url + "/metrics") as r:
        text = await r.text()
    assert "acme-sql" not in text and "globex-sql" not in text and "nothing-sq" not in text
    assert 'dlora_requests_total{adapter="(private)",status="200"} 1.0' in text
    assert 'dlora_requests_total{adapter="lora-2",status="200"} 1.0' in text


async def test_a_key_over_its_rate_or_concurrency_gets_429_with_retry_after(keyed_stack: Stack) -> None:
    stack = keyed_stack
    paced, _ = await make_key(stack, "acme", rate_per_s=0.2, burst=2)
    statuses = []
    for _ in range(3):
        status, body, headers = await call(stack, "POST", "/v1/completions", ONE, bearer(paced))
        statuses.append(status)
    assert statuses == [200, 200, 429]
    assert body["error"]["code"] == "rate_limit_exceeded" and body["error"]["type"] == "rate_limit_exceeded"
    assert 1 <= int(headers["Retry-After"]) <= 5
    status, _, _ = await call(stack, "GET", "/v1/models", headers=bearer(paced))
    assert status == 200  # listing models is not a request the limits count

    single, made = await make_key(stack, "acme", concurrency=1)
    long = {**ONE, "max_tokens": 200, "ignore_eos": True}
    running = asyncio.create_task(call(stack, "POST", "/v1/completions", long, bearer(single)))
    while stack.gateway.auth.limiter.running(made["id"]) == 0:
        await asyncio.sleep(0.01)
    status, body, headers = await call(stack, "POST", "/v1/completions", ONE, bearer(single))
    assert status == 429 and "1 requests at once" in body["error"]["message"] and headers["Retry-After"] == "1"
    status, _, _ = await running
    assert status == 200
    status, _, _ = await call(stack, "POST", "/v1/completions", ONE, bearer(single))
    assert status == 200  # the place was given back


async def test_keys_and_revocations_survive_redis_losing_everything(keyed_stack: Stack) -> None:
    stack = keyed_stack
    kept, _ = await make_key(stack, "acme")
    gone, gone_made = await make_key(stack, "acme")
    status, _, _ = await call(stack, "DELETE", f"/v1/keys/{gone_made['id']}", headers=ADMIN)
    assert status == 200
    await stack.store.r.flushdb()  # as a Redis restarted without persistence
    assert not await stack.store.has_api_keys()
    async with asyncio.timeout(60):  # the workers' heartbeats come back within their interval
        while not await stack.store.live_workers():
            await asyncio.sleep(0.05)
    # several at once: each waits for the restore the first set off (the others were 401 for a
    # second, and requests of registered adapters 404: a helper's trial)
    answers = await asyncio.gather(*(call(stack, "POST", "/v1/completions", ONE, bearer(kept)) for _ in range(6)))
    assert [status for status, _, _ in answers] == [200] * 6, answers
    status, err, _ = await call(stack, "POST", "/v1/completions", ONE, bearer(gone))
    assert status == 401 and "revoked" in err["error"]["message"]
    status, listing, _ = await call(stack, "GET", "/v1/keys", headers=ADMIN)
    assert [k["revoked"] for k in listing["data"]] == [False, True]


async def test_a_redis_brought_back_from_an_older_snapshot_neither_revives_a_key_nor_loses_one(
    keyed_stack: Stack,
) -> None:
    """A user's trial: Redis restarted from a snapshot taken before a revocation made the revoked
    key work again (the durable copy said revoked; only an empty Redis was restored from it), and a
    key made after the snapshot was refused for good. The gateway reconciles the two, a revocation
    winning: on a miss at once, and every KEYS_RECONCILE_S."""
    stack = keyed_stack
    old, old_made = await make_key(stack, "acme")
    snapshot = await stack.store.api_key(old_made["id"])  # as the snapshot holds it: not revoked
    assert (await call(stack, "DELETE", f"/v1/keys/{old_made['id']}", headers=ADMIN))[0] == 200
    late, late_made = await make_key(stack, "acme")
    # Redis rolled back to the snapshot: the revocation and the late key gone from it
    assert snapshot is not None and await stack.store.put_api_key(snapshot)
    await stack.store.r.hdel(f"{stack.store.p}:api-keys", apikeys.digest(late))
    await stack.store.r.hdel(f"{stack.store.p}:api-key-ids", late_made["id"])
    async with asyncio.timeout(KEYS_RECONCILE_S + 5):  # its revocation comes back within a round
        while (await call(stack, "POST", "/v1/completions", ONE, bearer(old)))[0] != 401:
            await asyncio.sleep(0.2)
    status, resp, _ = await call(stack, "POST", "/v1/completions", ONE, bearer(late))
    assert status == 200, resp  # a miss reconciles at once
    assert (await stack.store.api_key(old_made["id"])).revoked


async def test_the_cli_creates_lists_and_revokes_keys(
    keyed_stack: Stack, nats_server: Server, redis_server: Server, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    stack = keyed_stack
    monkeypatch.setenv("DLORA_NATS_URL", nats_server.url)
    monkeypatch.setenv("DLORA_REDIS_URL", redis_server.url)
    # The stack's log lines to stderr from now, as the command's own configuration sends them: under
    # structlog's defaults (stdout) a line the stack wrote before the command configured its own
    # was read as the command's output (a loaded CI run)
    log.configure(json=False, level=logging.WARNING)

    async def dlora(*args: str) -> tuple[int, str, str]:
        capsys.readouterr()
        code = await asyncio.to_thread(main, ["keys", *args])
        out, err = capsys.readouterr()
        return code, out, err

    code, out, err = await dlora("list")  # none yet: said, where it printed nothing at all
    assert code == 0 and out == "" and "no API keys yet" in err, (out, err)
    code, out, _ = await dlora("create", "--tenant", "acme", "--rate", "5", "--concurrency", "2")
    key, summary = out.splitlines()
    assert code == 0 and key.startswith("sk-dlora-") and "tenant acme" in summary
    key_id = summary.split()[0]
    status, _, _ = await call(stack, "POST", "/v1/completions", ONE, bearer(key))
    assert status == 200
    code, out, _ = await dlora("create", "--tenant", "ops", "--admin", "--json")
    boss = json.loads(out)
    assert code == 0 and boss["scopes"] == ["inference", "admin"]
    status, _, _ = await call(stack, "GET", "/v1/keys", headers=bearer(boss["key"]))
    assert status == 200

    code, out, _ = await dlora("list")
    rows = out.splitlines()
    assert code == 0 and len(rows) == 2 and key not in out
    assert (
        rows[0].startswith(key_id) and "tenant=acme" in rows[0] and "rate=5/s" in rows[0] and "concurrency=2" in rows[0]
    )
    code, out, _ = await dlora("revoke", key_id)
    assert code == 0 and key_id in out
    status, _, _ = await call(stack, "POST", "/v1/completions", ONE, bearer(key))
    assert status == 401
    code, out, _ = await dlora("list", "--json")
    assert [k["revoked"] for k in json.loads(out)] == [True, False]
    code, _, err = await dlora("revoke", "key-nope")
    assert code == 1 and "no key" in err
    code, _, err = await dlora("create", "--tenant", "no spaces")
    assert code == 2 and "tenant" in err


def test_the_cli_names_a_redis_it_cannot_reach_without_its_password(
    nats_server: Server, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    """A user's trial: `dlora keys: Redis at redis://user:hunter2@127.0.0.1:1/0: Error 111...`."""
    from dlora.services.servers import free_port

    monkeypatch.setenv("DLORA_NATS_URL", nats_server.url)
    monkeypatch.setenv("DLORA_REDIS_URL", f"redis://user:hunter2@127.0.0.1:{free_port()}/0")
    assert main(["keys", "list"]) == 2
    err = capsys.readouterr().err
    assert "hunter2" not in err and "redis://user:***@127.0.0.1:" in err, err


async def test_the_openai_client_authenticates_with_a_key_and_reads_the_refusals(keyed_stack: Stack) -> None:
    import openai

    stack = keyed_stack
    key, _ = await make_key(stack, "acme", rate_per_s=0.1, burst=1)
    client = openai.AsyncOpenAI(base_url=f"{stack.url}/v1", api_key=key, max_retries=0)
    wrong = openai.AsyncOpenAI(base_url=f"{stack.url}/v1", api_key="sk-dlora-wrong", max_retries=0)
    try:
        # ignore_eos: sampled at temperature 1, the random model ends at its first token ~0.3 % of the time
        done = await client.completions.create(
            model="model", prompt="kalo remi", max_tokens=2, extra_body={"ignore_eos": True}
        )
        assert done.usage is not None and done.usage.completion_tokens == 2
        with pytest.raises(openai.RateLimitError) as limited:
            await client.completions.create(model="model", prompt="kalo remi", max_tokens=2)
        assert limited.value.code == "rate_limit_exceeded" and int(limited.value.response.headers["Retry-After"]) >= 1
        with pytest.raises(openai.AuthenticationError) as refused:
            await wrong.models.list()
        assert refused.value.code == "invalid_api_key"
    finally:
        await client.close()
        await wrong.close()


async def test_the_load_generator_sends_the_key(keyed_stack: Stack, monkeypatch: pytest.MonkeyPatch) -> None:
    """`dlora loadgen` against a gateway with auth = "keys": --api-key, else OPENAI_API_KEY as the
    openai package reads it (it had no way to send one: every request a 401)."""
    from dlora.loadgen.clients import HttpClient
    from dlora.loadgen.metrics import RequestResult
    from dlora.loadgen.workload import RequestSpec

    key, _ = await make_key(keyed_stack, "acme")
    monkeypatch.setenv("OPENAI_API_KEY", key)
    spec = RequestSpec(arrival_s=0.0, adapter=None, prompt_len=4, output_len=2)
    for api_key, error in ((None, None), ("sk-dlora-wrong", "HTTP 401"), ("", "HTTP 401")):
        client = HttpClient(keyed_stack.url, "model", clock=lambda: 0.0, api_key=api_key)
        try:
            result = RequestResult(0.0, None, 2, sent=True)
            await client.send(0, spec, result)
        finally:
            await client.close()
        if error is None:
            assert result.completed and result.tokens == 2, result
        else:
            assert (result.error or "").startswith(error), (api_key, result)


def test_the_cli_gives_up_on_an_unreachable_nats_with_a_line_not_a_hang(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A command is not a service: it retried an unreachable NATS for ever."""
    from dlora.services import keys_cli

    monkeypatch.setattr(keys_cli, "_TIMEOUT_S", 1.0)
    monkeypatch.setenv("DLORA_NATS_URL", "nats://127.0.0.1:1")
    monkeypatch.setenv("DLORA_REDIS_URL", "redis://127.0.0.1:1/0")
    assert main(["keys", "list"]) == 2
    assert "did not answer" in capsys.readouterr().err


def test_the_cli_names_a_seed_list_and_a_sentinel_url_without_their_passwords(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The documented multi-address forms (deploy/README) crashed the line that names them:
    "ValueError: Port could not be cast to integer value", with a traceback."""
    from dlora.services import keys_cli

    monkeypatch.setattr(keys_cli, "_TIMEOUT_S", 1.0)
    monkeypatch.setenv("DLORA_NATS_URL", "nats://gateway:hunter2@127.0.0.1:1,nats://hunter2@127.0.0.1:2")
    monkeypatch.setenv("DLORA_REDIS_URL", "redis+sentinel://dlora:hunter2@127.0.0.1:1,127.0.0.1:2/dlora/0")
    assert main(["keys", "list"]) == 2
    err = capsys.readouterr().err
    assert "hunter2" not in err and "did not answer" in err, err
    assert "nats://gateway:***@127.0.0.1:1,nats://***@127.0.0.1:2" in err, err


async def test_an_unknown_keys_slow_restore_is_a_401_and_holds_up_no_one_else(
    keyed_stack: Stack, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A miss merges the keys' durable copy into Redis (NATS work: 2.9 s with 7,000 keys). Inside
    the gateway's 2 s bound on Redis reads it counted as Redis down: the unknown key got 503, and
    for the pause after it valid keys, /v1/models and /healthz did too (a review)."""
    secret, _ = await make_key(keyed_stack, "acme")
    registry = keyed_stack.gateway.auth.keys

    async def slow_restore() -> int:
        await asyncio.sleep(2.5)
        return 0

    monkeypatch.setattr(registry, "restore", slow_restore)
    monkeypatch.setattr(registry, "_restore_tried", -1e9)  # a miss now sets one off
    unknown = asyncio.create_task(call(keyed_stack, "GET", "/v1/models", None, bearer(apikeys.PREFIX + "x" * 40)))
    await asyncio.sleep(0.2)
    assert (await call(keyed_stack, "GET", "/v1/models", None, bearer(secret)))[0] == 200  # meanwhile
    status, body, _ = await unknown
    assert status == 401 and "Incorrect API key" in body["error"]["message"], body
    assert (await call(keyed_stack, "GET", "/v1/models", None, bearer(secret)))[0] == 200  # after
    assert (await call(keyed_stack, "GET", "/healthz"))[0] == 200
