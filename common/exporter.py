"""A service's own Prometheus endpoint: ``GET /metrics`` on ``metrics_port``, beside its bus work.

Each service exports what it knows (docs/metrics.md) from its own registry, then the process-wide
one (bus messages it could not read, the process's CPU and memory). Collectors read live state
at scrape time, so nothing is computed for metrics between scrapes.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, CollectorRegistry, generate_latest

from dlora.common import log
from dlora.common.settings import Common

logger = log.get("metrics")


def render(registry: CollectorRegistry) -> bytes:
    """``registry``'s metrics, then the process-wide ones, in Prometheus's text format."""
    return generate_latest(registry) + generate_latest(REGISTRY)


def metrics_response(registry: CollectorRegistry) -> web.Response:
    """``GET /metrics``: ``render(registry)``."""
    return web.Response(body=render(registry), headers={"Content-Type": CONTENT_TYPE_LATEST})


@contextlib.asynccontextmanager
async def metrics_endpoint(s: Common, registry: CollectorRegistry) -> AsyncIterator[None]:
    """Serve ``registry`` on ``s.metrics_host:s.metrics_port`` while the block runs; nothing when
    the port is 0. Raises OSError when the port is taken (the service then does not start)."""
    if not s.metrics_port:
        yield
        return

    async def metrics(_: web.Request) -> web.Response:
        return metrics_response(registry)

    app = web.Application()
    app.router.add_get("/metrics", metrics)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    try:
        await web.TCPSite(runner, s.metrics_host, s.metrics_port).start()
        logger.info("metrics served", url=f"http://{s.metrics_host}:{s.metrics_port}/metrics")
        yield
    finally:
        await runner.cleanup()
