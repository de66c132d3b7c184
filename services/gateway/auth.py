"""Who is calling the gateway, and what they may do: the bearer credential of a request (the
``admin_key`` setting, an API key, or none), the tenant it acts for, its scopes and its limits.

With ``auth = "keys"`` the inference endpoints take only API keys (401 in OpenAI's shape when
missing, unknown or revoked); with ``"none"`` anyone may call them, as the anonymous caller. The
adapters a caller lists and uses are its tenant's and the public ones: any other name is a 404
exactly like a name never registered, so tenants cannot learn each other's adapter names.
"""

from __future__ import annotations

import contextlib
import hmac
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from aiohttp import web

from dlora.common import apikeys
from dlora.common.bus import StateBound
from dlora.common.key_registry import KeyRegistry
from dlora.common.messages import AdapterEntry, ApiKey
from dlora.services.gateway import access
from dlora.services.gateway.limits import KeyLimiter, Limits
from dlora.services.gateway.openai import APIError
from dlora.services.gateway.settings import GatewaySettings

# RFC 6750: a 401 names the scheme the client should use.
_CHALLENGE = {"WWW-Authenticate": 'Bearer realm="dlora"'}


@dataclass(frozen=True)
class Principal:
    """A caller. ``tenant``: the API key's tenant; None for the anonymous caller and the bootstrap
    admin (``admin_key``), whose requests carry the body's ``user`` as their tenant, as before keys."""

    key_id: str | None
    tenant: str | None
    inference: bool
    admin: bool
    limits: Limits = Limits()

    def may_use(self, entry: AdapterEntry) -> bool:
        """Whether this caller may list and use the adapter: an admin every one, others the public
        ones and their tenant's."""
        return self.admin or not entry.owner or entry.owner == self.tenant


ANONYMOUS = Principal(key_id=None, tenant=None, inference=True, admin=False)
BOOTSTRAP_ADMIN = Principal(key_id=None, tenant=None, inference=True, admin=True)


def bearer(request: web.Request) -> str | None:
    """The token of an ``Authorization: Bearer <token>`` header (the scheme in any case), or None."""
    scheme, _, token = request.headers.get("Authorization", "").strip().partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


# Schemes a client may send in Authorization's place of Bearer (IANA's HTTP authentication scheme
# registry and common API-key habits): named back to it. Any other first word may be the key itself
# sent without a scheme, and is never echoed.
_SCHEMES = {"basic", "digest", "negotiate", "ntlm", "token", "apikey", "api-key", "key", "hoba", "mutual", "dpop"}


def _scheme_hint(header: str) -> str:
    """What to say of an Authorization header that carries no bearer token (a user's trial: a bare
    "Bearer" read "It came with the 'Bearer' scheme: use Bearer.", and a key sent without a scheme
    was echoed as its scheme)."""
    parts = header.strip().split(None, 1)
    if not parts:
        return ""
    if parts[0].lower() == "bearer":
        return "The Bearer scheme came with no key after it. "
    if parts[0].lower() in _SCHEMES:
        return f"It came with the {parts[0]!r} scheme: use Bearer. "
    return "It came without the Bearer scheme: write 'Bearer ' before the key. "


def _unauthorized(message: str, code: str | None) -> APIError:
    # OpenAI's own 401 body: type invalid_request_error, code invalid_api_key for a wrong key.
    return APIError(401, message, kind="invalid_request_error", code=code, headers=dict(_CHALLENGE))


class Auth:
    """Authentication, scopes and per-key limits for one gateway process."""

    def __init__(
        self, settings: GatewaySettings, keys: KeyRegistry, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.s, self.keys = settings, keys
        self.state_bound = StateBound()  # the key lookups' Redis reads (the gateway's, once it made this)
        self.limiter = KeyLimiter(clock)
        self.defaults = (settings.key_rate_per_s, settings.key_burst, settings.key_concurrency)

    def _is_bootstrap(self, token: str | None) -> bool:
        if token is None or not self.s.admin_key:
            return False
        given = token.encode("utf-8", "surrogateescape")
        return hmac.compare_digest(given, self.s.admin_key.encode("utf-8", "surrogateescape"))

    async def principal(self, request: web.Request) -> Principal:
        """The caller of ``request`` (noted for its access line): the bootstrap admin for
        ``admin_key``; with ``auth = "keys"`` the API key's holder; else the anonymous caller (a
        bearer token that is not the admin key is ignored then, as vLLM without --api-key ignores one).

        Raises:
            APIError(401): with ``auth = "keys"``, no bearer token, or one that is no key of
                ours or a revoked one.
            RedisError: the key store is unreachable, or gave no answer within
                ``StateBound``'s 2 s (the error middleware answers 503).
        """
        access.note(request, caller=(who := await self._principal(request)))
        return who

    async def _principal(self, request: web.Request) -> Principal:
        token = bearer(request)
        if self._is_bootstrap(token):
            return BOOTSTRAP_ADMIN
        if self.s.auth != "keys":
            return ANONYMOUS
        if token is None:
            scheme = _scheme_hint(request.headers.get("Authorization", ""))
            raise _unauthorized(
                f"You didn't provide an API key. {scheme}Send it in an Authorization header using Bearer auth "
                "(Authorization: Bearer YOUR_KEY); `dlora keys create` or POST /v1/keys makes one.",
                None,
            )
        key = await self.keys.lookup(apikeys.digest(token), self.state_bound) if apikeys.plausible(token) else None
        if key is None:
            shown = token if len(token) <= 12 else f"{token[:9]}***{token[-4:]}"
            # as text JSON can carry: undecodable header bytes were lone surrogates strict parsers refuse
            shown = shown.encode("utf-8", "backslashreplace").decode("ascii", "backslashreplace")
            raise _unauthorized(f"Incorrect API key provided: {shown}.", "invalid_api_key")
        if key.revoked:
            raise _unauthorized(f"The API key {key.hint} ({key.id}) has been revoked.", "invalid_api_key")
        return self._of(key)

    def _of(self, key: ApiKey) -> Principal:
        rate, burst, concurrency = self.defaults
        limits = Limits.of(
            key.rate_per_s if key.rate_per_s is not None else rate,
            key.burst if key.burst else burst,
            key.concurrency if key.concurrency is not None else concurrency,
        )
        return Principal(
            key_id=key.id,
            tenant=key.tenant,
            inference=apikeys.INFERENCE in key.scopes,
            admin=apikeys.ADMIN in key.scopes,
            limits=limits,
        )

    async def inference(self, request: web.Request) -> Principal:
        """The caller, who must hold the inference scope.

        Raises:
            APIError(401): as ``principal``.
            APIError(403): a key without the inference scope.
        """
        who = await self.principal(request)
        if not who.inference:
            raise APIError(403, "this API key has no inference scope", code="insufficient_scope")
        return who

    async def lister(self, request: web.Request) -> Principal:
        """The caller of a listing (``GET /v1/models``), who must hold the inference or the admin
        scope: an admin-only key registers adapters and must see them listed (a user's trial: 403).

        Raises:
            APIError(401): as ``principal``.
            APIError(403): a key with neither scope.
        """
        who = await self.principal(request)
        if not (who.inference or who.admin):
            raise APIError(403, "this API key has neither the inference nor the admin scope", code="insufficient_scope")
        return who

    async def admin(self, request: web.Request) -> Principal:
        """The caller, who must be an admin: the ``admin_key``, or with ``auth = "keys"`` a key with
        the admin scope.

        Raises:
            APIError(401): no admin credential (with ``auth = "none"``: none configured, or another
                bearer token); with ``"keys"`` as ``principal``.
            APIError(403): a valid API key without the admin scope.
        """
        who = await self.principal(request)
        if who.admin:
            return who
        if self.s.auth != "keys":
            if not self.s.admin_key:
                raise APIError(
                    401, "admin endpoints are disabled: no admin_key is configured", headers=dict(_CHALLENGE)
                )
            raise APIError(
                401, "this admin endpoint needs 'Authorization: Bearer <admin key>'", headers=dict(_CHALLENGE)
            )
        raise APIError(403, "this needs an API key with the admin scope", code="insufficient_scope")

    @contextlib.contextmanager
    def admitted(self, who: Principal) -> Iterator[None]:
        """Runs the block as one of ``who``'s requests within its key's limits (callers without a
        key have none).

        Raises:
            APIError(429): over the key's rate or concurrency, with ``Retry-After`` (seconds) and
                ``retry-after-ms``.
        """
        if who.key_id is None or who.limits.unlimited:
            yield
            return
        refusal = self.limiter.admit(who.key_id, who.limits)
        if refusal is not None:
            raise APIError(
                429,
                refusal.message,
                code="rate_limit_exceeded",
                headers=refusal.headers,
            )
        try:
            yield
        finally:
            self.limiter.release(who.key_id)
