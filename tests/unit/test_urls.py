"""NATS seed URLs and Redis Sentinel URLs as settings give them."""

from __future__ import annotations

import pytest

from dlora.common.settings import Common, SettingsError, load
from dlora.common.urls import SentinelAddress, nats_servers, parse_sentinel_url


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
