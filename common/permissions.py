"""Who may publish and subscribe to what on NATS: one user per service role, and one per NATS-native
application, each allowed only its own subjects (``subjects.py`` spells them). Pure: rendered into
nats-server's configuration by ``dlora up`` (``services/servers.py``) and shipped as
``deploy/nats/dlora-users.conf`` for servers run by hand (a test keeps the two the same).

What this stops (issue 16, item 10): a process on the host without a service's password cannot
read other users' prompts and outputs (``dlora.reply.<owner>.*`` is readable only by the gateway
and by the application that owns it), inject into or abort others' streams, publish migration plans,
or pose as a worker to swallow requests.
"""

from __future__ import annotations

import json
import re

from dlora.common import subjects

P = subjects.PREFIX
ROLES = ("gateway", "dispatcher", "worker", "migrator")
# The application user `dlora up` creates; a deployment adds one per application (app_permissions).
APP_USER = "app"


def _bucket(name: str) -> list[str]:
    """What using one JetStream key-value bucket takes (nats-py): its stream's API (create, info),
    reading a key (direct or message get), the consumers that list its keys, and its subjects."""
    stream = f"KV_{name}"
    return [
        f"$JS.API.STREAM.*.{stream}",
        f"$JS.API.STREAM.MSG.GET.{stream}",
        f"$JS.API.DIRECT.GET.{stream}.>",
        f"$JS.API.CONSUMER.*.{stream}",
        f"$JS.API.CONSUMER.*.{stream}.>",
        f"$KV.{name}.>",
    ]


# JetStream's account info, the flow control and acknowledgements of the consumers that read
# buckets (a restore's key listing), and the adapter registry's bucket (common/registry.py): only
# that bucket's API, so a service cannot reach other streams on the server.
_JETSTREAM = ["$JS.API.INFO", "$JS.FC.>", "$JS.ACK.>", *_bucket(f"{P}-adapters")]
# The inference API keys' bucket (common/key_registry.py): the gateway's alone, and the
# `dlora keys` command's, which connects as the gateway.
_KEYS_BUCKET = _bucket(f"{P}-keys")
# nats-py's replies to its own requests (nc.request) come to _INBOX.<random>.
_INBOX = "_INBOX.>"


def service_permissions(role: str) -> dict[str, list[str]]:
    """The subjects ``role``'s user may publish and subscribe to."""
    perms = {
        "gateway": (
            [subjects.REQUESTS, subjects.ABORT, subjects.ADAPTER_EVENTS, subjects.CLIENTS, subjects.DISPATCHER_PING]
            + [subjects.PREFIX_CACHE_RESET, subjects.RESPONSE_CANCELS, *_JETSTREAM, *_KEYS_BUCKET],
            # stats and plans: /v1/status; cancels: a background response another gateway was asked to end
            [f"{P}.reply.>", subjects.STATS_ALL, subjects.MOVES, subjects.RESPONSE_CANCELS, _INBOX],
        ),
        "dispatcher": (
            [f"{P}.worker.*.requests", subjects.PLACEMENT, f"{P}.reply.>", _INBOX, *_JETSTREAM],
            [
                subjects.REQUESTS,
                subjects.APP_REQUESTS,
                subjects.DISPATCHER_PING,
                subjects.LOST,
                subjects.CLIENTS,
                subjects.STATS_ALL,
                subjects.ABORT,  # and the applications': a request waiting for a worker (orphan_wait_s)
                subjects.APP_ABORTS,
                subjects.PREFIX_CACHE_RESET,  # where prefixes are cached is forgotten with the caches
                subjects.APP_CLIENTS,
                _INBOX,
            ],
        ),
        "worker": (
            [f"{P}.stats.*", f"{P}.reply.>", _INBOX, f"{P}.worker.*.requests", f"{P}.worker.*.kv.>", subjects.LOST],
            [
                f"{P}.worker.>",
                subjects.ABORT,
                subjects.APP_ABORTS,
                subjects.APP_CLIENTS,
                subjects.ADAPTER_EVENTS,
                subjects.MOVES,
                subjects.PLACEMENT,
                subjects.CLIENTS,
                subjects.PREFIX_CACHE_RESET,
                _INBOX,
            ],
        ),
        "migrator": ([subjects.MOVES], [subjects.STATS_ALL, _INBOX]),
    }[role]
    return {"publish": perms[0], "subscribe": perms[1]}


def app_permissions(user: str) -> dict[str, list[str]]:
    """An application's user: it sends requests and aborts on its own subjects (``requests_of``,
    ``aborts_of``: its aborts stop only its requests) and reads only its own replies, sent to
    ``subjects.reply_inbox(rid, owner)`` with an ``owner`` of ``<user>`` or ``<user>.<anything>``
    (or to its own request inboxes: connect with ``inbox_prefix="_INBOX.<user>"``); a dispatcher
    refuses a request whose ``reply_to`` is anything else."""
    return {
        "publish": [subjects.requests_of(user), subjects.aborts_of(user), subjects.clients_of(user)],
        "subscribe": [f"{P}.reply.{user}.>", f"_INBOX.{user}.>"],
    }


def nats_users(passwords: dict[str, str]) -> list[dict[str, object]]:
    """nats-server ``authorization.users`` entries: ``passwords`` maps each service role and each
    application user to its password (or to a ``$VARIABLE`` the server reads from its environment)."""
    return [
        {
            "user": name,
            "password": password,
            "permissions": service_permissions(name) if name in ROLES else app_permissions(name),
        }
        for name, password in passwords.items()
    ]


def nats_config(passwords: dict[str, str]) -> str:
    """The ``authorization`` block of a nats-server configuration (JSON, which its parser reads). A
    password ``$NAME`` stays unquoted: the server reads it from its environment."""
    text = json.dumps({"users": nats_users(passwords)}, indent=2)
    return "authorization " + re.sub(r'"(\$[A-Z_][A-Z0-9_]*)"', r"\1", text) + "\n"


def shipped_config() -> str:
    """``deploy/nats/dlora-users.conf``: every service role and the ``app`` application user, each
    password read from ``$DLORA_NATS_<USER>_PASSWORD`` in the server's environment."""
    header = (
        "# dlora's NATS users and what each may publish and subscribe to (generated from\n"
        "# common/permissions.py; a test keeps them the same). Include it in nats-server.conf\n"
        "# (`include dlora-users.conf`) and set each DLORA_NATS_<USER>_PASSWORD in the server's\n"
        "# environment; give each service its own with [<service>] nats_user / nats_password.\n"
        "# Add a user per application like `app` (permissions.app_permissions(name)).\n"
    )
    names = (*ROLES, APP_USER)
    return header + nats_config({n: f"$DLORA_NATS_{n.upper()}_PASSWORD" for n in names})
