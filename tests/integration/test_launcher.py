"""`dlora up` brings the whole stack up from nothing, serves, and stops cleanly on Ctrl-C."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from dlora.services.launcher import CRASH_LOOP_S
from dlora.services.servers import free_port, start_nats_preferring
from tests.integration.conftest import STACK_KV_ENV

README = Path(__file__).resolve().parents[2] / "README.md"


def readme_loadgen_commands() -> list[str]:
    """The ``dlora loadgen`` command lines of the README's load generator section, as written."""
    section = README.read_text().split("## Load generator", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```sh\n(.*?)```", section, re.S)
    lines = " ".join(blocks).replace("\\\n", " ").splitlines()
    return [line.strip() for line in lines if line.strip().startswith("dlora loadgen")]


def run_readme_loadgen(gateway: str, nats_url: str, cwd: Path) -> None:
    """Each README example against this stack, from a working directory that is not the
    repository, through the installed ``dlora`` script. Only the addresses (where this stack's
    differ) and the work asked (kept small: few requests with short outputs, sent faster where the
    example sets no rate) change. The examples run side by side, each checked on its own."""
    commands = readme_loadgen_commands()
    assert len(commands) >= 3, commands
    dlora = str(Path(sys.executable).parent / "dlora")
    runs = []
    try:
        for i, line in enumerate(commands):
            line = line.replace("http://127.0.0.1:8000", gateway)
            line = line.replace("nats://app:PASSWORD@127.0.0.1:4222", nats_url)
            argv = shlex.split(line)[2:]
            if "--target" not in argv:
                argv += ["--target", gateway]
            if "--rate" not in argv:
                argv += ["--rate", "10"]
            out, log = cwd / f"run-{i}", cwd / f"run-{i}.log"
            with log.open("w") as f:
                small = ["--requests", "6", "--max-output", "16", "--out", str(out)]
                proc = subprocess.Popen([dlora, "loadgen", *argv, *small], cwd=cwd, stdout=f, stderr=f)
            runs.append((line, out, log, proc))
        for line, out, log, proc in runs:
            assert proc.wait(timeout=180) == 0, f"{line}\n{log.read_text()[-5000:]}"
            summary = json.loads((out / "result.json").read_text())["summary"]
            assert summary["completed"] == 6 and summary["lost"] == 0, line
    finally:
        for *_, proc in runs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


GIVEN = "adm-given-SECRET-0123456789"


def test_dlora_up_serves_the_readme_commands_and_stops_cleanly(tmp_path: Path) -> None:
    port = free_port()
    extra = tmp_path / "extra-adapters"  # a root of the user's own, by the environment
    extra.mkdir()
    proc = subprocess.Popen(
        [sys.executable, "-m", "dlora.services.cli", "up", "--workers", "1", "--port", str(port)],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={
            **os.environ,
            "DLORA_GATEWAY_ADAPTER_ROOTS": json.dumps([str(extra)]),
            "DLORA_ADMIN_KEY": GIVEN,
            "DLORA_HEARTBEAT_TLL_S": "7",  # a typo: said once, by dlora up (each service said it again)
            **STACK_KV_ENV,
        },
    )
    lines = []
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line and proc.poll() is not None:
                break
            lines.append(line)
            if "dlora is up" in line:
                break
        assert any("dlora is up" in line for line in lines), "".join(lines[-20:])
        warned = [line for line in lines if "DLORA_HEARTBEAT_TLL_S names no setting" in line]
        assert len(warned) == 1 and "did you mean DLORA_HEARTBEAT_TTL_S?" in warned[0], warned
        out = "".join(lines)
        while not re.search(r"curl .*\n", out):
            out += proc.stdout.readline()
        body = json.dumps({"model": "lora-1", "prompt": "kalo remi", "max_tokens": 5, "temperature": 0}).encode()
        req = urllib.request.Request(
            f"http://127.0.0.1:{port}/v1/completions", data=body, headers={"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(req, timeout=60) as r:
            resp = json.load(r)
        assert resp["usage"]["completion_tokens"] == 5
        assert (tmp_path / ".cache" / "demo" / "model" / "config.json").exists()
        # The demo's folder stays a root beside the user's (their DLORA_GATEWAY_ADAPTER_ROOTS won over
        # the merged list and dropped it): an adapter registers from either.
        # An admin key it was given is never printed (a user's trial: three times, into the logs).
        assert GIVEN not in out and "admin key: $DLORA_ADMIN_KEY" in out
        admin = {"Content-Type": "application/json", "Authorization": f"Bearer {GIVEN}"}
        demo = tmp_path / ".cache" / "demo" / "adapters"
        shutil.copytree(demo / "lora-0", extra / "mine")
        for name, path in (("again", demo / "lora-1"), ("mine", extra / "mine")):
            add = json.dumps({"name": name, "path": str(path)}).encode()
            register = urllib.request.Request(f"http://127.0.0.1:{port}/v1/adapters", add, admin)
            with urllib.request.urlopen(register) as r:
                assert r.status == 201, name
        nats_url = re.search(r"NATS \(applications\): (nats://\S+)", out).group(1)
        import redis  # the Redis URL it prints logs in as it is (it lacked the credentials: NOAUTH)

        assert redis.Redis.from_url(re.search(r"Redis: (redis://\S+)", out).group(1)).ping()
        elsewhere = tmp_path / "elsewhere"
        elsewhere.mkdir()
        run_readme_loadgen(f"http://127.0.0.1:{port}", nats_url, elsewhere)

        # A worker killed: dlora up says which and starts it again (the rest stays up), and the
        # cluster serves on. It used to stop everything without saying why.
        children = subprocess.run(["ps", "-o", "pid=,args=", "--ppid", str(proc.pid)], capture_output=True, text=True)
        worker = next(int(line.split()[0]) for line in children.stdout.splitlines() if "serve worker" in line)
        # Killed within CRASH_LOOP_S of its start it would read as a crash loop, not started again
        # (a fast run of the steps above got there in under 10 s, and dlora up stopped).
        ran = int(subprocess.run(["ps", "-o", "etimes=", "-p", str(worker)], capture_output=True, text=True).stdout)
        time.sleep(max(0.0, CRASH_LOOP_S + 1 - ran))
        os.kill(worker, signal.SIGKILL)
        said, lines = "", []
        while "started it again" not in said:
            said = proc.stdout.readline()
            lines.append(said)
            assert said or proc.poll() is None, "dlora up ended"
        assert "worker-0 exited (signal SIGKILL)" in said
        # every worker line says whose, those of its adapter reads too (several under dlora up)
        read = [line for line in lines if "adapter read into host memory" in line]
        assert read and all("worker-0" in line for line in read), read
        deadline = time.monotonic() + 120
        while True:  # answered once the new worker is in (503s meanwhile: no live worker)
            try:
                with urllib.request.urlopen(req, timeout=60) as r:
                    assert json.load(r)["usage"]["completion_tokens"] == 5
                    break
            except urllib.error.HTTPError as e:
                assert e.code == 503 and time.monotonic() < deadline, e
                time.sleep(0.5)
    finally:
        proc.send_signal(signal.SIGINT)
        code = proc.wait(timeout=60)
        proc.stdout.close()
    assert code == 0
    with socket.socket() as s:  # the gateway is gone
        assert s.connect_ex(("127.0.0.1", port)) != 0


def test_a_gateway_port_in_use_is_refused_before_anything_starts(tiny_llama) -> None:
    """Another gateway on the port would answer the readiness check: dlora up printed "dlora is up"
    with an admin key that gateway does not know, while its own gateway had died."""
    import pytest

    from dlora.services.launcher import LocalStack

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        stack = LocalStack(1, str(tiny_llama.model), [], busy.getsockname()[1], None)
        with pytest.raises(RuntimeError, match="is in use") as refused:
            stack.start()
    # `make run` takes no --port: a user of it is told the variable it reads (a fresh user's trial)
    assert "DLORA_GATEWAY_PORT" in str(refused.value)
    assert not stack.procs and not stack.servers


def test_a_failed_start_leaves_nothing_running(tiny_llama) -> None:
    import pytest

    from dlora.services.launcher import LocalStack

    # A worker setting it refuses: the worker exits at start, and start() takes the rest down.
    stack = LocalStack(1, str(tiny_llama.model), [], free_port(), None, worker_env={"DLORA_ENGINE__KERNELS": "bogus"})
    with pytest.raises(RuntimeError, match="exited during start-up"):
        stack.start()
    assert stack.procs and all(p.poll() is not None for p in stack.procs)
    assert all(s.proc.poll() is not None for s in stack.servers)


def test_dlora_up_stops_at_ctrl_c_while_it_starts_and_refuses_no_workers(tiny_llama, tmp_path: Path) -> None:
    """Ctrl-C while the stack comes up stops it then (it waited out its 180 s start limit), and
    ``--workers 0`` is a usage error (it waited the same for a worker that never came)."""
    cli = [sys.executable, "-m", "dlora.services.cli", "up", "--model", str(tiny_llama.model)]
    refused = subprocess.run([*cli, "--workers", "0"], capture_output=True, text=True, timeout=60)
    assert refused.returncode == 2 and "--workers: 0 is below 1" in refused.stderr
    port = free_port()
    proc = subprocess.Popen(
        [*cli, "--workers", "1", "--port", str(port)],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, **STACK_KV_ENV},
    )
    seen = ""
    while "dispatcher ready" not in seen and proc.poll() is None:  # its services are starting
        seen += proc.stdout.readline()
    proc.send_signal(signal.SIGINT)
    # Stopped by the Ctrl-C ("interrupted while starting", 130), not after its 180 s start limit:
    # told by what it says; the 120 s only ends a test that waits on (the limit's answer differs).
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "interrupted while starting" in out, seen + out
    with socket.socket() as s:  # the gateway it started is gone
        s.bind(("127.0.0.1", port))


def test_a_model_directory_a_service_cannot_use_is_one_line_not_a_traceback(tiny_llama, tmp_path: Path) -> None:
    """As a bad setting is: ``dlora serve`` (and so ``dlora up``'s log) names the problem in a line."""
    model = tmp_path / "model"
    model.mkdir()
    for f in ("config.json", "tokenizer.json", "tokenizer_config.json"):  # no weights
        (model / f).write_bytes((tiny_llama.model / f).read_bytes())
    cli = [sys.executable, "-m", "dlora.services.cli", "serve", "worker", "--model", str(model)]
    env = {**os.environ, "DLORA_NATS_URL": "nats://127.0.0.1:1", "DLORA_REDIS_URL": "redis://127.0.0.1:1/0"}
    r = subprocess.run(cli, capture_output=True, text=True, timeout=120, cwd=tmp_path, env=env)  # the engine first
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert (
        r.stderr.startswith(f"dlora serve worker: the engine cannot start on {model}: ") and "safetensors" in r.stderr
    )


def test_dlora_up_serves_the_model_its_settings_file_names(tmp_path: Path) -> None:
    """A ``model`` in the file was overridden by the demo model (dlora up passes one model to
    every service), and the banner said only "model model"."""
    import pytest

    from dlora.common.settings import SettingsError
    from dlora.services.launcher import LocalStack

    config = tmp_path / "dlora.toml"
    for text in (
        'model = "/models/base"\n',
        '[gateway]\nmodel = "/models/base"\n',
        '[worker]\nmodel = "/models/base"\n',
    ):
        config.write_text(text)
        assert LocalStack(1, None, [], free_port(), str(config)).model == "/models/base", text
    assert LocalStack(1, "/other", [], free_port(), str(config)).model == "/other"  # the command line wins
    config.write_text("")
    assert LocalStack(1, None, [], free_port(), str(config)).model is None  # the demo model
    config.write_text('[gateway]\nmodel = "/models/a"\n[worker]\nmodel = "/models/b"\n')
    with pytest.raises(SettingsError, match="different models"):  # one model for every service
        LocalStack(1, None, [], free_port(), str(config))


async def test_dlora_up_against_another_dlora_ups_nats_and_redis_names_its_workers_past_theirs(
    tiny_llama, nats_server, redis_server, redis, monkeypatch
) -> None:
    """A helper's probe: ``dlora up`` twice against one NATS and Redis started worker-0 each time;
    both ran every request sent to it (now the second's refuses to start: one_id.py, and dlora up
    stopped). A live worker-0 in the Redis given, this stack's worker is worker-1, and it serves."""
    import asyncio

    from dlora.common.messages import WorkerStats
    from dlora.common.state import StateStore
    from dlora.services.launcher import LocalStack
    from dlora.services.stack_start import worker_ids

    assert worker_ids(2, {"worker-0", "worker-2"}) == ["worker-1", "worker-3"]
    assert worker_ids(2, set()) == ["worker-0", "worker-1"]
    store = StateStore(redis)
    other = WorkerStats(
        worker="worker-0", running=0, waiting=0, free_blocks=1, total_blocks=1, block_size=16, max_loras=1
    )
    # A crashed one's key, expiring as this stack starts: the stack waited for two live workers (the
    # gateway counts every one) and, only its own left, gave up after 180 s (a review).
    await store.heartbeat(other, ttl_s=2.0)
    monkeypatch.setenv("DLORA_NATS_URL", nats_server.url)
    monkeypatch.setenv("DLORA_REDIS_URL", redis_server.url)
    given = {"DLORA_ADMIN_KEY": "key-in-env"}  # (given in env=, it reached every service: as one of os.environ, not)
    worker_env = {"DLORA_TORCH_THREADS": "1", **STACK_KV_ENV}
    stack = LocalStack(1, str(tiny_llama.model), [], free_port(), None, worker_env, given)
    try:
        await asyncio.to_thread(stack.start)
        assert stack.names == ["dispatcher", "migrator", "worker-1", "gateway"] and stack.admin_key == "key-in-env"
        assert "worker-1" in {w.worker for w in await store.live_workers()}
        # the admin key only in the gateway's environment (every service's had it)
        environs = [Path(f"/proc/{p.pid}/environ").read_bytes().split(b"\0") for p in stack.procs]
        assert [any(v.startswith(b"DLORA_ADMIN_KEY=") for v in e) for e in environs] == [False] * 3 + [True]
    finally:
        await asyncio.to_thread(stack.stop)


def test_dlora_up_prints_the_logins_it_made_and_a_given_url_without_its_password() -> None:
    """Against a nats_url and redis_url it was given, dlora up printed them whole, passwords in
    them, beside "admin key: $DLORA_ADMIN_KEY" (a given key is never printed)."""
    from dlora.services import launcher

    stack = launcher.LocalStack(1, None, [], free_port(), None)
    stack.nats_url, stack.redis_url = "nats://u:s3cret@h1:4222,nats://u:s3cret@h2:4222", "redis://u:s3cret@h:6379/0"
    stack.nats_passwords, stack.role_env = {}, {"gateway": {}}
    assert stack.shown_logins() == ("nats://u:***@h1:4222,nats://u:***@h2:4222", "redis://u:***@h:6379/0")
    stack.nats_url, stack.redis_url = "nats://127.0.0.1:4222", "redis://127.0.0.1:6379/0"
    stack.nats_passwords = {launcher.APP_USER: "made"}
    stack.role_env = {"gateway": {"DLORA_REDIS_USERNAME": "dlora", "DLORA_REDIS_PASSWORD": "made2"}}
    assert stack.shown_logins() == (
        f"nats://{launcher.APP_USER}:made@127.0.0.1:4222",
        "redis://dlora:made2@127.0.0.1:6379/0",
    )


def test_nats_usual_port_taken_since_it_was_found_free_is_left_for_a_free_one() -> None:
    """The suite's two ``dlora up`` tests, side by side, each found NATS's usual port free and
    started their nats-server there; the one that lost the race failed ("nats-server exited with
    status 1"). A port taken meanwhile is left for any free one."""
    with socket.socket() as held:  # bound, not listening: nats-server cannot bind it, nobody answers
        held.bind(("127.0.0.1", 0))
        taken = held.getsockname()[1]
        server = start_nats_preferring(taken, {"u": "p"}, None)
        try:
            assert server.proc.poll() is None and not server.url.endswith(f":{taken}")
        finally:
            server.stop()


def test_the_stacks_own_environment_is_read_as_its_services_read_it() -> None:
    """``LocalStack(env=...)`` gives every service those variables, but the launcher read its own
    settings from its process's environment alone: a gateway port given there was not the one it
    waited on for readiness (nor checked free), the gateway's shutdown timeout and the workers'
    drain bounded the stop at their defaults (a stop could kill workers still draining), and a
    model named there was not the one registered."""
    from dlora.services.launcher import LocalStack

    port = free_port()
    env = {
        "DLORA_GATEWAY_PORT": str(port),
        "DLORA_GATEWAY_SHUTDOWN_TIMEOUT_S": "7",
        "DLORA_WORKER_DRAIN_TIMEOUT_S": "45",
        "DLORA_MODEL": "/models/given",
    }
    stack = LocalStack(1, None, [], None, None, env=env)
    assert stack.url.endswith(f":{port}") and stack.base.shutdown_timeout_s == 7, (stack.url, stack.base)
    assert stack.model == "/models/given"
    stack.stop()  # (nothing started: the bounds it would stop with)
    assert stack.stopping is not None and stack.stopping.drain_s == 45
    assert LocalStack(1, None, [], port + 1, None, env=env).url.endswith(f":{port + 1}")  # its argument wins
