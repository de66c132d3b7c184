"""What a gateway hears of the cluster and tells of it: the workers' stats and the migrator's plans
it listens to (``_on_stats``, ``_on_plan``), and the routes that report on it (readiness,
liveness, metrics, ``/v1/status``). ``Gateway`` takes these methods from ``Monitoring``."""

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


class Monitoring:
    """The cluster's stats and the routes that report on them, as methods of ``Gateway``."""

    async def healthz(self: Gateway, request: web.Request) -> web.Response:
        """Readiness (``/healthz``, ``/readyz``): 200 when a request can be served (Redis reachable,
        NATS connected, a dispatcher answering, a worker live: ``health.readiness``); else 503
        with the reasons, so a load balancer stops sending here."""
        if self.closing:  # from the stop's start, as Kubernetes' readiness (it said 200 until the listener closed)
            return web.json_response({"status": "unavailable", "reason": "the gateway is shutting down"}, status=503)
        heard = [st.model_digest for st, _ in self.cluster.live(time.monotonic(), self.s.heartbeat_ttl_s)]
        ready, body = await readiness(self.nc, self.store, self.state_bound, heard, self.served.model_digest)
        return web.json_response(body, status=200 if ready else 503)

    async def livez(self: Gateway, request: web.Request) -> web.Response:
        """Liveness: 200 while this process answers, whatever its dependencies (restart it only if not)."""
        return web.json_response({"status": "ok"})

    async def metrics_handler(self: Gateway, request: web.Request) -> web.Response:
        return await metrics_response_beside(self.metrics.registry, request.headers.get("Accept", ""))

    async def status(self: Gateway, request: web.Request) -> web.Response:
        """``GET /v1/status`` (admin): the cluster as this gateway hears it (``status.ClusterStatus``)."""
        await self.auth.admin(request)
        async with self.state_bound():
            adapters = await self.store.list_adapters()
        live, plans = self.cluster.live(time.monotonic(), self.s.heartbeat_ttl_s), list(self.cluster.plans)
        traffic, digest = self.metrics.traffic.frozen(), self.served.model_digest
        # Made and encoded on a thread from what the loop holds now: each open status page polls once
        # a second, and the document grows with adapters x workers (tens of ms at 4,000 adapters).
        args = (live, plans, adapters, traffic, self.base_name, self.gateway_id, time.time(), digest)
        return web.Response(body=await asyncio.to_thread(status_body, *args), content_type="application/json")

    async def _on_plan(self: Gateway, plan: MovePlan) -> None:
        self.cluster.planned(plan)

    async def _on_stats(self: Gateway, st: WorkerStats) -> None:
        now = time.monotonic()
        self.cluster.heard(st, now)
        if not same_model(st.model_digest, self.served.model_digest) and st.worker not in self._other_model:
            self._other_model.add(st.worker)  # said once per worker: the dispatchers send it nothing of ours
            logger.error(
                "a worker serves another base model than this gateway; none of its requests go there",
                worker=st.worker,
                worker_model_digest=st.model_digest,
                model_digest=self.served.model_digest,
            )
        # Requests are checked against the largest live worker's context, not only the model's (a
        # small KV cache holds less).
        live = [st.max_model_len for st, _ in self.cluster.live(now, self.s.heartbeat_ttl_s)]
        context = served_context(self.context, live)
        if context != self.served.context:
            self.served = dataclasses.replace(self.served, context=context)
