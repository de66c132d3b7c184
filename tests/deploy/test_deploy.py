"""dlora deployed as its users deploy it: ``dlora deploy install`` stages the units, systemd checks
them, and three hosts made of network namespaces run them — a control host (gateway,
dispatcher, migrator, NATS node, Redis primary, Sentinel) and two worker hosts (a worker, a NATS
node, a Sentinel each; the Redis replica on the second) — under streaming load from
``dlora loadgen`` while a worker host is cut off, then a NATS node and the Redis primary are
killed, and at last a worker is stopped as ``systemctl stop`` would (it drains). Every request must
complete, with every token it asked for, and every service must tell systemd it is ready
(``Type=notify``; each gets a ``$NOTIFY_SOCKET`` of the test's, as systemd gives one).

PID 1 here is not systemd, so the services are started by running each unit's ExecStart with its
Environment=, EnvironmentFile= and WorkingDirectory= (``units.command``), as root rather than as
the unit's User=."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dlora.model.make_tiny import TinyOutput
from dlora.services.servers import _binary
from tests.deploy import units
from tests.deploy.hosts import Network, available

ROOT = Path(__file__).resolve().parents[2]
VENV = Path(sys.executable).parent.parent
ADMIN_KEY = "deploy-test-admin"
TTL_S = 2.0  # heartbeat_ttl_s: a lost worker's requests move after this
GATEWAY_PORT = 8000
REQUESTS = 56  # at 2 req/s: sent over the 28 s the faults take


def test_install_stages_units_systemd_accepts_and_uninstall_removes_only_what_it_added(tmp_path: Path) -> None:
    prefix = tmp_path / "root"
    (prefix / "etc/dlora").mkdir(parents=True)
    (prefix / "etc/dlora/dlora.toml").write_text("# the operator's\n")  # never overwritten, never removed
    dlora = [str(VENV / "bin/dlora"), "deploy"]
    out = subprocess.run(
        [*dlora, "install", "--prefix", str(prefix), "--venv", str(VENV)], capture_output=True, text=True, check=True
    ).stdout
    assert "skipped outside /" in out and "next:" in out
    system = prefix / "etc/systemd/system"
    names = {p.name for p in system.iterdir()}
    assert names == {f"dlora-{s}.service" for s in ("gateway", "dispatcher", "migrator", "worker@")} | {"dlora.target"}
    assert (prefix / "etc/dlora/dlora.toml").read_text() == "# the operator's\n"
    worker = (system / "dlora-worker@.service").read_text()
    assert (
        f"ExecStart={VENV}/bin/dlora serve worker --worker-id %l-gpu%i --config {prefix}/etc/dlora/dlora.toml" in worker
    )
    assert "Environment=CUDA_VISIBLE_DEVICES=%i" in worker and "\nPrivateDevices=" not in worker
    for unit in sorted(system.iterdir()):  # every unit, as systemd itself reads it
        verify = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True)
        assert verify.returncode == 0 and not verify.stderr.strip(), (unit.name, verify.stderr)
    subprocess.run([*dlora, "uninstall", "--prefix", str(prefix)], capture_output=True, text=True, check=True)
    left = sorted(str(p.relative_to(prefix)) for p in prefix.rglob("*"))
    assert left == ["etc", "etc/dlora", "etc/dlora/dlora.toml"], left


def _config(net: Network, tiny: TinyOutput) -> str:
    a = net.hosts
    nats = ",".join(f"nats://{a[h]}:4222" for h in ("ctl", "w1", "w2"))
    sentinels = ",".join(f"{a[h]}:26379" for h in ("ctl", "w1", "w2"))
    return f"""
nats_url = "{nats}"
redis_url = "redis+sentinel://{sentinels}/dlora/0"
nats_kv_replicas = 3
heartbeat_ttl_s = {TTL_S}
model = "{tiny.model}"

[gateway]
host = "0.0.0.0"
port = {GATEWAY_PORT}
admin_key = "{ADMIN_KEY}"
adapter_roots = ["{tiny.adapters_dir}"]

[worker]
torch_threads = 1
stats_interval_s = 0.2

[worker.engine]
device = "cpu"
dtype = "float32"
max_loras = 2
"""


def _start_servers(net: Network, work: Path) -> dict[str, units.Command]:
    """Three clustered NATS nodes, the Redis primary (ctl) and replica (w2), a Sentinel per host,
    each from the shipped configs with this network's addresses."""
    deploy = ROOT / "deploy"
    users = (deploy / "nats/dlora-users.conf").read_text()
    passwords = {var: f"pw-{var.lower()}" for var in set(re.findall(r"\$(DLORA_NATS_\w+_PASSWORD)", users))}
    env = {**os.environ, **passwords}
    a = net.hosts
    for i, host in enumerate(("ctl", "w1", "w2"), start=1):
        conf = (deploy / "nats/nats-server.conf").read_text()
        for j, other in enumerate(("ctl", "w1", "w2"), start=1):
            conf = conf.replace(f"10.0.0.{j}:", f"{a[other]}:")
        conf = conf.replace("/var/lib/nats/jetstream", str(work / f"nats-{i}"))
        path = work / f"nats-{i}" / "nats-server.conf"
        path.parent.mkdir()
        path.write_text(conf)
        (path.parent / "dlora-users.conf").write_text(users)
        net.start(host, "nats", [_binary("nats-server"), "-c", str(path)], {**env, "DLORA_NATS_NODE": f"nats-{i}"})
        rconf = (deploy / "redis/sentinel.conf").read_text().replace("10.0.0.1", a["ctl"])
        rconf = rconf.replace("sentinel announce-ip " + a["ctl"], "sentinel announce-ip " + a[host])
        rconf = rconf.replace("down-after-milliseconds dlora 3000", "down-after-milliseconds dlora 2000")
        rconf = rconf.replace("failover-timeout dlora 30000", "failover-timeout dlora 5000")
        (work / f"sentinel-{host}.conf").write_text(rconf)
        net.start(host, "sentinel", [_binary("redis-server"), str(work / f"sentinel-{host}.conf"), "--sentinel"], env)
    for host, replica in (("ctl", False), ("w2", True)):
        conf = (
            (deploy / "redis/redis.conf")
            .read_text()
            .replace("replica-announce-ip 10.0.0.1", f"replica-announce-ip {a[host]}")
        )
        if replica:
            conf = conf.replace("# replicaof 10.0.0.1 6379", f"replicaof {a['ctl']} 6379")
        (work / f"redis-{host}").mkdir()
        (work / f"redis-{host}.conf").write_text(conf)
        argv = [_binary("redis-server"), str(work / f"redis-{host}.conf"), "--dir", str(work / f"redis-{host}")]
        net.start(host, "redis", [*argv, "--appendonly", "no"], env)
    for host in ("ctl", "w1", "w2"):
        net.wait_port(host, 4222)
        net.wait_port(host, 26379)
    net.wait_port("ctl", 6379)
    return {}


@pytest.mark.skipif(available() is not None, reason=str(available()))
def test_three_hosts_lose_a_worker_host_a_nats_node_and_the_redis_primary_without_losing_a_request(
    tmp_path: Path, tiny_llama: TinyOutput
) -> None:
    prefix, logs, work = tmp_path / "root", tmp_path / "logs", tmp_path / "work"
    logs.mkdir(), work.mkdir()
    dlora = str(VENV / "bin/dlora")
    subprocess.run(
        [dlora, "deploy", "install", "--prefix", str(prefix), "--venv", str(VENV)], check=True, capture_output=True
    )
    net = Network(logs)
    notify: dict[str, socket.socket] = {}
    try:
        net.open("ctl", "w1", "w2")
        (prefix / "etc/dlora/dlora.toml").write_text(_config(net, tiny_llama))
        for role in ("gateway", "dispatcher", "migrator", "worker"):  # each service its own NATS user
            env_file = prefix / "etc/dlora" / f"dlora-{role}.env"
            env_file.write_text(f"DLORA_NATS_USER={role}\nDLORA_NATS_PASSWORD=pw-dlora_nats_{role}_password\n")
        _start_servers(net, work)
        system = prefix / "etc/systemd/system"
        base = {k: v for k, v in os.environ.items() if not k.startswith("DLORA_")}

        def start_unit(host: str, unit: str, instance: str = "") -> None:
            c = units.command(system / unit, instance=instance, short_host=host, base_env=base)
            name = f"{host}/{unit.split('-')[1].split('@')[0].split('.')[0]}"
            notify[name] = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)  # as systemd listens
            notify[name].bind(str(work / f"notify-{len(notify)}"))
            env = {**c.env, "NOTIFY_SOCKET": notify[name].getsockname()}
            net.start(host, name.split("/")[1], c.argv, env, c.cwd)

        for host in ("w1", "w2"):
            start_unit(host, "dlora-worker@.service", instance="0")
        for service in ("dispatcher", "migrator", "gateway"):
            start_unit("ctl", f"dlora-{service}.service")
        url = f"http://{net.hosts['ctl']}:{GATEWAY_PORT}"
        net.run(
            "ctl",
            [
                sys.executable,
                "-c",
                _READY_AND_REGISTER,
                url,
                ADMIN_KEY,
                json.dumps({k: str(v) for k, v in tiny_llama.adapters.items()}),
            ],
            timeout=180,
        )

        out = tmp_path / "loadgen"
        load = net.start(
            "ctl",
            "loadgen",
            [
                dlora,
                "loadgen",
                "--target",
                url,
                "--requests",
                str(REQUESTS),
                "--rate",
                "2",
                "--lengths",
                "fixed",
                "--prompt-len",
                "12",
                "--output-len",
                "24",
                "--adapters",
                "3",
                "--max-retries",
                "3",
                "--seed",
                "7",
                "--out",
                str(out),
            ],
            {**base, "PYTHONUNBUFFERED": "1"},
        )
        t0 = time.monotonic()

        def at(s: float) -> None:
            time.sleep(max(0.0, t0 + s - time.monotonic()))

        # One fault at a time, each after the cluster recovered from the last (as a real pool
        # meets them).
        faults = []
        at(4)
        net.cut("w1")  # the whole host: its worker, NATS node and Sentinel
        faults.append(("w1 cut off", time.monotonic() - t0))
        at(4 + 3 * TTL_S + 2)  # well past the TTL: its worker was given up on
        net.cut("w1", off=False)
        faults.append(("w1 back", time.monotonic() - t0))
        at(14)
        next(p for p in net.procs if p.name == "ctl/nats").kill()
        faults.append(("NATS node on ctl killed", time.monotonic() - t0))
        at(19)
        next(p for p in net.procs if p.name == "ctl/redis").kill()
        faults.append(("Redis primary killed", time.monotonic() - t0))
        at(24)
        drained = next(p for p in net.procs if p.name == "w1/worker")
        drained.kill(signal.SIGTERM)  # systemctl stop dlora-worker@0 on w1: it drains, then exits
        faults.append(("worker on w1 stopped (SIGTERM)", time.monotonic() - t0))
        assert load.popen.wait(timeout=240) == 0, load.log.read_text()[-3000:]
        result = json.loads((out / "result.json").read_text())
        summary = result["summary"]
        master = net.run(
            "w2",
            [
                _binary("redis-cli"),
                "-p",
                "26379",
                "sentinel",
                "get-master-addr-by-name",
                "dlora",
            ],
        ).split()
        record = {
            "faults": faults,
            "summary": {
                k: summary[k] for k in ("sent", "completed", "failed", "lost", "retried", "short", "duration_s")
            },
            "e2e_p99_s": summary["e2e_s"].get("p99"),
            "ttft_p99_s": summary["ttft_s"].get("p99"),
            "redis_primary_after": master[0],
            "slowest": result["slowest"][:3],  # when they came, what they waited, why retried
        }
        (tmp_path / "deploy-figures.json").write_text(json.dumps(record, indent=1))
        print(json.dumps(record))
        assert summary["sent"] == REQUESTS and summary["completed"] == REQUESTS, summary
        assert summary["failed"] == 0 and summary["lost"] == 0 and summary["short"] == 0, summary
        # None went silent for long: not until the gateway's 60 s chunk timeout (then 503, retried:
        # "completed"), as requests dropped in silence or left on a lost worker's records once
        # did (30-60 s stalls in one run in three), nor until the gateway's check for a request
        # whose record went (2 checks 2 x TTL apart) was needed more than once in a row. Measured
        # after that fix: TTFT p99 2.6 s.
        assert summary["ttft_s"]["p99"] < 10 * TTL_S and summary["e2e_s"]["p99"] < 10 * TTL_S, summary
        assert master[0] == net.hosts["w2"], master  # the Sentinels promoted the replica
        assert drained.popen.wait(timeout=30) == 0
        # Type=notify: each service said READY=1 once serving; the stopped worker said STOPPING=1
        said = {name: _received(sock) for name, sock in notify.items()}
        assert all("READY=1" in lines for lines in said.values()), said
        assert "STOPPING=1" in said["w1/worker"], said
    except BaseException:
        for proc in net.procs:
            print(f"---- {proc.name} ----\n{proc.log.read_text()[-2500:]}")
        raise
    finally:
        net.close()
        for sock in notify.values():
            sock.close()


def _received(sock: socket.socket) -> list[str]:
    sock.setblocking(False)
    lines = []
    while True:
        try:
            lines += sock.recv(4096).decode().splitlines()
        except BlockingIOError:
            return lines


# Run inside the control host: wait until the gateway is ready with both workers, then register
# the adapters through its admin API, as an operator would.
_READY_AND_REGISTER = """
import json, sys, time, urllib.request
url, key, adapters = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
deadline = time.monotonic() + 150
while True:
    try:
        body = json.load(urllib.request.urlopen(url + "/readyz", timeout=2))
        if body.get("workers") == 2:
            break
    except Exception as e:
        body = repr(e)
    if time.monotonic() > deadline:
        sys.exit(f"gateway not ready: {body}")
    time.sleep(0.3)
for name, path in adapters.items():
    req = urllib.request.Request(url + "/v1/adapters", data=json.dumps({"name": name, "path": path}).encode(),
                                 headers={"Authorization": "Bearer " + key, "Content-Type": "application/json"})
    urllib.request.urlopen(req, timeout=30)
"""
