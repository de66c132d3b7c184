"""Adapter administration over HTTP, for admins: dlora's ``POST /v1/adapters`` (201 with the
registry entry) and ``DELETE /v1/adapters/{name}``, and vLLM's runtime LoRA endpoints,
``POST /v1/load_lora_adapter`` and ``POST /v1/unload_lora_adapter``, so scripts written for vLLM
work unchanged (answered as vLLM answers them: 200 and a line of text)."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING

import msgspec
from aiohttp import web

from dlora.common import bus, subjects
from dlora.common.messages import AdapterEntry, AdapterEvent
from dlora.common.registry import valid_name
from dlora.services.gateway import openai
from dlora.services.gateway.admin import AdapterBody, check_adapter
from dlora.services.gateway.openai import APIError

if TYPE_CHECKING:
    from dlora.services.gateway.main import Gateway


class LoadLoraAdapterBody(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """vLLM's ``POST /v1/load_lora_adapter``; ``load_inplace`` replaces an adapter of that name
    (requests running on the old weights finish on them)."""

    lora_name: str
    lora_path: str
    load_inplace: bool = False


class UnloadLoraAdapterBody(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """vLLM's ``POST /v1/unload_lora_adapter`` (``lora_int_id``, vLLM's internal number, is taken
    and not used: names identify adapters here)."""

    lora_name: str
    lora_int_id: int | None = None


class AdapterAdmin:
    """The handlers, over the gateway's auth, registry and bus (read at each request: the gateway
    opens its durable registry when it starts)."""

    def __init__(self, gateway: Gateway) -> None:
        self.gw = gateway

    async def add(self, request: web.Request) -> web.Response:
        """201 with the entry. Raises (answered): APIError 401/403, 400 (a bad name, path or
        adapter, named), 409 (the name is taken)."""
        await self.gw.auth.admin(request)
        body = openai.decode_body(await self.gw.read_body(request), AdapterBody)
        entry = await self._register(body, replace=False)
        return web.json_response(msgspec.to_builtins(entry), status=201)

    async def delete(self, request: web.Request) -> web.Response:
        """200 naming the adapter removed. Raises (answered): APIError 401/403, 404."""
        await self.gw.auth.admin(request)
        name = request.match_info["name"]
        await self._remove(name)
        return web.json_response({"id": name, "object": "model", "deleted": True})

    async def vllm_load(self, request: web.Request) -> web.Response:
        """200 and vLLM's line of text. Raises (answered): APIError 401/403, 400 (the name taken
        without ``load_inplace``: vLLM's status and words, where ``add`` answers 409; a bad name,
        path or adapter, named by vLLM's field)."""
        await self.gw.auth.admin(request)
        body = openai.decode_body(await self.gw.read_body(request), LoadLoraAdapterBody)
        adapter = AdapterBody(name=body.lora_name, path=body.lora_path)
        try:
            with _vllm_params():
                entry = await self._register(adapter, replace=body.load_inplace)
        except APIError as e:
            if e.status != 409:
                raise
            # vLLM's sentence (serving_models' _check_load_lora_adapter_request), then what it does here
            why = (
                f"The lora adapter '{body.lora_name}' has already been loaded. If you want to load the adapter in "
                "place, set 'load_inplace' to True (its running requests finish on the weights they started with)."
            )
            raise APIError(400, why, param="lora_name") from None
        return web.Response(text=f"Success: LoRA adapter '{entry.name}' added successfully.")

    async def vllm_unload(self, request: web.Request) -> web.Response:
        await self.gw.auth.admin(request)
        body = openai.decode_body(await self.gw.read_body(request), UnloadLoraAdapterBody)
        with _vllm_params():
            await self._remove(body.lora_name)
        return web.Response(text=f"Success: LoRA adapter '{body.lora_name}' removed successfully.")

    async def _register(self, body: AdapterBody, replace: bool) -> AdapterEntry:
        """Raises APIError: 409 when the name is taken (and not ``replace``), check_adapter's 400s."""
        gw = self.gw
        taken = APIError(409, f"adapter {body.name!r} is already registered", param="name")
        if body.owner == "":  # it silently made the adapter public (no owner): say so with null
            raise APIError(400, "owner must name a tenant; leave it out (or null) for a public adapter", param="owner")
        async with gw.state_bound():  # (its writes below stay unbounded: a late one would be unseen)
            current = await gw.store.get_adapter(body.name)
        if current is not None and not replace:  # before loading the files
            raise taken
        if current is not None and body.owner is None:  # replaced in place: still its tenant's, not public
            body = msgspec.structs.replace(body, owner=current.owner)
        entry = await asyncio.to_thread(
            check_adapter,
            body.name,
            body.path,
            gw.s.adapter_roots,
            gw.base_name,
            gw.cfg,
            gw.s.adapter_limits,
            body.owner or "",
        )
        # Workers with lower limits than the gateway's: registered, every request of it failed with a
        # 500 as the workers loaded it (a trial). Refused while no live worker can load it.
        live = gw.cluster.live(time.monotonic(), gw.s.heartbeat_ttl_s)
        limits = [st.max_lora_rank for st, _ in live if not st.draining]  # a stopping one will not serve it
        if limits and 0 not in limits and entry.rank > max(limits):
            raise APIError(
                400,
                f"adapter {body.name!r}: rank {entry.rank} is above every live worker's max_lora_rank "
                f"(at most {max(limits)}): they could not load it",
                param="path",
            )
        # Stamped as it is written, not when its files were checked: racing replacements are then
        # ordered by ``created`` as Redis takes them (what the registry's merge compares).
        entry = msgspec.structs.replace(entry, created=time.time())
        if not await gw.registry.register(entry, replace=replace):  # atomic: of two racing ones one wins
            raise taken
        event = AdapterEvent(name=entry.name, removed=False, version=entry.version)
        await bus.publish(gw.nc, subjects.ADAPTER_EVENTS, event)
        return entry

    async def _remove(self, name: str) -> None:
        # A name the durable copy cannot key is in Redis only, if anywhere (registered before names
        # were checked as they are now): removed there, its version retired as any other's.
        await self.gw.state_bound.reachable(self.gw.store.r.ping)
        removed = await (self.gw.registry.remove(name) if valid_name(name) else self._remove_from_redis(name))
        if not removed:
            raise APIError(404, f"adapter {name!r} is not registered", param="name")
        await bus.publish(self.gw.nc, subjects.ADAPTER_EVENTS, AdapterEvent(name=name, removed=True))

    async def _remove_from_redis(self, name: str) -> bool:
        entry = await self.gw.store.get_adapter(name)
        if entry is None or not await self.gw.store.delete_adapter(name, only=entry):
            return False
        await self.gw.store.retire_version(name, entry.version, time.time())
        return True


@contextlib.contextmanager
def _vllm_params() -> Iterator[None]:
    """A refusal names the field of vLLM's body it is about (lora_name, lora_path), not ours."""
    try:
        yield
    except APIError as e:
        if e.param in ("name", "path"):
            e.param = f"lora_{e.param}"
        raise
