"""``dlora up``'s stop against a service that outlives SIGKILL (stuck in the kernel: state D under
a GPU driver's or a network filesystem's hang). No test can put a process in state D without root,
so the stand-in is a real process whose ``kill`` and ``send_signal`` do nothing."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest

from dlora.services import stack_stop


class Unkillable(subprocess.Popen):
    def send_signal(self, sig: int) -> None:  # (terminate() and kill() come here too)
        pass

    def kill(self) -> None:
        pass


def test_a_service_that_outlives_sigkill_is_left_and_the_stop_goes_on(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The kill's wait had no bound: ``dlora up`` hung in its stop, NATS and Redis never stopped."""
    monkeypatch.setattr(stack_stop, "STOP_WAIT_S", 0.1)
    monkeypatch.setattr(stack_stop, "KILL_WAIT_S", 0.2)
    stuck = Unkillable([sys.executable, "-c", "import time; time.sleep(120)"])
    fine = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        stop = stack_stop.StackStop([stuck, fine], ["dispatcher", "migrator"], drain_s=0.0)
        stop.run()
        assert stop.left == [0] and stuck.poll() is None and fine.poll() is not None
        assert f"dispatcher (pid {stuck.pid}) did not exit" in capsys.readouterr().err
    finally:
        os.kill(stuck.pid, signal.SIGKILL)
        stuck.wait()
        fine.kill()
        fine.wait()
