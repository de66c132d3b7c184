"""NATS users with per-role subject permissions and a Redis ACL user, against real servers (issue
16, item 2's bus half): anyone else on the host can neither connect nor, as an application, read
others' replies, publish plans or pose as a worker. (`dlora up` running on them end to end is
test_launcher's.)"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
from pathlib import Path

import msgspec
import nats
import pytest
from nats.errors import NoServersError
from redis.asyncio import Redis
from redis.exceptions import AuthenticationError, NoPermissionError

from dlora.common import bus, subjects
from dlora.common.messages import MovePlan
from dlora.common.permissions import APP_USER, ROLES, shipped_config
from dlora.common.redis_client import redis_client
from dlora.services.servers import REDIS_USER, Server, free_port, start_nats, start_redis

PASSWORDS = {name: f"pw-{name}" for name in (*ROLES, APP_USER)}


@pytest.fixture(scope="module")
def secured_nats() -> Server:
    server = start_nats(passwords=PASSWORDS)
    yield server
    server.stop()


async def _connect(url: str, user: str | None, errors: list[str]) -> nats.NATS:
    async def on_error(e: Exception) -> None:
        errors.append(str(e))

    return await nats.connect(
        url,
        user=user,
        password=PASSWORDS.get(user or ""),
        error_cb=on_error,
        allow_reconnect=False,
        max_reconnect_attempts=0,
    )


async def test_only_known_users_connect(secured_nats: Server) -> None:
    for user, password in ((None, None), ("app", "wrong"), ("intruder", "pw-app")):
        with pytest.raises((NoServersError, nats.errors.Error, OSError)):
            await nats.connect(
                secured_nats.url, user=user, password=password, allow_reconnect=False, max_reconnect_attempts=0
            )


async def test_the_nats_example_says_why_its_login_was_refused(secured_nats: Server) -> None:
    """A trial: the example's docstring promises "Authorization Violation" for a refused login,
    but its error callback swallowed it and it said only "no servers available"."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location(
        "nats_client", Path(__file__).parents[2] / "examples" / "nats_client.py"
    )
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    host = secured_nats.url.removeprefix("nats://")
    with pytest.raises(RuntimeError, match="(?i)authorization violation"):
        await example.generate(f"nats://app:wrong@{host}", None, "kalo")


async def test_an_application_reaches_only_its_own_subjects(secured_nats: Server) -> None:
    errors: list[str] = []
    app = await _connect(secured_nats.url, APP_USER, errors)
    worker = await _connect(secured_nats.url, "worker", [])
    try:
        # its own replies arrive, sent where a worker would send them
        own = await app.subscribe(subjects.replies_of(f"{APP_USER}.mine"))
        await bus.flush(app)
        await worker.publish(subjects.reply_inbox("r1", f"{APP_USER}.mine"), b"hello")
        await bus.flush(worker)
        assert (await own.next_msg(timeout=20)).data == b"hello"
        # another user's replies, a worker's requests, plans, stats: refused by the server
        for subject in (subjects.replies_of("gw1"), subjects.worker_requests("w0"), subjects.REQUESTS):
            await app.subscribe(subject)
        await app.publish(subjects.MOVES, msgspec.json.encode(MovePlan(plan_id="forged")))
        await app.publish(subjects.stats("w0"), b"{}")
        await app.publish(subjects.reply_inbox("r1", "gw1"), b"injected")
        # the gateways' request and abort subjects, and another application's
        # and the gateways' announcements and another application's (a trial: any user spoke for
        # any reader on the one shared subject)
        for subject in (
            subjects.REQUESTS,
            subjects.ABORT,
            subjects.requests_of("b"),
            subjects.aborts_of("b"),
            subjects.CLIENTS,
            subjects.clients_of("b"),
        ):
            await app.publish(subject, b"{}")
        own = (subjects.requests_of(APP_USER), subjects.aborts_of(APP_USER), subjects.clients_of(APP_USER))
        for subject in own:  # allowed: its own
            await app.publish(subject, b"{}")
        await bus.flush(app)
        await asyncio.sleep(0.3)
        violations = [e for e in errors if "permissions violation" in e.lower()]
        assert len(violations) == 12, errors
        for what in ("dlora.reply.gw1", "dlora.worker.w0.requests", "dlora.moves", "dlora.stats.w0", "dlora.abort.b"):
            assert any(what in e for e in violations), (what, violations)
        assert not any(any(f'"{subject}"' in e for subject in own) for e in violations)
    finally:
        await app.close()
        await worker.close()


async def test_redis_takes_only_the_services_user_on_their_keys() -> None:
    server = start_redis(password="pw-redis", prefix="dlora")
    anonymous = Redis.from_url(server.url)
    services = redis_client(server.url, username=REDIS_USER, password="pw-redis")
    try:
        with pytest.raises(AuthenticationError):
            await anonymous.hset("dlora:adapters", "evil", "{}")
        await services.hset("dlora:adapters", "a", "{}")
        assert await services.hget("dlora:adapters", "a") == b"{}"
        with pytest.raises(NoPermissionError):
            await services.set("elsewhere", "1")  # another deployment's keys
        with pytest.raises(NoPermissionError):
            await services.flushall()
    finally:
        await anonymous.aclose()
        await services.aclose()
        server.stop()


def test_the_shipped_users_file_is_the_generated_one_and_the_server_takes_it(tmp_path: Path) -> None:
    shipped = Path(__file__).parents[2] / "deploy" / "nats" / "dlora-users.conf"
    assert shipped.read_text() == shipped_config()
    port = free_port()
    (tmp_path / "dlora-users.conf").write_text(shipped.read_text())
    (tmp_path / "nats.conf").write_text(f"port: {port}\nhost: 127.0.0.1\ninclude dlora-users.conf\n")
    env = {**os.environ, **{f"DLORA_NATS_{n.upper()}_PASSWORD": f"pw-{n}" for n in PASSWORDS}}
    from dlora.services.servers import _binary

    check = subprocess.run(
        [_binary("nats-server"), "-c", str(tmp_path / "nats.conf"), "-t"], env=env, capture_output=True, text=True
    )
    assert check.returncode == 0, check.stderr


@pytest.mark.parametrize("wrong", ["nats", "redis"])
def test_a_service_whose_login_is_refused_stops_at_once_saying_which_setting(secured_nats: Server, wrong: str) -> None:
    """A wrong password is a setting to fix, not an outage to wait out: the NATS client retried
    a refused login for ever and said so only in its log."""
    redis = start_redis(password="pw-redis", prefix="dlora")
    try:
        env = {
            **os.environ,
            "DLORA_NATS_URL": secured_nats.url,
            "DLORA_NATS_USER": "dispatcher",
            "DLORA_NATS_PASSWORD": "wrong" if wrong == "nats" else PASSWORDS["dispatcher"],
            "DLORA_REDIS_URL": redis.url,
            "DLORA_REDIS_USERNAME": REDIS_USER,
            "DLORA_REDIS_PASSWORD": "wrong" if wrong == "redis" else "pw-redis",
        }
        done = subprocess.run(
            [sys.executable, "-m", "dlora.services.cli", "serve", "dispatcher"],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
    finally:
        redis.stop()
    assert done.returncode == 2, done.stderr[-2000:]
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("dlora serve dispatcher: ") and f"(check {wrong}_" in last


async def test_the_services_keep_their_durable_copies_with_only_their_own_permissions(
    secured_nats: Server, redis: Redis
) -> None:
    """The dispatcher writes and restores the adapter registry's bucket, the gateway the API keys'
    too, each connected as its own user: JetStream's API is open to them only for those buckets."""
    from dlora.common import apikeys
    from dlora.common.key_registry import KeyRegistry, purge_keys
    from dlora.common.messages import AdapterEntry
    from dlora.common.registry import AdapterRegistry, purge
    from dlora.common.state import StateStore

    store = StateStore(redis)
    dispatcher = await _connect(secured_nats.url, "dispatcher", errors := [])
    gateway = await _connect(secured_nats.url, "gateway", errors)
    try:
        registry = await AdapterRegistry.open(dispatcher, store)
        keys = await KeyRegistry.open(gateway, store)
        assert await registry.kv() is not None and await keys.kv() is not None, errors
        assert await registry.register(AdapterEntry(name="a", path="/a", rank=8, created=0.0, version="v1"))
        _, key = apikeys.new_key("acme", [apikeys.INFERENCE], now=0.0)
        await keys.add(key)
        await redis.flushdb()
        assert await registry.restore() == 1 and await keys.restore() == 1
        assert await (await AdapterRegistry.open(gateway, store)).lookup("a") is not None
        assert not [e for e in errors if "permissions violation" in e.lower()], errors
        with pytest.raises(Exception):  # noqa: B017 - any other stream is out of reach (a timeout)
            await dispatcher.jetstream(timeout=1.0).add_stream(name="elsewhere", subjects=["elsewhere.>"])
    finally:
        for name, purged in (("dispatcher", purge), ("gateway", purge_keys)):  # the next test starts afresh
            anyone = await _connect(secured_nats.url, name, [])
            with contextlib.suppress(Exception):
                await purged(anyone, "dlora")
            await anyone.close()
        await dispatcher.close()
        await gateway.close()


def test_a_service_stops_when_told_while_nats_does_not_answer_and_names_unset_urls() -> None:
    """It retried an unreachable NATS for ever and took no SIGTERM or Ctrl-C (systemctl stop
    waited out TimeoutStopSec); an empty nats_url (the file `dlora deploy install` writes leaves
    it to be filled in) was a traceback."""
    env = {
        **os.environ,
        "DLORA_NATS_URL": f"nats://127.0.0.1:{free_port()}",
        "DLORA_REDIS_URL": "redis://127.0.0.1:1/0",
    }
    service = subprocess.Popen(
        [sys.executable, "-m", "dlora.services.cli", "serve", "dispatcher"],
        env=env,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert service.stderr is not None
        while "dependency unavailable" not in (line := service.stderr.readline()):  # trying to connect (nats)
            assert line, "the service ended before it tried NATS"
        service.send_signal(signal.SIGTERM)
        assert service.wait(timeout=10) == 0
    finally:
        service.kill()
    env["DLORA_NATS_URL"] = ""
    done = subprocess.run(
        [sys.executable, "-m", "dlora.services.cli", "serve", "dispatcher"], env=env, capture_output=True, text=True
    )
    assert done.returncode == 2 and done.stderr.strip() == (
        "dlora serve dispatcher: nats_url is not set (the settings file's top level, or DLORA_NATS_URL); "
        "only `dlora up` starts NATS and Redis itself"
    )


async def test_a_service_names_its_servers_and_login_without_the_passwords_in_their_urls(
    secured_nats: Server,
) -> None:
    """Startup errors quoted nats_url and redis_url whole, passwords in them, into the journal
    ("NATS at nats://dispatcher:PASSWORD@... refused the login (no user)": it had one, in the URL)."""
    from dlora.common.settings import Common

    host = secured_nats.url.removeprefix("nats://")
    with pytest.raises(bus.CredentialsRefused) as refused:
        await bus._connect_nats(Common(nats_url=f"nats://dispatcher:s3cret@{host}"))
    assert f"NATS at nats://dispatcher:***@{host} refused the login (user 'dispatcher')" in str(refused.value)
    stop = asyncio.Event()
    stop.set()
    with pytest.raises(bus.StoppedConnecting) as stopped:
        await bus._connect_nats(Common(nats_url=f"nats://a:s3cret@127.0.0.1:{free_port()},nats://s3cret@{host}"), stop)
    assert "s3cret" not in str(stopped.value) and "nats://***@" in str(stopped.value)
    redis = start_redis(password="pw-redis", prefix="dlora")
    try:
        s = Common(
            nats_url=secured_nats.url,
            nats_user="dispatcher",
            nats_password=PASSWORDS["dispatcher"],
            redis_url=redis.url.replace("redis://", f"redis://{REDIS_USER}:s3cret@"),
        )
        with pytest.raises(bus.CredentialsRefused, match="refused the credentials") as refused:
            async with bus.connections(s):
                pass
    finally:
        redis.stop()
    assert "s3cret" not in str(refused.value) and f"{REDIS_USER}:***@" in str(refused.value)
