"""Hosts made of network namespaces for the deployment test: one switch namespace with a bridge,
and per host a namespace with one veth port on it and an address in a private /24 (the addresses
live inside these namespaces only). Processes run in a host with ``ip netns exec``; a host is cut
off by setting its switch port down. ``close`` kills every process and deletes every namespace,
whatever state the test left them in."""

from __future__ import annotations

import os
import shlex
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

SERVERS = ("nats", "sentinel", "redis")  # what the services use: stopped after them


def available() -> str | None:
    """Why namespaces cannot be made here, or None."""
    if os.geteuid() != 0:
        return "needs root (ip netns)"
    if not shutil.which("ip"):
        return "needs iproute2 (ip)"
    return None


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True)


@dataclass
class Process:
    name: str
    popen: subprocess.Popen
    log: Path

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.popen.poll() is None:
            os.killpg(self.popen.pid, sig)


@dataclass
class Network:
    logs: Path
    subnet: str = field(default_factory=lambda: f"10.{200 + os.getpid() % 50}.{os.getpid() % 250}")
    tag: str = field(default_factory=lambda: f"dl{os.getpid() % 100000}")
    hosts: dict[str, str] = field(default_factory=dict)  # name -> address
    procs: list[Process] = field(default_factory=list)

    @property
    def switch(self) -> str:
        return f"{self.tag}-sw"

    def ns(self, host: str) -> str:
        return f"{self.tag}-{host}"

    def port(self, host: str) -> str:
        return f"{self.tag}{host}"[-15:]  # an interface name has at most 15 characters

    def open(self, *hosts: str) -> None:
        _ip("netns", "add", self.switch)
        _ip("-n", self.switch, "link", "add", "br0", "type", "bridge")
        _ip("-n", self.switch, "link", "set", "br0", "up")
        for i, host in enumerate(hosts, start=1):
            ns, address = self.ns(host), f"{self.subnet}.{i}"
            _ip("netns", "add", ns)
            self.hosts[host] = address  # from here on close() deletes it
            _ip("-n", self.switch, "link", "add", self.port(host), "type", "veth", "peer", "name", "eth0", "netns", ns)
            _ip("-n", self.switch, "link", "set", self.port(host), "master", "br0", "up")
            _ip("-n", ns, "addr", "add", f"{address}/24", "dev", "eth0")
            _ip("-n", ns, "link", "set", "eth0", "up")
            _ip("-n", ns, "link", "set", "lo", "up")

    def cut(self, host: str, off: bool = True) -> None:
        """``host`` off the network (its processes run on, unreachable), or back on."""
        _ip("-n", self.switch, "link", "set", self.port(host), "down" if off else "up")

    def start(self, host: str, name: str, argv: list[str], env: dict[str, str], cwd: Path | None = None) -> Process:
        log = self.logs / f"{host}-{name}.log"
        with log.open("w") as out:
            out.write(f"$ {shlex.join(argv)}\n")
            out.flush()
            popen = subprocess.Popen(
                ["ip", "netns", "exec", self.ns(host), *argv],
                env=env,
                cwd=cwd,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        proc = Process(f"{host}/{name}", popen, log)
        self.procs.append(proc)
        return proc

    def run(self, host: str, argv: list[str], env: dict[str, str] | None = None, timeout: float = 60) -> str:
        """``argv`` in ``host`` to its end; its output. CalledProcessError (with the output) if it fails."""
        done = subprocess.run(
            ["ip", "netns", "exec", self.ns(host), *argv],
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if done.returncode:
            raise subprocess.CalledProcessError(done.returncode, argv, done.stdout, done.stderr)
        return done.stdout

    def wait_port(self, host: str, port: int, timeout: float = 20) -> None:
        probe = f"import socket; socket.create_connection(({self.hosts[host]!r}, {port}), timeout=0.5)"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                self.run(host, ["python3", "-c", probe], timeout=5)
                return
            except subprocess.CalledProcessError:
                time.sleep(0.2)
        raise TimeoutError(f"nothing listens on {host}:{port} after {timeout} s")

    def close(self) -> None:
        # The services first, then the servers they use (as systemd orders the stop): a gateway
        # whose NATS went first waited out the 10 s below before its SIGKILL.
        servers = [p for p in self.procs if p.name.split("/")[-1] in SERVERS]
        for group in ([p for p in self.procs if p not in servers], servers):
            for proc in group:
                proc.kill(signal.SIGTERM)
            deadline = time.monotonic() + 10
            for proc in group:
                try:
                    proc.popen.wait(timeout=max(0.1, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.popen.wait()
        for ns in [self.ns(h) for h in self.hosts] + [self.switch]:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
