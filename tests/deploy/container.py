"""A real systemd, booted as PID 1 of new PID, mount, UTS and cgroup namespaces on this machine
(whose own PID 1 is not systemd), for the units to be started by systemd itself.

The host is left as it was: in the container's mount namespace every write to ``/etc``, ``/opt``
and ``/var`` lands in an overlay's upper directory under the work directory (the ``dlora`` user,
``/etc/dlora``, ``/opt/dlora``, ``/var/lib/dlora``, the journal's files), ``/run``, ``/tmp`` and
``/dev`` are its own (``/dev/log`` and ``/dev/console``, which systemd and journald create or write,
would otherwise be the host's), ``/proc/sys`` and ``/sys`` are read-only (PID 1 would otherwise
raise host-wide limits), and its cgroup tree is a subtree of the host's cgroup2 hierarchy made for
it and removed after it. systemd sees only a whitelist of unit files (the targets a boot reaches,
journald) and no generator: none of the host's installed services (redis-server, postgresql, ...),
none of its enabled units, no ``systemd-tmpfiles-setup`` (which would empty the host's ``/tmp``),
no sysctl, module or udev trigger services. ``container=`` tells systemd it runs in a container,
as systemd-nspawn does, so PID 1 itself loads no kernel module either.

``close`` kills the namespace's PID 1 with SIGKILL (SIGTERM would make systemd re-execute), which
ends every process in it, then removes the cgroups and the work directory; the PID 1 also gets
SIGKILL if the test process dies (``PR_SET_PDEATHSIG`` on unshare, ``--kill-child`` on systemd)."""

from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

SYSTEMD = Path("/lib/systemd/systemd")
UNIT_DIR = Path("/lib/systemd/system")
CGROUP_PREFIX = "dlora-systemd-test-"

# What a boot to basic.target needs, and journald; nothing else of the host's (see the module doc).
UNITS = (
    "basic.target",
    "sysinit.target",
    "local-fs-pre.target",
    "local-fs.target",
    "swap.target",
    "sockets.target",
    "timers.target",
    "paths.target",
    "slices.target",
    "network-pre.target",
    "network.target",
    "network-online.target",
    "multi-user.target",
    "shutdown.target",
    "umount.target",
    "final.target",
    "systemd-journald.service",
    "systemd-journald.socket",
)
WANTS = {"sysinit.target.wants": ("systemd-journald.service",), "sockets.target.wants": ("systemd-journald.socket",)}

# PID 1 of the namespaces. $1: the work directory.
BOOT = r"""
set -euo pipefail
W=$1
mount --make-rprivate /
for d in etc opt var; do
    mkdir -p "$W/upper/$d" "$W/overlay-work/$d"
    mount -t overlay overlay -o "lowerdir=/$d,upperdir=$W/upper/$d,workdir=$W/overlay-work/$d" "/$d"
done
mount --bind "$W/units" /lib/systemd/system
mount --bind "$W/empty" /lib/systemd/system-generators
mount --bind "$W/etc-systemd-system" /etc/systemd/system
# /dev of its own, as systemd-nspawn makes one (PID 1 logs to the journal, not to this console)
mount -t tmpfs -o mode=755,nosuid tmpfs "$W/dev"
for n in null zero full random urandom tty; do
    touch "$W/dev/$n"
    mount --bind "/dev/$n" "$W/dev/$n"
done
touch "$W/dev/console"
mount --bind "$W/console.log" "$W/dev/console"
mkdir "$W/dev/pts" "$W/dev/shm"
ln -s pts/ptmx "$W/dev/ptmx"
ln -s /proc/self/fd "$W/dev/fd"
mount --move "$W/dev" /dev
mount -t devpts -o newinstance,ptmxmode=0666,mode=620 devpts /dev/pts
mount -t tmpfs -o mode=1777,nosuid,nodev tmpfs /dev/shm
mount -t tmpfs -o mode=755,nosuid,nodev tmpfs /run
# A /tmp of its own, but the host's paths passed after the work directory (the checkout and its
# virtualenv, where a clone under /tmp puts them) shown at the same place, read-only.
mkdir /run/host-tmp
mount --bind /tmp /run/host-tmp
mount -t tmpfs -o mode=1777,nosuid,nodev tmpfs /tmp
for p in "${@:2}"; do
    mkdir -p "$p"
    mount --bind -o ro "/run/host-tmp/${p#/tmp/}" "$p"
done
umount /run/host-tmp
rmdir /run/host-tmp
mount -o remount,bind,ro /sys
mount -t cgroup2 cgroup2 /sys/fs/cgroup
mount --bind /proc/sys /proc/sys
mount -o remount,bind,ro /proc/sys
# the journal in /run only; the host's persistent one (/var/log/journal) out of sight
if [ -d /var/log/journal ]; then mount -t tmpfs -o mode=755 tmpfs /var/log/journal; fi
mkdir -p /run/systemd/journald.conf.d
printf '[Journal]\nStorage=volatile\n' > /run/systemd/journald.conf.d/volatile.conf
export container=dlora-test
exec /lib/systemd/systemd --system --log-target=journal --log-level=info --unit=basic.target
"""


def unavailable() -> str | None:
    """Why systemd cannot be booted in namespaces here, or None."""
    if os.geteuid() != 0:
        return "needs root (unshare, mount)"
    for tool in ("unshare", "nsenter", "mount"):
        if not shutil.which(tool):
            return f"needs {tool} (util-linux)"
    if not SYSTEMD.exists():
        return f"needs systemd ({SYSTEMD})"
    if _cgroup2_mount() is None:
        return "needs a cgroup2 hierarchy mounted on the host"
    if "overlay" not in Path("/proc/filesystems").read_text():
        return "needs overlayfs"
    return None


def _cgroup2_mount() -> Path | None:
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        fields = line.split(" - ")
        if len(fields) == 2 and fields[1].split()[0] == "cgroup2":
            return Path(fields[0].split()[4])
    return None


def _own_cgroup2(mount: Path) -> Path:
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        if line.startswith("0::"):
            return mount / line[3:].lstrip("/")
    return mount


def _remove_cgroup(path: Path, timeout: float = 10.0) -> None:
    """``path`` and every cgroup below it, deepest first, once their processes are gone."""
    deadline = time.monotonic() + timeout
    for sub in sorted((p for p in path.rglob("*") if p.is_dir()), key=lambda p: len(p.parts), reverse=True) + [path]:
        while True:
            try:
                sub.rmdir()
                break
            except FileNotFoundError:
                break
            except OSError:  # EBUSY: a killed process not reaped yet
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)


def _die_with_parent() -> None:
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


@dataclass
class Container:
    work: Path  # made by boot, removed by close
    keep: tuple[Path, ...] = ()  # host paths under /tmp shown inside at the same place (read-only)
    pid: int = field(default=0, init=False)  # PID 1 of the namespaces, as this machine numbers it
    unshare: subprocess.Popen | None = field(default=None, init=False)
    cgroup: Path | None = field(default=None, init=False)
    closed: bool = field(default=False, init=False)

    @property
    def console(self) -> Path:
        return self.work / "console.log"

    def boot(self, timeout: float = 60.0) -> None:
        """Start systemd and wait until it finished booting (``running`` or ``degraded``)."""
        self.work.mkdir(parents=True, exist_ok=True)
        units = self.work / "units"
        units.mkdir()
        for name in UNITS:
            if (UNIT_DIR / name).exists():
                shutil.copy(UNIT_DIR / name, units / name)
        for wants, names in WANTS.items():
            (units / wants).mkdir()
            for name in names:
                (units / wants / name).symlink_to(f"../{name}")
        (units / "default.target").symlink_to("basic.target")
        for d in ("empty", "etc-systemd-system", "dev"):
            (self.work / d).mkdir()
        self.console.touch()
        (self.work / "boot.sh").write_text(BOOT)
        mount = _cgroup2_mount()
        assert mount is not None
        for stale in _own_cgroup2(mount).glob(CGROUP_PREFIX + "*"):  # of a run killed before its cleanup
            if not (Path("/proc") / stale.name.removeprefix(CGROUP_PREFIX)).exists():
                with contextlib.suppress(OSError):
                    _remove_cgroup(stale, timeout=1)
        self.cgroup = _own_cgroup2(mount) / f"{CGROUP_PREFIX}{os.getpid()}"
        self.cgroup.mkdir()
        with self.console.open("a") as out:
            self.unshare = subprocess.Popen(
                # into the cgroup made for it first: unshare --cgroup makes that the container's root
                [
                    "bash",
                    "-c",
                    'echo $$ > "$0/cgroup.procs" && exec "$@"',
                    str(self.cgroup),
                    "unshare",
                    "--pid",
                    "--kill-child=SIGKILL",
                    "--mount",
                    "--mount-proc",
                    "--uts",
                    "--cgroup",
                    "--propagation",
                    "private",
                    "bash",
                    str(self.work / "boot.sh"),
                    str(self.work),
                    *(str(p) for p in self.keep if p.is_relative_to("/tmp")),
                ],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=_die_with_parent,
            )
        deadline = time.monotonic() + timeout
        while not self.pid:
            children = Path(f"/proc/{self.unshare.pid}/task/{self.unshare.pid}/children")
            if children.exists() and children.read_text().split():
                self.pid = int(children.read_text().split()[0])
            elif self.unshare.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"systemd did not start:\n{self.console.read_text()[-3000:]}")
            else:
                time.sleep(0.02)
        while True:
            state = self.run(["systemctl", "is-system-running"], check=False).stdout.strip()
            if state in ("running", "degraded"):
                return
            if self.unshare.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"systemd did not finish booting ({state}):\n{self.console.read_text()[-3000:]}")
            time.sleep(0.1)

    def run(
        self, argv: list[str], check: bool = True, timeout: float = 120, input: str | None = None
    ) -> subprocess.CompletedProcess[str]:
        """``argv`` inside the container (its mounts and PIDs, as root), to its end."""
        done = subprocess.run(
            ["nsenter", "-t", str(self.pid), "-m", "-p", "-u", "--", *argv],
            capture_output=True,
            text=True,
            timeout=timeout,
            input=input,
            env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8", "SYSTEMD_COLORS": "0"},
        )
        if check and done.returncode:
            raise subprocess.CalledProcessError(done.returncode, argv, done.stdout, done.stderr)
        return done

    def path(self, inside: str) -> Path:
        """A path inside the container, as this machine reaches it (through PID 1's root)."""
        return Path(f"/proc/{self.pid}/root") / inside.lstrip("/")

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self.pid:
            try:
                os.kill(self.pid, signal.SIGKILL)  # SIGTERM would make systemd re-execute itself
            except ProcessLookupError:
                pass
        if self.unshare is not None:
            try:
                self.unshare.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.unshare.kill()
                self.unshare.wait()
        if self.cgroup is not None and self.cgroup.exists():
            _remove_cgroup(self.cgroup)
        shutil.rmtree(self.work, ignore_errors=True)
