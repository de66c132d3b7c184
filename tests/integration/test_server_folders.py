"""The folders of the nats-server and redis-server children (their JetStream store, users' file)."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from dlora.services.servers import start_nats, start_redis


def test_the_servers_folders_of_a_dlora_up_killed_outright_go_at_the_next_start(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``dlora up`` killed by SIGKILL (the OOM killer, ``kill -9``) takes its servers with it, but
    their folders in /tmp (NATS's JetStream store and users' passwords file, Redis's) stayed for
    good, one pair per such stop. The next start of a server removes those whose owner and server
    have stopped, and leaves a live one's."""
    script = (
        "import time\n"
        "from dlora.services.servers import die_with_parent, start_nats, start_redis\n"
        "servers = start_nats(preexec=die_with_parent()), start_redis(preexec=die_with_parent())\n"
        "print('up', flush=True)\n"
        "time.sleep(600)\n"
    )
    env = {**os.environ, "TMPDIR": str(tmp_path)}
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    live = start_nats()  # this process's, running on
    killed = subprocess.Popen([sys.executable, "-c", script], env=env, stdout=subprocess.PIPE, text=True)
    try:
        assert killed.stdout is not None and killed.stdout.readline() == "up\n"
        ps = subprocess.run(["ps", "-o", "pid=", "--ppid", str(killed.pid)], capture_output=True, text=True)
        servers = [int(p) for p in ps.stdout.split()]
        assert len(servers) == 2 and len(list(tmp_path.iterdir())) == 3
        killed.kill()
        killed.wait()
        deadline = time.monotonic() + 30
        while any(Path(f"/proc/{p}").exists() for p in servers) and time.monotonic() < deadline:
            time.sleep(0.1)  # (gone with it: SIGTERM from die_with_parent)
        assert len(list(tmp_path.iterdir())) == 3  # nobody removed them
        # a container's beside this one, sharing /tmp: its pids are not of this pid namespace
        (elsewhere := tmp_path / "dlora-nats-elsewhere").mkdir()
        (elsewhere / "owners").write_text("pid:[1] 999999:1 999998:1\n")
        later = start_redis()
        try:
            assert set(tmp_path.iterdir()) == {Path(live.workdir.name), Path(later.workdir.name), elsewhere}
        finally:
            later.stop()
    finally:
        if killed.poll() is None:
            killed.kill()
            killed.wait()
        killed.stdout.close()
        live.stop()


def test_where_proc_cannot_be_read_a_live_servers_folder_is_left(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without /proc (a chroot or container that mounts none) a folder names its owner and server
    by pid alone, and in every pid namespace alike ("-"): each start on Linux judged such a pid not
    running and removed the folder, so a second ``dlora up`` beside a first deleted its running
    nats-server's JetStream store and users' file. A pid alone is judged by asking the process."""
    from dlora.services import servers

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    monkeypatch.setattr(servers, "_start_time", lambda pid: None)
    monkeypatch.setattr(servers, "_pid_namespace", lambda: "-")
    live = start_nats()
    try:
        assert (Path(live.workdir.name) / "owners").read_text().split()[1:] == [str(os.getpid()), str(live.proc.pid)]
        later = start_redis()
        try:
            assert set(tmp_path.iterdir()) == {Path(live.workdir.name), Path(later.workdir.name)}
        finally:
            later.stop()
    finally:
        live.stop()
