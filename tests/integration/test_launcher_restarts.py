"""What ``dlora up`` does when one of its services exits, as systemd's ``Restart=on-failure`` does
for the units: a failed service started again, a drained worker left out, a worker that would
only fail again (too soon after its start, or too often lately) left out while another serves."""

from __future__ import annotations

import os
import signal
import sys
import time

from dlora.services.servers import free_port


def test_a_worker_is_not_started_again_when_it_would_only_fail_again() -> None:
    """dlora up starts a dead worker again, but not one that died within CRASH_LOOP_S of its start
    (its settings or model), nor one started again MAX_RESTARTS times lately (a crash loop)."""
    from dlora.services import launcher

    stack = launcher.LocalStack(1, None, [], free_port(), None)
    stack._spawn("worker-0", [sys.executable, "-c", "pass"], dict(os.environ))
    stack.procs[0].wait(timeout=30)
    assert stack.exited() == [(0, "worker-0", 0)]
    assert not stack.restart(0)  # it ran well under CRASH_LOOP_S
    args, env, _ = stack._specs[0]
    for n in range(launcher.MAX_RESTARTS + 1):
        stack._specs[0] = (args, env, time.monotonic() - launcher.CRASH_LOOP_S - 1)  # it ran long enough
        assert stack.restart(0) == (n < launcher.MAX_RESTARTS), n
        stack.procs[0].wait(timeout=30)


def test_what_dlora_up_does_when_a_service_exits() -> None:
    """As systemd's Restart=on-failure: any service that fails is started again (killing the
    dispatcher or the migrator stopped the whole stack); a worker drained on purpose is left out
    (it was started again); a service that ends cleanly unasked ends the stack."""
    from dlora.services.launcher import on_exit

    assert [on_exit(s, -9) for s in ("worker-1", "dispatcher", "migrator", "gateway")] == ["restart"] * 4
    assert on_exit("worker-0", 1) == "restart"
    assert on_exit("worker-0", 0) == "leave"
    assert on_exit("dispatcher", 0) == "stop" and on_exit("gateway", 0) == "stop"
    # Ended by SIGTERM or Ctrl-C (a worker told to stop while its model loads ends so): a clean
    # stop, as systemd counts it (SIGHUP, SIGINT, SIGTERM, SIGPIPE), not a failure to restart.
    for sig in (signal.SIGTERM, signal.SIGINT):
        assert on_exit("worker-0", -sig) == "leave" and on_exit("gateway", -sig) == "stop"


def test_a_worker_that_would_only_fail_again_is_left_out_and_the_others_serve_on() -> None:
    """systemd fails a unit at its start limit alone: dlora up stopped the whole stack (healthy
    workers and their streams too) when one worker died within CRASH_LOOP_S of its start. It now
    leaves that worker out; a dispatcher that cannot be started again still stops everything."""
    from dlora.services import launcher

    stack = launcher.LocalStack(2, None, [], free_port(), None)
    stack._spawn("worker-0", [sys.executable, "-c", "import time; time.sleep(60)"], dict(os.environ))
    stack._spawn("worker-1", [sys.executable, "-c", "raise SystemExit(3)"], dict(os.environ))
    stack._spawn("dispatcher", [sys.executable, "-c", "raise SystemExit(3)"], dict(os.environ))
    try:
        for p in stack.procs[1:]:
            p.wait(timeout=30)
        done, said = stack.after_exit(1, "worker-1", 3)
        assert done == "left" and "worker-1 exited (code 3)" in said and "1 worker still serving" in said, said
        assert stack.procs[0].poll() is None  # the healthy worker runs on
        assert stack.after_exit(2, "dispatcher", 3) == ("stop", "dispatcher exited (code 3); stopping everything")
        assert stack.after_exit(1, "worker-1", 0)[0] == "left"  # drained on purpose
        stack.procs[0].terminate()
        stack.procs[0].wait(timeout=30)
        assert stack.after_exit(1, "worker-1", 3)[0] == "stop"  # the last: nothing would serve
    finally:
        stack.stop()
