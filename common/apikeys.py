"""Inference API keys: made, hashed and checked. Pure: storing them is ``state.py``'s and
``key_registry.py``'s work, presenting them the gateway's.

A key is ``sk-dlora-`` and 43 URL-safe characters (``secrets.token_urlsafe(32)``: 256 random
bits), shown once when it is made. Only its SHA-256 digest is kept. A fast unsalted hash is the
right one here, as GitHub and Stripe use for their tokens: salts and slow hashes (scrypt, bcrypt,
argon2) exist to make guessing low-entropy passwords expensive, and nobody guesses 256 random bits
whatever the hash costs; a slow hash would instead spend tens of milliseconds of gateway CPU on
every request, and a salt would stop a presented key from being found by its digest (one Redis
lookup). The digest is no secret worth stealing either: it does not authenticate, the key does.
"""

from __future__ import annotations

import hashlib
import math
import re
import secrets

from dlora.common.messages import ApiKey

PREFIX = "sk-dlora-"
INFERENCE, ADMIN = "inference", "admin"
SCOPES = (INFERENCE, ADMIN)
# A tenant name travels in requests (GenerateRequest.tenant) and listings: kept to what any log or
# metric label takes without quoting.
TENANT_PATTERN = r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}"
_TENANT = re.compile(TENANT_PATTERN)
# The most random characters a key has; a longer bearer token is no key of ours (not hashed).
_MAX_LEN = len(PREFIX) + 64


class KeySpecError(ValueError):
    """A key's fields are invalid; ``param`` names the field (as the API's body spells it)."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(message)
        self.param = param


def digest(secret: str) -> str:
    """The SHA-256 of a presented key, hex: what is stored and looked up."""
    return hashlib.sha256(secret.encode("utf-8", "surrogateescape")).hexdigest()


def plausible(secret: str) -> bool:
    """Whether ``secret`` has a key's form: anything else is refused without a lookup."""
    return secret.startswith(PREFIX) and len(PREFIX) < len(secret) <= _MAX_LEN


def tenant_problem(tenant: str) -> str | None:
    """Why ``tenant`` is not a valid tenant name, or None."""
    if not _TENANT.fullmatch(tenant):  # not match: its $ lets a trailing newline through
        return f"tenant must be 1-64 letters, digits, '.', '_' or '-' starting with a letter or digit, got {tenant!r}"
    return None


# The largest rate, burst or concurrency a key may be given: past it a limit means nothing (a
# user's trial stored a concurrency of 1e23).
MAX_LIMIT = 1_000_000
# The smallest rate a key may have above 0 (one request in 11.6 days): a refusal's wait is 1 / rate,
# and 5e-324 made it infinite (every refusal a 500) and 1e-300 a Retry-After of 300 digits.
MIN_RATE = 1e-6


def check_spec(
    tenant: str, scopes: list[str], rate_per_s: float | None, burst: int | None, concurrency: int | None
) -> None:
    """Raises KeySpecError naming the first invalid field: a bad tenant name, no scope or an unknown
    one, a negative or non-finite rate, a negative burst or concurrency."""
    if (problem := tenant_problem(tenant)) is not None:
        raise KeySpecError("tenant", problem)
    if not scopes or any(s not in SCOPES for s in scopes):
        raise KeySpecError("scopes", f"scopes must be one or more of {', '.join(SCOPES)}, got {scopes!r}")
    if rate_per_s is not None and not (
        rate_per_s == 0 or (math.isfinite(rate_per_s) and MIN_RATE <= rate_per_s <= MAX_LIMIT)
    ):
        raise KeySpecError(
            "rate_per_s",
            f"rate_per_s must be 0 (no limit) or a number in [{MIN_RATE:g}, {MAX_LIMIT:g}], got {rate_per_s!r}",
        )
    for name, value in (("burst", burst), ("concurrency", concurrency)):
        if value is not None and not 0 <= value <= MAX_LIMIT:
            raise KeySpecError(
                name, f"{name} must be in [0, {MAX_LIMIT:g}] (0: the default or no limit), got {value!r}"
            )


def new_key(
    tenant: str,
    scopes: list[str],
    now: float,
    *,
    rate_per_s: float | None = None,
    burst: int | None = None,
    concurrency: int | None = None,
) -> tuple[str, ApiKey]:
    """A fresh key: the secret (to show once) and its stored record.

    Raises:
        KeySpecError: a field is invalid (``check_spec``).
    """
    check_spec(tenant, scopes, rate_per_s, burst, concurrency)
    secret = PREFIX + secrets.token_urlsafe(32)
    record = ApiKey(
        id=f"key-{secrets.token_hex(8)}",
        digest=digest(secret),
        hint=f"{PREFIX}...{secret[-4:]}",
        tenant=tenant,
        scopes=sorted(set(scopes), key=SCOPES.index),
        created=now,
        rate_per_s=rate_per_s,
        burst=burst,
        concurrency=concurrency,
    )
    return secret, record


def public(key: ApiKey) -> dict[str, object]:
    """A key as listings show it: every field but the digest."""
    return {
        "id": key.id,
        "object": "api_key",
        "hint": key.hint,
        "tenant": key.tenant,
        "scopes": list(key.scopes),
        "created": int(key.created),
        "rate_per_s": key.rate_per_s,
        "burst": key.burst,
        "concurrency": key.concurrency,
        "revoked": key.revoked,
    }
