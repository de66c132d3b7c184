"""How `dlora up` stops its services: in the order a request's path needs them, sooner at a second
Ctrl-C. Its services are stand-ins here that note each signal they get (a real worker's drain is
tested in test_drain.py and test_stop_bounds.py), but where ``dlora up`` itself is killed outright
or hung up on: a real stack on the tiny model, whose children and servers go with it."""

from __future__ import annotations

import contextlib
import os
import select
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dlora.model.make_tiny import TinyOutput
from dlora.services.servers import free_port
from tests.integration.conftest import STACK_KV_ENV

# A service that notes "<name> term|exit <time>" per SIGTERM in its log: the gateway, the dispatcher
# and the migrator exit at the first; a worker drains (runs on) until a second, as a real one does
# with requests to finish (at the first, given "idle").
SERVICE = """
import signal, sys, time
log, name, terms = sys.argv[1], sys.argv[2], []
def note(what):
    with open(log, "a") as f:
        f.write(f"{name} {what} {time.time()}\\n")
def on_term(*_):
    terms.append(1)
    note("term")
    if not name.startswith("worker-") or len(terms) >= 2 or "idle" in sys.argv:
        note("exit")
        sys.exit(0)
signal.signal(signal.SIGTERM, on_term)
signal.signal(signal.SIGINT, signal.SIG_IGN)
note("up")
while True:
    time.sleep(0.05)
"""

# ``dlora up`` itself, its start() replaced by one that starts the stand-ins.
UP = """
import sys
from pathlib import Path
from dlora.services import launcher, up

def start(self):
    for name in ("dispatcher", "migrator", "worker-0", "worker-1", "gateway"):
        self._spawn(name, [sys.executable, sys.argv[1], sys.argv[2], name, *sys.argv[4:]], {})
    self.model_dir, self.loras, self.admin_key, self.admin_key_given = Path("model"), {}, "k", False
    self.nats_url, self.redis_url, self.nats_passwords, self.role_env = "nats://x", "redis://x", {}, {"gateway": {}}
    self.up = True

launcher.LocalStack.start = start
sys.exit(up.up(2, "model", [], int(sys.argv[3]), None))
"""


def _events(log: Path) -> list[tuple[str, str, float]]:
    return [(n, what, float(t)) for n, what, t in (line.split() for line in log.read_text().splitlines())]


def test_dlora_up_stops_workers_before_the_dispatcher_and_hurries_them_at_a_second_ctrl_c(tmp_path: Path) -> None:
    """All told at once, the dispatcher went with the workers and a draining worker's hand-over had
    nobody to take it; a second Ctrl-C to dlora up reached no worker (each drained on, until dlora up
    killed it outright at 10 s, its requests neither finished nor handed over). The gateway and the
    workers are told first, the dispatcher and the migrator once the workers are gone, and a second
    Ctrl-C is passed on: the workers hand over and exit at once."""
    from dlora.services.servers import free_port

    service, up, log = tmp_path / "service.py", tmp_path / "up.py", tmp_path / "log"
    service.write_text(SERVICE)
    up.write_text(UP)
    env = {**os.environ, "DLORA_WORKER_DRAIN_TIMEOUT_S": "60"}  # drains longer than the test waits
    cmd = [sys.executable, str(up), str(service), str(log), str(free_port())]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while (not log.exists() or log.read_text().count(" up ") < 5) and time.monotonic() < deadline:
            time.sleep(0.1)
        proc.send_signal(signal.SIGINT)
        while not any(e[:2] == ("worker-1", "term") for e in _events(log)) and time.monotonic() < deadline:
            time.sleep(0.1)
        time.sleep(1.0)  # the workers drain; the dispatcher must still run, untold
        told = {n for n, what, _ in _events(log) if what == "term"}
        assert told == {"gateway", "worker-0", "worker-1"}, _events(log)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, err
    assert "a second Ctrl-C or SIGTERM" in err
    events = _events(log)
    # Each worker exited on its second SIGTERM (the stand-in notes "exit" only then): not drained
    # on to its 60 s, nor killed (which notes nothing). Told so by what they did, not how soon.
    for worker in ("worker-0", "worker-1"):
        assert [what for n, what, _ in events if n == worker] == ["up", "term", "term", "exit"], events
    workers_gone = max(t for n, what, t in events if n.startswith("worker-") and what == "exit")
    for name in ("dispatcher", "migrator"):
        assert next(t for n, what, t in events if n == name and what == "term") >= workers_gone, events


def test_a_draining_worker_is_given_its_drain_before_it_is_killed(tmp_path: Path) -> None:
    """dlora up killed a stopping service after 10 s, which is the workers' own drain_timeout_s by
    default: a worker that drained that long was killed while it handed its requests over. A
    worker is given its drain and the 10 s beyond it (without a hurry)."""
    from dlora.services import stack_stop
    from dlora.services.launcher import LocalStack
    from dlora.services.servers import free_port

    log = tmp_path / "log"
    (service := tmp_path / "service.py").write_text(SERVICE)
    stack = LocalStack(1, "model", [], free_port(), None, worker_env={"DLORA_WORKER_DRAIN_TIMEOUT_S": "30"})
    for name in ("dispatcher", "worker-0", "gateway"):
        stack._spawn(name, [sys.executable, str(service), str(log), name], {})
    deadline = time.monotonic() + 60
    while (not log.exists() or log.read_text().count(" up ") < 3) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert stack_stop.workers_drain_s(None, stack.worker_env) == 30
    stop = stack_stop.StackStop(stack.procs, stack.names, 30)
    stop._tell([0, 1, 2])
    assert stop._deadline[1] - stop._told[1] == 30 + stack_stop.STOP_WAIT_S  # the worker
    assert stop._deadline[2] - stop._told[2] == stack_stop.STOP_WAIT_S  # the gateway
    stop.hurry()  # too soon after the first to be sure it is not merged with it: sent once told a while
    stop._wait([0, 1, 2])
    assert [what for n, what, _ in _events(log) if n == "worker-0"] == ["up", "term", "term", "exit"]
    assert all(p.returncode == 0 for p in stack.procs)


def test_a_gateway_finishing_its_requests_is_given_its_shutdown_timeout_before_it_is_killed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A gateway with ``shutdown_timeout_s`` lets the requests it took finish for that long: dlora
    up killed it 10 s after its SIGTERM whatever the setting, its clients' connections reset
    mid-answer. It is given its timeout and the 10 s beyond it; a second Ctrl-C takes it back."""
    from dlora.services import stack_stop
    from dlora.services.launcher import LocalStack
    from dlora.services.servers import free_port

    monkeypatch.setenv("DLORA_GATEWAY_SHUTDOWN_TIMEOUT_S", "30")
    log = tmp_path / "log"
    (service := tmp_path / "service.py").write_text(SERVICE)
    stack = LocalStack(1, "model", [], free_port(), None)
    assert stack.base.shutdown_timeout_s == 30  # what stop() gives StackStop
    for name in ("dispatcher", "worker-0", "gateway"):
        stack._spawn(name, [sys.executable, str(service), str(log), name, "idle"], {})
    deadline = time.monotonic() + 60
    while (not log.exists() or log.read_text().count(" up ") < 3) and time.monotonic() < deadline:
        time.sleep(0.1)
    stop = stack_stop.StackStop(stack.procs, stack.names, 5, stack.base.shutdown_timeout_s)
    stop._tell([1, 2])
    assert stop._deadline[2] - stop._told[2] == 30 + stack_stop.STOP_WAIT_S  # the gateway
    assert stop._deadline[1] - stop._told[1] == 5 + stack_stop.STOP_WAIT_S  # the worker, as before
    stop.hurry()
    assert stop._deadline[2] - time.monotonic() <= stack_stop.STOP_WAIT_S
    stop._wait([1, 2])
    stop._tell([0])
    stop._wait([0])
    assert all(p.returncode == 0 for p in stack.procs)


def test_dlora_up_whose_terminal_goes_away_stops_in_order_and_exits_cleanly(tmp_path: Path) -> None:
    """A terminal closed (an ssh session dropped) sends its session SIGHUP, and writes to it fail
    with EIO from then on: the line dlora up says at the stop raised, and dlora up ended with a
    traceback (exit 1) instead of 0. Pipes, as the other tests use, never fail so: a real terminal."""
    import fcntl
    import pty
    import termios

    from dlora.services.servers import free_port

    service, up, log = tmp_path / "service.py", tmp_path / "up.py", tmp_path / "log"
    service.write_text(SERVICE)
    up.write_text(UP)
    master, slave = pty.openpty()

    def own_terminal() -> None:  # (after setsid: the terminal on stdin becomes the session's)
        fcntl.ioctl(0, termios.TIOCSCTTY, 0)

    cmd = [sys.executable, str(up), str(service), str(log), str(free_port()), "idle"]
    proc = subprocess.Popen(
        cmd, stdin=slave, stdout=slave, stderr=slave, start_new_session=True, preexec_fn=own_terminal
    )
    os.close(slave)
    try:
        deadline = time.monotonic() + 60
        while (not log.exists() or log.read_text().count(" up ") < 5) and time.monotonic() < deadline:
            time.sleep(0.1)
            with contextlib.suppress(OSError):  # (read what it writes, as a terminal would)
                os.read(master, 65536) if select.select([master], [], [], 0)[0] else None
        os.close(master)  # the terminal goes away
        code = proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert code == 0
    events = _events(log)
    assert {n for n, what, _ in events if what == "exit"} == {
        "dispatcher",
        "migrator",
        "worker-0",
        "worker-1",
        "gateway",
    }


def _running(pid: int) -> bool:
    """Whether ``pid`` still runs (a zombie nobody reaped yet has stopped)."""
    state = subprocess.run(["ps", "-o", "stat=", "-p", str(pid)], capture_output=True, text=True).stdout.strip()
    return bool(state) and not state.startswith("Z")


def _up(tiny_llama: TinyOutput, cwd: Path, temp: Path) -> tuple[subprocess.Popen[str], int, str]:
    """``dlora up`` with one worker, in ``cwd`` with TMPDIR ``temp``, once it says it is up: the
    process, its gateway's port and what it printed (killed if it does not come up)."""
    port = free_port()
    cli = [sys.executable, "-m", "dlora.services.cli", "up", "--model", str(tiny_llama.model), "--workers", "1"]
    env = {**os.environ, "TMPDIR": str(temp), **STACK_KV_ENV}
    proc = subprocess.Popen(
        [*cli, "--port", str(port)], cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    assert proc.stdout is not None
    seen = ""
    while "dlora is up" not in seen and proc.poll() is None:
        seen += proc.stdout.readline()
    if "dlora is up" not in seen:
        proc.kill()
        raise AssertionError(seen + proc.communicate()[0])
    return proc, port, seen


def test_dlora_up_killed_outright_takes_its_services_and_servers_with_it(tiny_llama, tmp_path: Path) -> None:
    """A fresh user's trial: ``dlora up`` killed by SIGKILL (the OOM killer, ``kill -9``, a closed
    terminal's hard kill) left NATS, Redis and every service running in their own sessions, the
    gateway serving on its port, and the next ``make run`` refused that port as "another dlora up?"
    with none running. Its children now go with it."""
    proc, port, _ = _up(tiny_llama, tmp_path, tmp_path)  # (TMPDIR: the servers' folders, which nobody left removes)
    try:
        children = subprocess.run(["ps", "-o", "pid=", "--ppid", str(proc.pid)], capture_output=True, text=True)
        pids = [int(p) for p in children.stdout.split()]
        assert len(pids) >= 6, pids  # nats-server, redis-server, dispatcher, migrator, worker, gateway
    finally:
        proc.kill()
        proc.wait()
        proc.stdout.close()
    deadline = time.monotonic() + 120  # (children left running never go: the wait's length only ends it)
    while any(map(_running, pids)) and time.monotonic() < deadline:
        time.sleep(0.2)
    left = [p for p in pids if _running(p)]
    for p in left:  # this test's own leftovers, so that a failure leaves nothing behind
        os.kill(p, signal.SIGKILL)
    assert not left, f"still running after dlora up was killed: {left}"
    with socket.socket() as s:
        assert s.connect_ex(("127.0.0.1", port)) != 0


def test_dlora_up_stops_in_order_when_its_terminal_closes(tiny_llama, tmp_path: Path) -> None:
    """A closed terminal or a dropped ssh session sends SIGHUP, whose default action killed dlora up
    outright: its children went with it (PR_SET_PDEATHSIG), all at once, NATS and Redis under the
    services' stop, and the servers' folders stayed. It stops as at Ctrl-C."""
    temp = tmp_path / "tmp"
    temp.mkdir()
    proc, _, seen = _up(tiny_llama, tmp_path, temp)
    try:
        assert sorted(p.name.split("-")[1] for p in temp.iterdir()) == ["nats", "redis"]
        proc.send_signal(signal.SIGHUP)
        out, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, seen + out  # (as at Ctrl-C once up)
    assert not list(temp.iterdir())
