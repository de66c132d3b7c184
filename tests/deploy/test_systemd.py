"""The shipped units started by a real systemd: systemd booted as PID 1 of its own PID, mount,
UTS and cgroup namespaces on this machine, whose own PID 1 is not systemd
(``tests/deploy/container.py``: nothing of the host changes). In it, as ``deploy/README.md`` says:
a virtualenv at ``/opt/dlora/venv`` (``_venv``), ``dlora deploy install --venv /opt/dlora/venv``
(the ``dlora`` user, the units exactly as shipped, ``daemon-reload``), a tiny random model and its
adapters in ``/var/lib/dlora/demo`` owned by ``dlora``, ``/etc/dlora/dlora.toml`` naming a NATS and
a Redis this test runs on loopback ports (the container shares this machine's network), the admin
key in ``/etc/dlora/dlora.env``; then ``systemctl enable`` of the gateway, the dispatcher, the
migrator and ``dlora-worker@0`` and ``systemctl start dlora.target``. It checks that:

- every unit reaches ``active``: they are Type=notify, so each sent ``READY=1`` (and a ``STATUS=``)
  from its main process (``NotifyAccess=main``), running as ``dlora``;
- the gateway answers a completion, of the base model and of an adapter registered through its
  admin API, with 200 and the tokens asked for;
- ``journalctl -u dlora-gateway -o json`` holds the service's own entries, each a JSON line with
  event, level and timestamp, from the unit's cgroup and the ``dlora`` uid;
- the hardening is in force on the running gateway, as systemd reports it (``systemctl show``)
  and as the kernel applies it (``/proc/<pid>``): no new privileges, no capability (bounding set
  and effective), a seccomp filter, the ``dlora`` uid and gid, ``$WATCHDOG_USEC`` (30 s),
  ``LimitNOFILE``; in its mount namespace, compared with the container's own, ``/usr``, ``/etc``
  and the venv read-only, ``/var/lib/dlora`` writable (a write tried in that namespace, as root:
  refused with EROFS in ``/etc/dlora``, done in ``/var/lib/dlora``), a private ``/tmp``, ``/home``
  and ``/root`` hidden, a ``/dev`` of its own;
- ``systemctl stop dlora-worker@0`` ends with the unit inactive after a clean exit (status 0,
  result ``success``), not failed.

What this machine cannot show, and why (nothing in the units is changed for it):

- ``MemoryMax=`` is parsed (``systemctl show``) but not enforced: the memory controller is bound
  to this machine's cgroup v1 hierarchy (``/sys/fs/cgroup/memory``, in use by its own PID 1), a
  controller attaches to one hierarchy only, so the cgroup2 tree the container's systemd runs on
  offers none to enable (its ``cgroup.controllers``: ``hugetlb`` only; cpu, io and pids are in
  v1 too). Where that tree has it, the test checks the gateway cgroup's ``memory.max``.
- ``LimitNOFILE=65536`` comes out as this machine's hard limit (20000): raising a hard limit takes
  CAP_SYS_RESOURCE, which this machine's sandbox leaves out of every process's bounding set,
  systemd's included, so systemd sets the closest value it can (``_nofile_possible``).
- The worker's ``/dev/nvidia*`` access: no GPU here (the worker runs on the CPU).
- A missed ``WATCHDOG=1`` restarting a unit: the units' 30 s / 120 s outlast the test; systemd
  arming the watchdog is checked, ``services/notify.py``'s tests cover the pings.
- The checkout's virtualenv is made from a Python under ``/root`` (pyenv), which ``ProtectHome=yes``
  rightly hides from the units; ``_venv`` shows that Python at ``/opt/dlora/python`` instead.
"""

from __future__ import annotations

import json
import resource
import secrets
import shutil
import sys
import sysconfig
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest

from dlora.loadgen.gpu_check import package_dirs
from dlora.model.make_tiny import TinyOutput
from dlora.services.servers import Server, free_port, start_nats, start_redis
from tests.deploy.container import Container, unavailable

ROOT = Path(__file__).resolve().parents[2]
SERVICES = ("dlora-gateway.service", "dlora-dispatcher.service", "dlora-migrator.service", "dlora-worker@0.service")
METRICS_UNITS = ("dlora-dispatcher", "dlora-migrator", "dlora-worker")  # each a DLORA_METRICS_PORT


def _venv(box: Container) -> None:
    """``/opt/dlora/venv`` in the container: a virtualenv of this test's Python holding this
    checkout's packages, as ``python3 -m venv /opt/dlora/venv`` and ``pip install`` make it on a
    host. This Python may live under ``/root`` (pyenv), which ``ProtectHome=yes`` hides from the
    units, as it should: so the Python is shown at ``/opt/dlora/python`` (its shared library found
    through ``ld.so.cache``, as for a Python installed system-wide). The new virtualenv reads the
    checkout's third-party packages from ``/opt/dlora/site`` (a path line, so the editable
    install's finder there, which names the checkout's own path, is not run) and holds ``dlora``
    itself, each package's folder of the checkout shown read-only under its installed name: a
    checkout under ``/tmp`` (a CI clone) would be hidden from the units by ``PrivateTmp=yes``."""
    version = f"python{sys.version_info.major}.{sys.version_info.minor}"
    base, site = Path(sys.base_prefix), Path(sysconfig.get_paths()["purelib"])
    venv_site = f"/opt/dlora/venv/lib/{version}/site-packages"
    box.run(["mkdir", "-p", "/opt/dlora/python", "/opt/dlora/site"])
    box.run(["mount", "--bind", "-o", "ro", str(base), "/opt/dlora/python"])
    box.run(["mount", "--bind", "-o", "ro", str(site), "/opt/dlora/site"])
    box.run([f"/opt/dlora/python/bin/{version}", "-m", "venv", "--without-pip", "/opt/dlora/venv"])
    box.path(f"{venv_site}/dlora-site.pth").write_text("/opt/dlora/site\n")
    for name, folder in package_dirs(ROOT).items():
        box.run(["mkdir", "-p", f"{venv_site}/dlora/{name}"])
        box.run(["mount", "--bind", "-o", "ro", str(folder), f"{venv_site}/dlora/{name}"])
    if sysconfig.get_config_var("Py_ENABLE_SHARED"):
        libdir = Path("/opt/dlora/python") / Path(sysconfig.get_config_var("LIBDIR")).relative_to(base)
        box.path("/etc/ld.so.conf.d/dlora-python.conf").write_text(f"{libdir}\n")
        box.run(["ldconfig", "-X"])
    script = box.path("/opt/dlora/venv/bin/dlora")  # as pip writes the console script
    script.write_text(
        "#!/opt/dlora/venv/bin/python\nimport sys\nfrom dlora.services.cli import main\nsys.exit(main())\n"
    )
    script.chmod(0o755)


def _config(nats: Server, redis: Server, gateway_port: int) -> str:
    return f"""
nats_url = "{nats.url}"
redis_url = "{redis.url}"
model = "/var/lib/dlora/demo/model"

[gateway]
host = "127.0.0.1"
port = {gateway_port}
adapter_roots = ["/var/lib/dlora/demo/adapters"]

[worker]
torch_threads = 1
stats_interval_s = 0.2

[worker.engine]
device = "cpu"
dtype = "float32"
num_blocks = 64
max_loras = 2
"""


def _show(box: Container, unit: str, *props: str) -> dict[str, str]:
    out = box.run(["systemctl", "show", unit, "-p", ",".join(props)]).stdout
    return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)


def _wait_active(box: Container, units: tuple[str, ...], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        states = {u: _show(box, u, "ActiveState", "SubState", "Result") for u in units}
        failed = {u: s for u, s in states.items() if s["ActiveState"] == "failed" or s["Result"] != "success"}
        assert not failed, failed
        if all(s["ActiveState"] == "active" for s in states.values()):
            return
        assert time.monotonic() < deadline, states
        time.sleep(0.2)


def _http(url: str, body: dict | None = None, key: str = "") -> tuple[int, dict]:
    headers = {"Content-Type": "application/json"} | ({"Authorization": f"Bearer {key}"} if key else {})
    data = json.dumps(body).encode() if body is not None else None
    try:
        with urllib.request.urlopen(urllib.request.Request(url, data=data, headers=headers), timeout=30) as r:
            return r.status, json.load(r)
    except urllib.error.HTTPError as e:
        return e.code, {"error": e.read().decode(errors="replace")}


def _wait_ready(url: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            status, body = _http(url + "/readyz")
            if status == 200 and body.get("workers") == 1:
                return
        except OSError as e:
            body = {"error": repr(e)}
        assert time.monotonic() < deadline, body
        time.sleep(0.2)


def _nofile_possible(wanted: int) -> int:
    """What systemd can set ``LimitNOFILE=wanted`` to here: raising a hard limit takes
    CAP_SYS_RESOURCE, and without it (this machine's sandbox withholds it from every process,
    systemd's too) systemd sets the closest it can, the hard limit it inherited."""
    bounding = int(
        next(line for line in Path("/proc/self/status").read_text().splitlines() if line.startswith("CapBnd:")).split()[
            1
        ],
        16,
    )
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    return wanted if bounding >> 24 & 1 or hard == resource.RLIM_INFINITY or hard >= wanted else hard


@dataclass(frozen=True)
class Mount:
    device: str  # major:minor of its filesystem
    root: str  # the directory of that filesystem mounted here
    options: list[str]  # per-mount: ro or rw, ...


def _mounts(box: Container, pid: str) -> dict[str, Mount]:
    """Mount point -> its mount, in ``pid``'s mount namespace (the topmost where mounts stack)."""
    mounts = {}
    for line in box.path(f"/proc/{pid}/mountinfo").read_text().splitlines():
        fields = line.split()
        mounts[fields[4]] = Mount(fields[2], fields[3], fields[5].split(","))
    return mounts


def _on(mounts: dict[str, Mount], path: str) -> Mount:
    """The mount ``path`` lies on: the one with the longest mount point above it."""
    return mounts[max((m for m in mounts if path == m or path.startswith(m.rstrip("/") + "/")), key=len)]


@pytest.mark.slow
@pytest.mark.skipif(unavailable() is not None, reason=f"systemd cannot be booted here: {unavailable()}")
def test_units_under_a_real_systemd_start_serve_log_json_are_hardened_and_stop_cleanly(
    tmp_path: Path, tiny_llama: TinyOutput
) -> None:
    nats, redis = start_nats(), start_redis()
    box = Container(tmp_path / "container", keep=(ROOT, Path(sys.prefix)))  # a clone under /tmp (CI)
    try:
        box.boot()
        _venv(box)
        # as deploy/README.md, section 3
        out = box.run(["/opt/dlora/venv/bin/dlora", "deploy", "install", "--venv", "/opt/dlora/venv"]).stdout
        assert "next: " in out and "systemctl enable --now dlora.target" in out, out
        for unit in (ROOT / "deploy/systemd").iterdir():  # the units as shipped, /opt/dlora/venv and all
            assert (box.path("/etc/systemd/system") / unit.name).read_text() == unit.read_text(), unit.name
        uid, gid = (int(box.run(["id", flag, "dlora"]).stdout) for flag in ("-u", "-g"))
        assert box.run(["getent", "passwd", "dlora"]).stdout.strip().endswith(":/var/lib/dlora:/usr/sbin/nologin")

        demo = box.path("/var/lib/dlora/demo")
        shutil.copytree(tiny_llama.model, demo / "model")
        shutil.copytree(tiny_llama.adapters_dir, demo / "adapters")
        box.run(["chown", "-R", "dlora:dlora", "/var/lib/dlora/demo"])
        gateway_port, admin_key = free_port(), secrets.token_urlsafe(16)
        etc = box.path("/etc/dlora")
        (etc / "dlora.toml").write_text(_config(nats, redis, gateway_port))
        env_files = {"dlora.env": f"DLORA_GATEWAY_ADMIN_KEY={admin_key}\n"}
        for unit_prefix in METRICS_UNITS:  # off the units' fixed metrics ports: other tests run beside
            env_files[f"{unit_prefix}.env"] = f"DLORA_METRICS_PORT={free_port()}\n"
        for name, text in env_files.items():
            (etc / name).write_text(text)
            (etc / name).chmod(0o600)

        # as deploy/README.md, section 4: the target brings up what is enabled under it
        box.run(["systemctl", "enable", *SERVICES, "dlora.target"])
        t0 = time.monotonic()
        box.run(["systemctl", "start", "dlora.target"])
        _wait_active(box, SERVICES, timeout=150)
        started_s = time.monotonic() - t0
        assert _show(box, "dlora.target", "ActiveState") == {"ActiveState": "active"}
        for unit in SERVICES:
            shown = _show(box, unit, "Type", "NotifyAccess", "StatusText", "MainPID")
            assert shown["Type"] == "notify" and shown["NotifyAccess"] == "main", shown
            assert shown["StatusText"], shown  # the STATUS= line sent with READY=1

        url = f"http://127.0.0.1:{gateway_port}"
        _wait_ready(url, timeout=60)
        adapter = sorted(tiny_llama.adapters)[0]
        status, body = _http(
            url + "/v1/adapters", {"name": adapter, "path": f"/var/lib/dlora/demo/adapters/{adapter}"}, admin_key
        )
        assert status in (200, 201), body
        for model in ("model", adapter):
            # ignore_eos: sampled at temperature 1, the random model ends early ~0.06-0.3 % of the time
            completion = {"model": model, "prompt": "Hello there", "max_tokens": 6, "ignore_eos": True}
            status, body = _http(url + "/v1/completions", completion)
            assert status == 200, body
            assert body["usage"]["completion_tokens"] == 6 and body["choices"][0]["text"], body

        # the journal: JSON lines from the service, kept with the unit's fields
        entries = [
            json.loads(line)
            for line in box.run(["journalctl", "-u", "dlora-gateway", "-o", "json", "--no-pager"]).stdout.splitlines()
        ]
        own = [e for e in entries if e.get("SYSLOG_IDENTIFIER") == "dlora-gateway"]  # not systemd's about it
        assert own and all(e["_SYSTEMD_UNIT"] == "dlora-gateway.service" and e["_UID"] == str(uid) for e in own)
        logged = [json.loads(e["MESSAGE"]) for e in own]
        assert all({"event", "level", "timestamp"} <= set(m) for m in logged), logged[-5:]
        assert any(m["event"] == "gateway ready" and m["level"] == "info" for m in logged), logged

        # the hardening, as systemd set it and as the kernel applies it to the running gateway
        props = _show(
            box,
            "dlora-gateway.service",
            "NoNewPrivileges",
            "ProtectSystem",
            "ProtectHome",
            "PrivateTmp",
            "PrivateDevices",
            "CapabilityBoundingSet",
            "RestrictAddressFamilies",
            "User",
            "MemoryMax",
            "WatchdogUSec",
            "LimitNOFILE",
            "MainPID",
            "ControlGroup",
        )
        assert props["NoNewPrivileges"] == "yes" and props["ProtectSystem"] == "strict", props
        assert props["ProtectHome"] == "yes" and props["PrivateTmp"] == "yes" and props["PrivateDevices"] == "yes"
        assert props["CapabilityBoundingSet"] == "" and props["User"] == "dlora", props
        assert set(props["RestrictAddressFamilies"].split()) == {"AF_INET", "AF_INET6", "AF_UNIX"}, props
        assert props["MemoryMax"] == str(8 << 30) and props["WatchdogUSec"] == "30s", props
        pid = props["MainPID"]
        status_lines = dict(
            line.split(":\t", 1) for line in box.path(f"/proc/{pid}/status").read_text().splitlines() if ":\t" in line
        )
        assert status_lines["NoNewPrivs"] == "1" and status_lines["Seccomp"] == "2", status_lines
        assert int(status_lines["CapBnd"], 16) == 0 and int(status_lines["CapEff"], 16) == 0, status_lines
        assert status_lines["Uid"].split()[0] == str(uid) and status_lines["Gid"].split()[0] == str(gid)
        limits = box.path(f"/proc/{pid}/limits").read_text().splitlines()
        nofile = next(line for line in limits if line.startswith("Max open files")).split()[3:5]
        assert nofile == [str(_nofile_possible(65536))] * 2, (props["LimitNOFILE"], nofile)  # LimitNOFILE=65536
        environ = dict(
            item.split("=", 1) for item in box.path(f"/proc/{pid}/environ").read_bytes().decode().split("\0") if item
        )
        assert environ["WATCHDOG_USEC"] == "30000000" and environ["NOTIFY_SOCKET"], environ
        # its mount namespace against the container's own (PID 1's), where none of this holds
        mounts, host = _mounts(box, pid), _mounts(box, "1")
        for path in ("/usr", "/etc/dlora", "/opt/dlora/venv"):  # ProtectSystem=strict
            assert "ro" in _on(mounts, path).options and "rw" in _on(host, path).options, path
        assert "rw" in _on(mounts, "/var/lib/dlora").options  # ReadWritePaths=/var/lib/dlora
        tmp = _on(mounts, "/tmp")  # PrivateTmp: a directory of its own, not the container's /tmp
        assert "systemd-private-" in tmp.root and "-dlora-gateway.service-" in tmp.root, tmp
        for path in ("/home", "/root"):  # ProtectHome: an inaccessible mount over each
            assert _on(mounts, path) != _on(host, path), path
        assert _on(mounts, "/dev").device != _on(host, "/dev").device  # PrivateDevices: a /dev of its own
        # a write, tried in the gateway's mount namespace: refused by the read-only mount, not by
        # permissions (as root), and allowed where ReadWritePaths= says
        probe = box.run(["nsenter", "-t", pid, "-m", "--", "touch", "/etc/dlora/probe"], check=False)
        assert probe.returncode != 0 and "Read-only file system" in probe.stderr, probe
        box.run(["nsenter", "-t", pid, "-m", "--", "touch", "/var/lib/dlora/probe"])
        root = box.path("/sys/fs/cgroup")
        if "memory" in (root / "cgroup.controllers").read_text().split():
            memory_max = (root / props["ControlGroup"].lstrip("/") / "memory.max").read_text().strip()
            assert memory_max == str(8 << 30), memory_max

        # systemctl stop: the worker drains and exits 0; the unit is inactive, not failed
        box.run(["systemctl", "stop", "dlora-worker@0"], timeout=90)
        stopped = _show(box, "dlora-worker@0.service", "ActiveState", "Result", "ExecMainCode", "ExecMainStatus")
        assert stopped == {"ActiveState": "inactive", "Result": "success", "ExecMainCode": "1", "ExecMainStatus": "0"}
        assert box.run(["systemctl", "is-failed", "dlora-worker@0"], check=False).returncode != 0
        print(json.dumps({"units_active_s": round(started_s, 1)}))
    except BaseException:
        if box.pid:
            print(box.run(["journalctl", "--no-pager", "-o", "short-monotonic", "-n", "300"], check=False).stdout)
        print(box.console.read_text()[-3000:] if box.console.exists() else "")
        raise
    finally:
        box.close()
        nats.stop()
        redis.stop()
    assert not (tmp_path / "container").exists() and box.cgroup is not None and not box.cgroup.exists()
