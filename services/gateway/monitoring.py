"""What a gateway hears of the cluster and tells of it: the workers' stats and the migrator's plans
it listens to (``on_stats``, ``on_plan``), and the routes that report on it (readiness,
liveness, metrics, ``/v1/status``). Each takes the gateway first, bound by ``functools.partial``
in ``routes`` and ``Gateway.start`` (as ``cache_reset``'s route)."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from typing import TYPE_CHECKING

from aiohttp import web

from dlora.common import log
from dlora.common.exporter import metrics_response_beside
from dlora.common.messages import MovePlan, WorkerStats
from dlora.model.config import same_model
from dlora.services.gateway.health import readiness
from dlora.services.gateway.served_model import served_context
from dlora.services.gateway.status import status_body

if TYPE_CHECKING:
    from dlora.services.gateway.main import Gateway

logger = log.get("gateway")


async def healthz(gw: Gateway, request: web.Request) -> web.Response:
    """Readiness (``/healthz``, ``/readyz``): 200 when a request can be served (Redis reachable,
    NATS connected, a dispatcher answering, a worker live: ``health.readiness``); else 503
    with the reasons, so a load balancer stops sending here."""
    if gw.closing:  # from the stop's start, as Kubernetes' readiness (it said 200 until the listener closed)
        return web.json_response({"status": "unavailable", "reason": "the gateway is shutting down"}, status=503)
    heard = [st.model_digest for st, _ in gw.cluster.live(time.monotonic(), gw.s.heartbeat_ttl_s)]
    ready, body = await readiness(gw.nc, gw.store, gw.state_bound, heard, gw.served.model_digest)
    return web.json_response(body, status=200 if ready else 503)


async def livez(request: web.Request) -> web.Response:
    """Liveness: 200 while this process answers, whatever its dependencies (restart it only if not)."""
    return web.json_response({"status": "ok"})


async def metrics_handler(gw: Gateway, request: web.Request) -> web.Response:
    return await metrics_response_beside(gw.metrics.registry, request.headers.get("Accept", ""))


async def status(gw: Gateway, request: web.Request) -> web.Response:
    """``GET /v1/status`` (admin): the cluster as this gateway hears it (``status.ClusterStatus``)."""
    await gw.auth.admin(request)
    async with gw.state_bound():
        adapters = await gw.store.list_adapters()
    live, plans = gw.cluster.live(time.monotonic(), gw.s.heartbeat_ttl_s), list(gw.cluster.plans)
    traffic, digest = gw.metrics.traffic.frozen(), gw.served.model_digest
    # Made and encoded on a thread from what the loop holds now: each open status page polls once
    # a second, and the document grows with adapters x workers (tens of ms at 4,000 adapters).
    args = (live, plans, adapters, traffic, gw.base_name, gw.gateway_id, time.time(), digest)
    return web.Response(body=await asyncio.to_thread(status_body, *args), content_type="application/json")


async def on_plan(gw: Gateway, plan: MovePlan) -> None:
    gw.cluster.planned(plan)


async def on_stats(gw: Gateway, st: WorkerStats) -> None:
    now = time.monotonic()
    gw.cluster.heard(st, now)
    if not same_model(st.model_digest, gw.served.model_digest) and st.worker not in gw._other_model:
        gw._other_model.add(st.worker)  # said once per worker: the dispatchers send it nothing of ours
        logger.error(
            "a worker serves another base model than this gateway; none of its requests go there",
            worker=st.worker,
            worker_model_digest=st.model_digest,
            model_digest=gw.served.model_digest,
        )
    # Requests are checked against the largest live worker's context, not only the model's (a
    # small KV cache holds less).
    live = [st.max_model_len for st, _ in gw.cluster.live(now, gw.s.heartbeat_ttl_s)]
    context = served_context(gw.context, live)
    if context != gw.served.context:
        gw.served = dataclasses.replace(gw.served, context=context)
