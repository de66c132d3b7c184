"""A service told to stop (SIGTERM: ``systemctl stop``, ``dlora up``'s Ctrl-C) exits within the
bound its supervisor gives it, whatever it was doing: systemd's ``TimeoutStopSec`` of the units in
deploy/systemd, after which it is killed outright (SIGKILL: nothing handed back, nothing cleaned
up) and ``systemctl stop`` or ``restart`` waited for all of it."""

from __future__ import annotations

import configparser
import signal
import subprocess
import time
from pathlib import Path

from dlora.model.make_tiny import TinyOutput
from dlora.services.servers import Server
from tests.integration.conftest import spawn_worker

UNITS = Path(__file__).resolve().parents[2] / "deploy" / "systemd"


def stop_timeout_s(unit: str) -> float:
    """The unit's ``TimeoutStopSec`` (seconds): how long systemd waits after SIGTERM."""
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.read(UNITS / unit)
    return float(parser["Service"]["TimeoutStopSec"])


def wait_for_line(log: Path, text: str, proc: subprocess.Popen[bytes], limit_s: float = 120.0) -> None:
    deadline = time.monotonic() + limit_s
    while text not in log.read_text() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    assert text in log.read_text(), log.read_text()[-3000:]


def stopped_within(proc: subprocess.Popen[bytes], limit_s: float) -> int | None:
    """``proc``'s exit code once it exits within ``limit_s`` of a SIGTERM; None (and killed) if not."""
    proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(timeout=limit_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        return None


def test_a_worker_told_to_stop_while_redis_hangs_stops_before_systemd_kills_it(
    nats_server: Server, start_redis_here, tiny_llama: TinyOutput, tmp_path: Path
) -> None:
    """With Redis hung (SIGSTOP here; a partition, a paused VM), each of the stop's Redis calls (is
    the id another's now, what came late, the clean-stop mark, the heartbeat's removal) waited out
    redis-py's tries, 4 x 5 s: an idle worker took 86 s to stop, past TimeoutStopSec (60 s)."""
    redis = start_redis_here()
    log = tmp_path / "worker.log"
    with log.open("wb") as out:
        proc = spawn_worker(nats_server.url, redis.url, str(tiny_llama.model), "w-hung", stderr=out)
    try:
        wait_for_line(log, "worker ready", proc)
        redis.proc.send_signal(signal.SIGSTOP)
        time.sleep(1)  # its Redis calls now hang (a beat or a reconciliation may be waiting)
        code = stopped_within(proc, stop_timeout_s("dlora-worker@.service"))
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert code == 0, log.read_text()[-3000:]
