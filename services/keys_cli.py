"""``dlora keys create|list|revoke``: API key administration from a shell, straight on the
deployment's Redis and NATS (the durable copy) with the gateway's settings and credentials
(``dlora.toml`` ``[gateway]``, ``DLORA_GATEWAY_*``): it needs no running gateway, so it makes the
first keys of a deployment too. The HTTP twin is ``/v1/keys`` (``services/gateway/keys.py``)."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
import time

from redis.exceptions import RedisError

from dlora.common import apikeys, log
from dlora.common.bus import CredentialsRefused, connections
from dlora.common.key_registry import KeyRegistry
from dlora.common.messages import ApiKey
from dlora.common.settings import Problems, SettingsError, load, unread_config
from dlora.common.urls import redacted
from dlora.services.gateway.settings import GatewaySettings


class _KeySettings(GatewaySettings, kw_only=True, forbid_unknown_fields=True):
    """The gateway's settings without the base model, which key administration never reads."""

    def check(self) -> Problems:
        return [p for p in GatewaySettings.check(self) if p[0] != "model"]


def run_keys(args: argparse.Namespace) -> int:
    """Exit status 0 when done; 1 for an unknown key id; 2 for bad settings or arguments."""
    # Log lines (a restore, no JetStream) to stderr and only warnings: stdout is the key or JSON.
    log.configure(json=False, level=logging.WARNING)
    for said in unread_config(args.config):
        print(f"dlora keys: warning: {said}", file=sys.stderr)
    try:
        settings = load(_KeySettings, "gateway", args.config)
    except SettingsError as e:
        print(f"dlora keys: {e}", file=sys.stderr)
        return 2
    if not settings.nats_url or not settings.redis_url:
        print(
            "dlora keys: set nats_url and redis_url (dlora.toml or DLORA_NATS_URL / DLORA_REDIS_URL) with the "
            "gateway's credentials; against `dlora up`, use POST /v1/keys with its admin key instead",
            file=sys.stderr,
        )
        return 2
    try:
        return asyncio.run(_run(args, settings))
    except (apikeys.KeySpecError, CredentialsRefused) as e:
        print(f"dlora keys: {e}", file=sys.stderr)
        return 2
    except TimeoutError:
        print(
            f"dlora keys: NATS at {redacted(settings.nats_url)} or Redis at {redacted(settings.redis_url)} did not "
            "answer",
            file=sys.stderr,
        )
        return 2
    except RedisError as e:
        print(f"dlora keys: Redis at {redacted(settings.redis_url)}: {e}", file=sys.stderr)
        return 2


# A command gives up after this long (it takes well under a second), where a service waits out
# any outage: an unreachable NATS kept `dlora keys` retrying for ever.
_TIMEOUT_S = 15.0


async def _run(args: argparse.Namespace, s: GatewaySettings) -> int:
    async with asyncio.timeout(_TIMEOUT_S), connections(s) as (nc, store):
        keys = await KeyRegistry.open(nc, store, s.nats_kv_replicas)
        if await keys.kv() is None:
            print("dlora keys: warning: NATS has no JetStream; keys are kept in Redis only", file=sys.stderr)
        if args.keys_command == "create":
            scopes = [apikeys.INFERENCE, apikeys.ADMIN] if args.admin else [apikeys.INFERENCE]
            secret, key = apikeys.new_key(
                args.tenant,
                scopes,
                time.time(),
                rate_per_s=args.rate,
                burst=args.burst,
                concurrency=args.concurrency,
            )
            await keys.add(key)
            if args.json:
                print(json.dumps({**apikeys.public(key), "key": secret}))
            else:
                print(secret)
                print(f"{key.id}  tenant {key.tenant}  scopes {','.join(key.scopes)}: shown once, keep it now")
            return 0
        if args.keys_command == "list":
            listed = await keys.all()
            if args.json:
                print(json.dumps([apikeys.public(k) for k in listed]))
            else:
                for k in listed:
                    print(_row(k))
                if not listed:  # (said on stderr: a script counting stdout's lines still reads 0)
                    print("dlora keys: no API keys yet (dlora keys create --tenant NAME makes one)", file=sys.stderr)
            return 0
        revoked = await keys.revoke(args.id)
        if revoked is None:
            print(f"dlora keys: no key has the id {args.id!r}", file=sys.stderr)
            return 1
        print(f"revoked {revoked.id} (tenant {revoked.tenant})")
        return 0


def _row(key: ApiKey) -> str:
    def limit(value: float | None, unit: str = "", default_at_zero: bool = False) -> str:
        if value is None or (default_at_zero and value == 0):
            return "default"
        return "none" if value == 0 else f"{value:g}{unit}"

    return (
        f"{key.id}  {key.hint}  tenant={key.tenant}  scopes={','.join(key.scopes)}  "
        f"rate={limit(key.rate_per_s, '/s')} burst={limit(key.burst, default_at_zero=True)} "
        f"concurrency={limit(key.concurrency)}"
        f"{'  REVOKED' if key.revoked else ''}"
    )
