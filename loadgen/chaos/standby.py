"""A worker started ahead and held just before it joins the cluster:
``python -m dlora.loadgen.chaos.standby`` loads the worker's settings and builds its engine as
``dlora serve worker`` does, says "standby ready", waits for SIGUSR1, and only then connects and
serves (``WorkerService.run``, as ``serve`` runs it).

Why: the fast-restart fault needs a worker back under the same id before its heartbeat lapses.
Importing torch and building the engine alone take about 6 s of CPU, more than the default 5 s
TTL on a 2-core machine under load; a standby pays that before the kill, so what the fault
exercises is the new incarnation meeting its predecessor's in-flight records, not start-up speed.
"""

from __future__ import annotations

import asyncio
import signal
import sys

from dlora.common import log
from dlora.common.bus import connections
from dlora.common.settings import load
from dlora.loadgen.chaos.stack import STANDBY_READY
from dlora.services.run import run_until_signalled
from dlora.services.worker.engine import LLMEngine
from dlora.services.worker.main import WorkerService, build_engine
from dlora.services.worker.settings import WorkerSettings


def main() -> int:
    # Blocked before anything else: a release that comes early waits, instead of killing us.
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR1})
    settings = load(WorkerSettings, "worker")
    log.configure(json=settings.log_json, level=settings.log_level)
    engine = build_engine(settings)
    log.get("standby").info(STANDBY_READY, worker=settings.worker_id)
    signal.sigwait({signal.SIGUSR1})

    async def serve(s: WorkerSettings, stop: asyncio.Event, engine: LLMEngine = engine) -> None:
        async with connections(s) as (nc, store):
            await WorkerService(s, nc, store, engine).run(stop)

    run_until_signalled(serve, settings)
    return 0


if __name__ == "__main__":
    sys.exit(main())
