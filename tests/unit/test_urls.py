"""NATS seed URLs and Redis Sentinel URLs as settings give them."""

from __future__ import annotations

import pytest

from dlora.common.settings import Common, SettingsError, load
from dlora.common.urls import SentinelAddress, nats_login, nats_servers, parse_sentinel_url, redacted


def test_nats_servers_split_on_commas() -> None:
    assert nats_servers("nats://a:4222") == ["nats://a:4222"]
    assert nats_servers(" nats://a:4222, nats://b:4222 ,") == ["nats://a:4222", "nats://b:4222"]
    with pytest.raises(ValueError, match="no NATS server"):
        nats_servers(" , ")


def test_sentinel_url_names_every_sentinel_the_service_and_the_database() -> None:
    url = "redis+sentinel://dlora:p%40ss@10.0.0.1:26380,10.0.0.2/dlora/3"
    assert parse_sentinel_url(url) == SentinelAddress(
        [("10.0.0.1", 26380), ("10.0.0.2", 26379)], "dlora", db=3, username="dlora", password="p@ss"
    )
    assert parse_sentinel_url("redis+sentinel://h:1/svc") == SentinelAddress([("h", 1)], "svc")
    assert parse_sentinel_url("redis+sentinel://[::1],[fd00::2]:26380/svc").sentinels == [
        ("::1", 26379),
        ("fd00::2", 26380),
    ]


@pytest.mark.parametrize(
    ("url", "why"),
    [
        ("redis://h:6379/0", "is not a redis\\+sentinel"),
        ("redis+sentinel://h:26379", "expected"),  # no service
        ("redis+sentinel:///dlora", "expected"),  # no sentinel
        ("redis+sentinel://h:port/dlora", "is not host\\[:port\\]"),
        ("redis+sentinel://h:99999/dlora", "is not host"),  # past 65535
        ("redis+sentinel://h:26379/dlora/x", "not a number"),
    ],
)
def test_a_bad_sentinel_url_says_what_is_wrong(url: str, why: str) -> None:
    with pytest.raises(ValueError, match=why):
        parse_sentinel_url(url)


def test_settings_refuse_a_bad_sentinel_url_and_replicas_past_jetstreams_limit() -> None:
    with pytest.raises(SettingsError, match="redis_url.*is not host"):
        load(Common, "gateway", env={"DLORA_REDIS_URL": "redis+sentinel://h:x/dlora"})
    with pytest.raises(SettingsError, match="nats_kv_replicas=7 must be 1 to 5"):
        load(Common, "gateway", env={"DLORA_NATS_KV_REPLICAS": "7"})


def test_an_http_url_puts_an_ipv6_host_in_brackets() -> None:
    """`dlora up` with host "::1" printed http://::1:18720/..., which curl refused."""
    from dlora.common.urls import http_url

    assert [http_url(h, 8000) for h in ("::1", "127.0.0.1", "", "::")] == [
        "http://[::1]:8000",
        "http://127.0.0.1:8000",
        "http://0.0.0.0:8000",
        "http://[::]:8000",
    ]


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("nats://app:s3cret@127.0.0.1:4222", "nats://app:***@127.0.0.1:4222"),
        # A seed list and a Sentinel URL: urllib raised on them ("Port could not be cast to
        # integer value"), and `dlora keys` died with a traceback.
        ("nats://u:s3cret@h1:4222,nats://u:s3cret@h2:4222", "nats://u:***@h1:4222,nats://u:***@h2:4222"),
        ("nats://h1:4222,nats://u:s3cret@h2:4222", "nats://h1:4222,nats://u:***@h2:4222"),  # the second seed's
        ("redis+sentinel://u:s3cret@h1:26379,h2:26379/dlora/0", "redis+sentinel://u:***@h1:26379,h2:26379/dlora/0"),
        ("nats://s3cret@h:4222", "nats://***@h:4222"),  # a token login
        ("tls://s3cret@h:4222", "tls://***@h:4222"),
        ("redis://dlora@h:6379/0", "redis://dlora@h:6379/0"),  # a Redis user name, no password
        ("redis://:s3cret@h:6379/0", "redis://:***@h:6379/0"),
        ("rediss://u:s3cret@[::1]:6380/0?ssl_cert_reqs=none", "rediss://u:***@[::1]:6380/0?ssl_cert_reqs=none"),
        ("nats://u:s3c@ret@h:4222", "nats://u:***@h:4222"),  # an "@" left unquoted in the password
        ("nats://u:s3cret@h:port", "nats://u:***@h:port"),  # malformed: shown, not raised on
        ("http://127.0.0.1:8000/v1", "http://127.0.0.1:8000/v1"),
        ("", ""),
    ],
)
def test_a_url_is_shown_without_its_password_or_token(url: str, shown: str) -> None:
    assert redacted(url) == shown


def test_a_bad_sentinel_url_is_named_without_its_password() -> None:
    with pytest.raises(ValueError, match="is not host") as e:
        parse_sentinel_url("redis+sentinel://u:s3cret@h:x/dlora")
    assert "s3cret" not in str(e.value)
    with pytest.raises(SettingsError, match="redis_url") as e2:
        load(Common, "gateway", env={"DLORA_REDIS_URL": "redis+sentinel://u:s3cret@h:26379"})
    assert "s3cret" not in str(e2.value)


def test_the_nats_login_named_is_the_one_nats_py_sends() -> None:
    assert nats_login("nats://h:4222") == "no user"
    assert nats_login("nats://h:4222", "dispatcher", "pw") == "user 'dispatcher'"
    assert nats_login("nats://u:pw@h:4222", "dispatcher", "pw") == "user 'dispatcher'"  # the settings' first
    assert nats_login("nats://h1:4222,nats://u%40x:pw@h2:4222") == "user 'u@x'"
    assert nats_login("nats://u:pw@h:4222", "dispatcher") == "user 'u'"  # a user without a password is not sent
    assert nats_login("nats://s3cret@h:4222") == "a token"
