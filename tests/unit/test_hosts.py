"""Which Host headers a gateway answers (DNS rebinding protection): the pure parts."""

from __future__ import annotations

import pytest

from dlora.services.gateway.hosts import allowed_hosts, host_allowed, host_name, is_loopback


@pytest.mark.parametrize(
    ("header", "host"),
    [
        ("localhost:8000", "localhost"),
        ("LocalHost.", "localhost"),
        ("127.0.0.1", "127.0.0.1"),
        ("[::1]:8000", "::1"),
        ("[::1]", "::1"),
        ("::1", "::1"),  # bare IPv6 (not valid in a Host header, read whole all the same)
        ("Evil.Example:80", "evil.example"),
        ("localhost:8000, evil", "localhost:8000, evil"),  # no host's characters: whole, matching nothing
        ("localhost,evil", "localhost,evil"),
        ("user@localhost", "user@localhost"),
    ],
)
def test_the_host_of_a_header_is_without_port_brackets_case_or_final_dot(header: str, host: str) -> None:
    assert host_name(header) == host


@pytest.mark.parametrize("host", ["localhost", "app.localhost", "127.0.0.1", "127.1.2.3", "::1"])
def test_loopback_hosts(host: str) -> None:
    assert is_loopback(host)


@pytest.mark.parametrize("host", ["evil.example", "localhost.evil.example", "10.0.0.1", "0.0.0.0", "::", ""])
def test_hosts_that_are_not_loopback(host: str) -> None:
    assert not is_loopback(host)


def test_a_loopback_gateway_without_keys_answers_loopback_names_only() -> None:
    assert allowed_hosts("127.0.0.1", "none", []) == frozenset()
    assert allowed_hosts("localhost", "none", []) == frozenset()
    assert allowed_hosts("::1", "none", []) == frozenset()


def test_a_gateway_with_keys_or_on_another_address_answers_any_host_unless_told() -> None:
    assert allowed_hosts("127.0.0.1", "keys", []) is None  # a rebound page has no key: 401 anyway
    assert allowed_hosts("0.0.0.0", "none", []) is None  # its names are not known here
    assert allowed_hosts("0.0.0.0", "none", ["Models.Example."]) == frozenset({"models.example"})
    assert allowed_hosts("127.0.0.1", "none", ["*"]) is None


@pytest.mark.parametrize("header", ["[::ffff:127.0.0.1]:8000", "[::ffff:7f00:1]"])
def test_an_ipv4_mapped_loopback_host_is_loopback(header: str) -> None:
    """A browser at http://[::ffff:127.0.0.1]:8000/ reaches a gateway on 127.0.0.1 and says Host
    [::ffff:7f00:1]; Python before 3.13 does not call that address loopback, so it was refused."""
    assert is_loopback(host_name(header))


def test_a_name_with_a_leading_dot_allows_that_domain_and_every_name_under_it() -> None:
    """Django's ``ALLOWED_HOSTS`` form: a gateway behind several names of one domain lists it once."""
    allowed = allowed_hosts("0.0.0.0", "none", [".Example.com", "api.other.org"])
    assert allowed is not None
    for host in ("example.com", "api.example.com", "a.b.example.com", "api.other.org", "localhost"):
        assert host_allowed(host, allowed), host
    for host in ("badexample.com", "example.com.evil.net", "other.org", "x.api.other.org", "com", ""):
        assert not host_allowed(host, allowed), host


@pytest.mark.parametrize(
    "header", ["evil.test/.example.com", "localhost:8000, api.example.com", "user@api.example.com", "a b.example.com"]
)
def test_a_header_no_host_is_made_of_matches_no_domain_entry(header: str) -> None:
    """``host_name`` returns such a header whole "to match nothing"; read by its dots, it ended
    in ".example.com" and was answered under that entry."""
    allowed = allowed_hosts("0.0.0.0", "none", [".example.com"])
    assert allowed is not None
    assert not host_allowed(host_name(header), allowed), header


@pytest.mark.parametrize("name", ["*.example.com", "api.*.org", "*example.com"])
def test_a_wildcard_in_a_name_is_refused_with_the_form_that_is_read(name: str) -> None:
    """Starlette's TrustedHostMiddleware (FastAPI's) reads "*.example.com"; here it was taken and
    matched no Host ever (only "*" alone is a wildcard, and ".example.com" the domain form): every
    request through that name a 403, the setting looking right."""
    from dlora.common.settings import SettingsError, load
    from dlora.services.gateway.settings import GatewaySettings

    with pytest.raises(SettingsError, match=r"'\.example\.com'"):
        load(GatewaySettings, "gateway", env={"DLORA_MODEL": "/m", "DLORA_GATEWAY_ALLOWED_HOSTS": f'["{name}"]'})
