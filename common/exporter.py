"""A service's own Prometheus endpoint: ``GET /metrics`` on ``metrics_port``, beside its bus work.

Each service exports what it knows (docs/metrics.md) from its own registry, then the process-wide
one (bus messages it could not read, the process's CPU and memory). Collectors read live state
at scrape time, so nothing is computed for metrics between scrapes. The format is the one the
scraper asks for (``Accept``): OpenMetrics (with each family's unit) to a Prometheus, which asks
for it first, else Prometheus's text format.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import AsyncIterator, Callable, Iterator
from functools import partial

from aiohttp import web
from prometheus_client import REGISTRY, CollectorRegistry, disable_created_metrics
from prometheus_client.exposition import choose_encoder
from prometheus_client.metrics_core import Metric
from prometheus_client.openmetrics.exposition import ALLOWUTF8
from prometheus_client.openmetrics.exposition import generate_latest as openmetrics_latest
from prometheus_client.registry import Collector

from dlora.common import log
from dlora.common.settings import Common
from dlora.common.urls import http_url

logger = log.get("metrics")

# No ``_created`` sample beside each counter and histogram series, as vLLM serves none: in
# Prometheus's text format each is a series of its own (5 of the ~94 an adapter name cost the
# gateway). Read at each scrape, for every registry in the process (every service imports this).
disable_created_metrics()  # type: ignore[no-untyped-call]  # (prometheus_client leaves it untyped)


class _Together(Collector):
    """``registry``'s families, then the process-wide ones: one exposition (OpenMetrics ends in one ``# EOF``)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry

    def collect(self) -> Iterator[Metric]:
        yield from self.registry.collect()
        yield from REGISTRY.collect()


def render(registry: CollectorRegistry, accept: str = "") -> tuple[bytes, str]:
    """``registry``'s metrics, then the process-wide ones, in the format ``accept`` (a request's
    ``Accept`` header) asks for: OpenMetrics, or else Prometheus's text format; with its content type.

    OpenMetrics is written with names as they are (``allow-utf-8``) under the content type
    negotiated: asked for underscores (Prometheus 2.x names no escaping, a Prometheus 3 set to
    legacy names asks for it, a bare media type gets it), prometheus_client 0.26 wrote every sample
    of ``vllm:num_requests_waiting`` as ``vllm_num_requests_waiting`` under a TYPE line keeping
    the colon (prometheus/client_python#1177), and vLLM's dashboards found nothing (a helper's
    finding). Every name here is a legal one (a test checks), so the body is the one the
    underscores escaping means; a Prometheus picks its parser by the media type alone."""
    encode, content_type = choose_encoder(accept)
    if content_type.startswith("application/openmetrics-text"):
        version = _VERSION.search(content_type)
        encode = partial(openmetrics_latest, escaping=ALLOWUTF8, version=version[1] if version else "1.0.0")
        # Asked for dots or values escaping, the names went out as they are under a header saying
        # that scheme (dots doubles every underscore: a helper): said as what they are, underscores.
        content_type = _ESCAPING.sub("escaping=underscores", content_type)
    return encode(_Together(registry)), content_type


_VERSION = re.compile(r"version=([0-9.]+)")
_ESCAPING = re.compile(r"escaping=(?:dots|values)\b")


def metrics_response(registry: CollectorRegistry, accept: str = "") -> web.Response:
    """``GET /metrics``: ``render(registry, accept)``."""
    body, content_type = render(registry, accept)
    return web.Response(body=body, headers={"Content-Type": content_type})


async def metrics_response_beside(registry: CollectorRegistry, accept: str = "") -> web.Response:
    """``metrics_response`` rendered on a thread beside the event loop: the gateway's series by
    adapter (4,000 adapters: 22 MB, 3-8 s to render) held every request that long (a helper's
    trial). Only for a registry of the library's own metrics, whose locks make reading them beside
    the loop's writes safe; a collector of ours reading the loop's own state is not."""
    body, content_type = await asyncio.to_thread(render, registry, accept)
    return web.Response(body=body, headers={"Content-Type": content_type})


@contextlib.asynccontextmanager
async def metrics_endpoint(
    s: Common, registry: CollectorRegistry, prepare: Callable[[], object] | None = None
) -> AsyncIterator[None]:
    """Serve ``registry`` on ``s.metrics_host:s.metrics_port`` while the block runs; nothing when
    the port is 0. ``prepare``: called on the event loop at each scrape to take what the registry's
    collectors read of the loop's state, the page then rendered beside the loop (a worker's: its
    per-adapter series stalled its streams at each scrape); without it, rendered on the loop.
    Raises OSError when the port is taken (the service then does not start)."""
    if not s.metrics_port:
        yield
        return

    async def metrics(request: web.Request) -> web.Response:
        accept = request.headers.get("Accept", "")
        if prepare is None:
            return metrics_response(registry, accept)
        prepare()
        return await metrics_response_beside(registry, accept)

    app = web.Application()
    app.router.add_get("/metrics", metrics)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    try:
        await web.TCPSite(runner, s.metrics_host, s.metrics_port).start()
        logger.info("metrics served", url=f"{http_url(s.metrics_host, s.metrics_port)}/metrics")
        yield
    finally:
        await runner.cleanup()
