"""API keys (made, hashed, checked), the per-key limiter (a token bucket and a concurrency cap, on a
hand-stepped clock), and who a request's bearer token makes its caller; no servers."""

from __future__ import annotations

import hashlib

import msgspec
import pytest
from aiohttp.test_utils import make_mocked_request

from dlora.common import apikeys
from dlora.common.messages import AdapterEntry, ApiKey
from dlora.services.gateway.auth import ANONYMOUS, BOOTSTRAP_ADMIN, Auth, Principal
from dlora.services.gateway.limits import KeyLimiter, Limits
from dlora.services.gateway.openai import APIError
from dlora.services.gateway.settings import GatewaySettings

# ---- keys --------------------------------------------------------------------------------


def test_a_key_is_256_random_bits_kept_only_as_its_sha256() -> None:
    secret, key = apikeys.new_key("acme", ["inference"], 100.0)
    other, _ = apikeys.new_key("acme", ["inference"], 100.0)
    assert secret.startswith("sk-dlora-") and len(secret) == len("sk-dlora-") + 43 and secret != other
    assert key.digest == hashlib.sha256(secret.encode()).hexdigest() == apikeys.digest(secret)
    assert apikeys.digest(other) != key.digest
    stored = msgspec.json.encode(key).decode()
    assert secret not in stored and secret[len("sk-dlora-") :][:-4] not in stored  # only the hint's 4 characters
    assert key.hint == f"sk-dlora-...{secret[-4:]}" and key.id.startswith("key-") and key.id not in secret
    assert (key.tenant, key.scopes, key.created, key.revoked) == ("acme", ["inference"], 100.0, False)
    assert (key.rate_per_s, key.burst, key.concurrency) == (None, None, None)  # the gateway's defaults
    assert "digest" not in apikeys.public(key) and apikeys.public(key)["id"] == key.id


def test_scopes_are_deduplicated_in_a_fixed_order() -> None:
    _, key = apikeys.new_key("acme", ["admin", "inference", "admin"], 0.0)
    assert key.scopes == ["inference", "admin"]


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"tenant": ""}, "tenant"),
        ({"tenant": "has space"}, "tenant"),
        ({"tenant": "-dash-first"}, "tenant"),
        ({"tenant": "x" * 65}, "tenant"),
        ({"tenant": "acme\n"}, "tenant"),  # re.match's $ let a trailing newline through
        ({"scopes": []}, "scopes"),
        ({"scopes": ["root"]}, "scopes"),
        ({"rate_per_s": -1.0}, "rate_per_s"),
        ({"rate_per_s": float("nan")}, "rate_per_s"),
        ({"rate_per_s": float("inf")}, "rate_per_s"),
        ({"burst": -1}, "burst"),
        ({"concurrency": -2}, "concurrency"),
        ({"concurrency": 10**23}, "concurrency"),  # a user's trial: stored, listed as 1e+23
        ({"burst": 2**63}, "burst"),
        ({"rate_per_s": 1e12}, "rate_per_s"),
        ({"rate_per_s": 5e-324}, "rate_per_s"),  # its wait, 1 / rate, is infinite: every refusal a 500
        ({"rate_per_s": 1e-300}, "rate_per_s"),  # a Retry-After of 300 digits
    ],
)
def test_an_invalid_field_is_refused_by_name(fields: dict, param: str) -> None:
    spec = {"tenant": "acme", "scopes": ["inference"]} | fields
    with pytest.raises(apikeys.KeySpecError) as e:
        apikeys.new_key(spec.pop("tenant"), spec.pop("scopes"), 0.0, **spec)
    assert e.value.param == param


def test_only_tokens_of_a_keys_form_are_looked_up() -> None:
    secret, _ = apikeys.new_key("acme", ["inference"], 0.0)
    assert apikeys.plausible(secret)
    assert not any(apikeys.plausible(t) for t in ("", "sk-dlora-", "sk-openai-abc", "sk-dlora-" + "x" * 65))


# ---- the limiter ----------------------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_the_token_bucket_allows_the_burst_then_the_rate() -> None:
    clock = Clock()
    limiter = KeyLimiter(clock)
    limits = Limits.of(rate_per_s=2.0, burst=3, concurrency=0)
    for _ in range(3):
        assert limiter.admit("k", limits) is None
        limiter.release("k")
    refusal = limiter.admit("k", limits)
    assert refusal is not None and refusal.headers["Retry-After"] == "1" and "2 requests per second" in refusal.message
    assert refusal.headers["retry-after-ms"] == "500"  # exact, for the openai package
    clock.now += 0.5  # one token back at 2 per second
    assert limiter.admit("k", limits) is None
    limiter.release("k")
    assert limiter.admit("k", limits) is not None
    clock.now += 100  # a quiet spell refills to the burst, not beyond
    admitted = [limiter.admit("k", limits) for _ in range(4)]
    assert admitted[:3] == [None, None, None] and admitted[3] is not None
    assert limiter.admit("other", limits) is None  # each key its own bucket


def test_retry_after_is_the_wait_for_one_token_in_whole_seconds_and_in_ms() -> None:
    clock = Clock()
    limiter = KeyLimiter(clock)
    slow = Limits.of(rate_per_s=0.1, burst=1, concurrency=0)
    assert limiter.admit("k", slow) is None
    clock.now += 2.5  # a quarter of a token back: 7.5 s to wait
    refusal = limiter.admit("k", slow)
    assert refusal is not None and refusal.headers == {"Retry-After": "8", "retry-after-ms": "7500"}


@pytest.mark.parametrize("rate", [5e-324, 1e-300])
def test_a_key_stored_with_a_rate_too_small_to_wait_for_is_refused_with_a_bounded_wait(rate: float) -> None:
    """A key made before the smallest rate was checked (or a gateway's key_rate_per_s): the second
    request's wait, 1 / rate, overflowed math.ceil (500 OverflowError) or filled the header with
    300 digits. Waits are said as at most the smallest rate's (1e6 s, 11.6 days)."""
    limiter, limits = KeyLimiter(Clock()), Limits.of(rate_per_s=rate, burst=1, concurrency=0)
    assert limiter.admit("k", limits) is None
    refusal = limiter.admit("k", limits)
    assert refusal is not None and refusal.headers == {"Retry-After": "1000000", "retry-after-ms": "1000000000"}
    assert "try again in 1000000.00 s" in refusal.message


def test_a_bucket_refilled_to_its_burst_is_dropped_at_the_next_sweep() -> None:
    """Each key ever limited kept its bucket (a helper: 100,000 keys used once each, 21 MB)."""
    clock = Clock()
    limiter = KeyLimiter(clock)
    limits = Limits.of(rate_per_s=1.0, burst=2, concurrency=0)
    for key in ("a", "b"):
        assert limiter.admit(key, limits) is None
        limiter.release(key)
    clock.now += 30.0
    assert limiter.admit("b", limits) is None  # b used again: not full at the sweep below
    limiter.release("b")
    clock.now += 30.5  # a sweep is due: a refilled long ago, b's token back by now too
    assert limiter.admit("c", limits) is None
    limiter.release("c")
    assert set(limiter._buckets) == {"c"}
    assert limiter.admit("a", limits) is None and limiter.admit("a", limits) is None  # fresh: its burst
    assert limiter.admit("a", limits) is not None


def test_concurrency_counts_requests_in_progress_and_a_refusal_takes_no_token() -> None:
    clock = Clock()
    limiter = KeyLimiter(clock)
    limits = Limits.of(rate_per_s=1.0, burst=3, concurrency=2)
    assert limiter.admit("k", limits) is None and limiter.admit("k", limits) is None
    refusal = limiter.admit("k", limits)
    assert refusal is not None and "2 requests at once" in refusal.message and refusal.headers["Retry-After"] == "1"
    assert limiter.running("k") == 2
    limiter.release("k")
    assert limiter.admit("k", limits) is None  # the third token: the refusal above took none
    limiter.release("k")
    limiter.release("k")
    assert limiter.running("k") == 0


def test_default_burst_and_no_limits() -> None:
    assert Limits.of(2.5, 0, 0).burst == 3 and Limits.of(0.2, 0, 0).burst == 1 and Limits.of(5, 7, 0).burst == 7
    assert Limits.of(0, 0, 0).unlimited and not Limits.of(0, 0, 1).unlimited
    limiter = KeyLimiter(Clock())
    assert all(limiter.admit("k", Limits.of(0, 0, 0)) is None for _ in range(1000))


# ---- callers --------------------------------------------------------------------------------


class Keys:
    """A KeyRegistry's lookup over a dict (digest -> key)."""

    def __init__(self, *keys: ApiKey) -> None:
        self.by_digest = {k.digest: k for k in keys}

    async def lookup(self, digest: str, bound: object = None) -> ApiKey | None:
        return self.by_digest.get(digest)


def auth(mode: str, *keys: ApiKey, **settings: object) -> Auth:
    s = GatewaySettings(model="m", admin_key="boot", auth=mode, **settings)  # type: ignore[arg-type]
    return Auth(s, Keys(*keys), Clock())  # type: ignore[arg-type]


def request(token: str | None) -> object:
    return make_mocked_request("GET", "/v1/models", headers={"Authorization": f"Bearer {token}"} if token else {})


async def test_with_keys_the_caller_is_the_keys_tenant_and_anything_else_is_401() -> None:
    secret, key = apikeys.new_key("acme", ["inference"], 0.0, rate_per_s=5.0)
    revoked_secret, revoked = apikeys.new_key("acme", ["inference"], 0.0)
    a = auth("keys", key, msgspec.structs.replace(revoked, revoked=True), key_concurrency=4)
    who = await a.principal(request(secret))
    assert (who.key_id, who.tenant, who.inference, who.admin) == (key.id, "acme", True, False)
    assert who.limits == Limits(rate_per_s=5.0, burst=5, concurrency=4)  # its own rate, the gateway's cap
    assert await a.principal(request("boot")) is BOOTSTRAP_ADMIN
    for token, code in ((None, None), ("sk-dlora-unknown", "invalid_api_key"), (revoked_secret, "invalid_api_key")):
        with pytest.raises(APIError) as e:
            await a.principal(request(token))
        assert e.value.status == 401 and e.value.body()["error"]["code"] == code
        assert e.value.headers["WWW-Authenticate"].startswith("Bearer")
    with pytest.raises(APIError, match="revoked"):
        await a.principal(request(revoked_secret))
    with pytest.raises(APIError) as e:
        await a.admin(request(secret))
    assert e.value.status == 403


async def test_without_keys_anyone_is_the_anonymous_caller_and_admin_needs_the_admin_key() -> None:
    secret, key = apikeys.new_key("acme", ["inference", "admin"], 0.0)
    a = auth("none", key)
    assert await a.principal(request(None)) is ANONYMOUS
    assert await a.principal(request(secret)) is ANONYMOUS  # keys are not read without auth = "keys"
    assert await a.admin(request("boot")) is BOOTSTRAP_ADMIN
    with pytest.raises(APIError) as e:
        await a.admin(request(secret))
    assert e.value.status == 401
    assert (await auth("keys", key).admin(request(secret))).admin  # an admin-scope key, with keys on


def test_a_tenant_may_use_its_own_and_public_adapters_and_an_admin_all() -> None:
    def adapter(owner: str) -> AdapterEntry:
        return AdapterEntry(name="a", path="/p", rank=8, created=0.0, owner=owner)

    acme = Principal(key_id="k", tenant="acme", inference=True, admin=False)
    assert acme.may_use(adapter("")) and acme.may_use(adapter("acme")) and not acme.may_use(adapter("globex"))
    assert not ANONYMOUS.may_use(adapter("acme")) and ANONYMOUS.may_use(adapter(""))
    assert BOOTSTRAP_ADMIN.may_use(adapter("globex"))


async def test_admitted_answers_429_with_retry_after_and_releases_on_the_way_out() -> None:
    secret, key = apikeys.new_key("acme", ["inference"], 0.0, rate_per_s=100.0, concurrency=1)
    a = auth("keys", key)
    who = await a.principal(request(secret))
    with a.admitted(who):
        with pytest.raises(APIError) as e, a.admitted(who):
            pass
        assert e.value.status == 429 and e.value.headers == {"Retry-After": "1", "retry-after-ms": "1000"}
        assert e.value.body()["error"]["code"] == "rate_limit_exceeded"
    with pytest.raises(RuntimeError), a.admitted(who):  # a request that fails still gives its place back
        raise RuntimeError
    assert a.limiter.running(key.id) == 0
