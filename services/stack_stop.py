"""How ``dlora up`` takes its services down: in the order a request's path needs them, and sooner
at a second Ctrl-C or SIGTERM.

The gateway and the workers are told to stop first: the gateway refuses new requests and lets its
own finish for its ``shutdown_timeout_s`` (vLLM's ``--shutdown-timeout``; 0, the default, ends them
at once) while each worker finishes what it runs for its ``drain_timeout_s`` and then hands the
rest to a dispatcher. The two waits do not wait on each other: a gateway request whose worker
drains runs there until the worker's drain ends, and is then handed over, the dispatcher still up;
with no other worker to take it, the dispatcher leaves it to its recovery (a worker restarted in
time takes it), so the gateway's own timeout ends it: in-flight gateway requests get the shorter
of the two. A NATS application's request so left ends when NATS goes. The dispatcher and the migrator are
told only once the workers are gone: all told at once, the dispatcher went first and a worker's
hand-over had nobody to take it, and a NATS application's request sent during the drain found no
dispatcher (no responders) instead of one saying no worker is available. NATS and Redis go last
(the launcher's).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence

from dlora.common.settings import SettingsError, load
from dlora.services.worker.settings import WorkerSettings

# Seconds ``dlora up`` waits for a service it told to stop (SIGTERM) before it kills it outright,
# beyond a worker's drain (``drain_timeout_s``): a worker told at the drain's length was killed
# while it handed its requests over.
STOP_WAIT_S = 10.0
# Seconds between the first signal a service was sent and the one that hurries it, when the
# hurry came before the service was told at all: two sent back to back can merge into one.
HURRY_GAP_S = 0.5
# Seconds a service killed outright (SIGKILL) is waited for: one stuck in the kernel (a GPU
# driver's or a network filesystem's hang, state D) outlives SIGKILL, and an unbounded wait hung
# ``dlora up``'s stop, NATS and Redis never stopped.
KILL_WAIT_S = 5.0
_POLL_S = 0.05


def workers_drain_s(config: str | None, worker_env: Mapping[str, str]) -> float:
    """How long the workers drain at a stop: their ``drain_timeout_s`` (the default where their
    settings are bad: the worker said why at its start)."""
    env = {**os.environ, **worker_env}
    try:
        return load(WorkerSettings, "worker", config, env=env, overrides={"model": "-"}).drain_timeout_s
    except SettingsError:
        return WorkerSettings().drain_timeout_s


def first_told(name: str) -> bool:
    """Whether ``name`` is of the first phase: the gateway and the workers."""
    return name == "gateway" or name.startswith("worker-")


class StackStop:
    """One stop of ``procs`` (their services ``names``), phase by phase; ``hurry()`` (a second
    Ctrl-C or SIGTERM to ``dlora up``) passes a second SIGTERM on to each service already told,
    which for a worker means: hand the requests over now (``services/run.py``, ``Stop.hurried``).
    ``hurry`` may run in a signal handler while ``run`` waits."""

    def __init__(
        self, procs: Sequence[subprocess.Popen], names: Sequence[str], drain_s: float, gateway_s: float = 0.0
    ) -> None:
        self.procs, self.names, self.drain_s, self.gateway_s = list(procs), list(names), drain_s, gateway_s
        self.hurried = False
        self._told: dict[int, float] = {}  # index -> when its first SIGTERM went
        self._sent: dict[int, int] = {}  # index -> SIGTERMs sent
        self._deadline: dict[int, float] = {}  # index -> when it is killed outright
        self.left: list[int] = []  # indices that outlived SIGKILL (see ``KILL_WAIT_S``)

    def run(self) -> None:
        """Both phases, each until its services have exited (killed past their deadline)."""
        first = [i for i, n in enumerate(self.names) if first_told(n)]
        for phase in (first, [i for i in range(len(self.names)) if i not in first]):
            self._tell(phase)
            self._wait(phase)

    def hurry(self) -> None:
        """A second signal: every service told and still running is sent SIGTERM again and given
        ``STOP_WAIT_S`` from now at most; those not told yet get both when they are."""
        self.hurried = True
        now = time.monotonic()
        for i in list(self._told):
            self._deadline[i] = min(self._deadline[i], now + STOP_WAIT_S)
            if now - self._told[i] >= HURRY_GAP_S:
                self._signal(i)

    def _grace(self, i: int) -> float:
        if self.hurried:
            return STOP_WAIT_S
        if self.names[i] == "gateway":  # killed at STOP_WAIT_S, its clients' connections were reset
            return STOP_WAIT_S + self.gateway_s
        return STOP_WAIT_S + (self.drain_s if self.names[i].startswith("worker-") else 0.0)

    def _signal(self, i: int) -> None:
        if self.procs[i].poll() is None:
            self.procs[i].send_signal(signal.SIGTERM)
        self._sent[i] = self._sent.get(i, 0) + 1

    def _tell(self, phase: list[int]) -> None:
        now = time.monotonic()
        for i in phase:
            self._deadline[i] = now + self._grace(i)
            self._told[i] = now  # before the signal: a hurry in between sends its own later
            self._signal(i)

    def _wait(self, phase: list[int]) -> None:
        while alive := [i for i in phase if i not in self.left and self.procs[i].poll() is None]:
            now = time.monotonic()
            for i in alive:
                if now >= self._deadline[i]:
                    self._kill(i)
                elif self.hurried and self._sent.get(i, 0) < 2 and now - self._told[i] >= HURRY_GAP_S:
                    self._signal(i)  # hurried before it was told (or between its signal and its note)
            time.sleep(_POLL_S)

    def _kill(self, i: int) -> None:
        self.procs[i].kill()
        try:
            self.procs[i].wait(KILL_WAIT_S)  # reaped: stopped when stop() returns (a CI run found one running)
        except subprocess.TimeoutExpired:
            self.left.append(i)
            print(
                f"dlora up: {self.names[i]} (pid {self.procs[i].pid}) did not exit {KILL_WAIT_S:g} s after "
                "SIGKILL (stuck in the kernel: a GPU driver or filesystem hang?); left running",
                file=sys.stderr,
            )
