"""free_port draws ports no outgoing connection can take before a server binds them (a CI failure:
a systemd gateway found the port it was given taken by a neighbouring test's connection)."""

from __future__ import annotations

import random
import socket

from dlora.services.servers import ephemeral_ports, free_port


def test_ports_are_drawn_outside_the_ephemeral_range_and_never_twice() -> None:
    random.seed(0)  # a test seeding the module's generator must not make parallel processes draw alike
    ephemeral = ephemeral_ports()
    ports = [free_port() for _ in range(200)]
    assert not [p for p in ports if p in ephemeral]
    assert len(set(ports)) == len(ports)
    assert all(10_000 <= p < 65_536 for p in ports)


def test_a_drawn_port_is_one_a_server_can_listen_on() -> None:
    port = free_port()
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))
        s.listen()


def test_a_port_drawn_on_the_ipv6_loopback_is_one_a_server_can_listen_on() -> None:
    """An IPv4 socket cannot bind "::1": each draw failed, then the fallback raised."""
    port = free_port("::1")
    with socket.socket(socket.AF_INET6) as s:
        s.bind(("::1", port))
        s.listen()
