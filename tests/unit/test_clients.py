"""Which reply readers are still there, and which came back from a dropped connection (pure)."""

from __future__ import annotations

from dlora.common.clients import FAILOVER_S, Clients


def test_a_client_is_gone_only_after_it_was_heard_and_fell_silent_for_the_ttl() -> None:
    clients = Clients(ttl_s=5.0)
    assert not clients.gone("never-heard", 100.0)
    clients.heard("gw", 0.0)
    silence = 5.0 + FAILOVER_S  # the TTL, and time for a failover to another NATS node
    for t in (4.0, silence):  # others are heard meanwhile (workers' stats)
        clients.noted(t)
    assert not clients.gone("gw", silence) and clients.gone("gw", silence + 0.1)
    clients.forgive(10.0)  # the observer's own connection was down: their silence says nothing
    for t in (14.0, 10.0 + silence):
        clients.noted(t)
    assert not clients.gone("gw", 10.0 + silence) and clients.gone("gw", 10.1 + silence)


def test_a_client_failing_over_to_another_nats_node_is_not_taken_for_gone() -> None:
    """The deploy test, once: the gateway's NATS node killed, its first reconnect attempt went to
    a node that did not answer (2 s, nats-py's connect timeout) and the next one took; 3 s after its
    last announcement a worker on another node, hearing everyone else, dropped its stream (TTL 2 s)."""
    clients = Clients(ttl_s=2.0)
    clients.heard("gw", 0.0)
    for t in range(1, 9):  # workers' stats all along
        clients.noted(t / 2)
    assert not clients.gone("gw", 4.0)
    assert clients.heard("gw", 4.0, reconnects=1)  # back: what it missed is sent again


def test_a_client_is_not_gone_while_the_observer_heard_no_one() -> None:
    """A worker whose host was cut off hears no one; its own NATS node stayed up, so no reconnect
    forgives the silence. It must not take the clients for gone: a request reaching it when the
    link is back, before the first announcement, would be dropped for a client that is there."""
    clients = Clients(ttl_s=2.0)
    clients.heard("gw", 0.0)
    clients.noted(0.5)
    assert not clients.gone("gw", 8.0)  # cut off from 0.5 to 8: no one heard
    clients.noted(8.1)  # the link is back: another worker's stats come before "gw" announces
    assert not clients.gone("gw", 8.5)  # the silence was ours: forgiven
    for t in (10.0, 11.5, 13.0):  # others heard meanwhile, "gw" still silent
        clients.noted(t)
    assert not clients.gone("gw", 13.0)
    assert clients.gone("gw", 13.2)  # silent since the forgiveness at 8.1: more than TTL + FAILOVER_S
    clients.heard("gw", 13.3)
    assert not clients.gone("gw", 13.3)


def test_no_client_is_gone_while_the_observer_s_own_nats_link_is_down_or_just_came_back() -> None:
    """Redis heard meanwhile (``noted``) says nothing of announcements that could not cross a NATS
    that was down: a 9 s NATS restart stopped every stream with a client (a helper's finding)."""
    link = [True, 0]
    clients = Clients(ttl_s=2.0, link=lambda: (bool(link[0]), int(link[1])))
    clients.heard("gw", 0.0)
    link[0] = False  # NATS down from 0.5; Redis takes the heartbeats
    for t in (1.0, 3.0, 6.0, 9.0):
        clients.noted(t)
        assert not clients.gone("gw", t + 0.1)
    link[:] = [True, 1]  # back at 9.5, "gw" not yet: the TTL counts from the first look after
    assert not clients.gone("gw", 9.6)
    for t in (11.0, 12.5, 14.0):
        clients.noted(t)
    assert not clients.gone("gw", 14.5) and clients.gone("gw", 14.7)
    # a look now and then (``watch_link``) forgives as of the link's return, not of a much later look
    clients.heard("gw-dead", 20.0)
    link[:] = [True, 2]
    clients.watch_link(21.0)
    for t in range(22, 300):  # others heard meanwhile
        clients.noted(float(t))
    assert clients.gone("gw-dead", 300.0)


def test_a_reader_started_again_is_news_once_though_its_count_starts_again() -> None:
    """A restarted process counts its reconnects from 0: the worker remembered its old count and
    never sent it what it missed (a helper's finding). Its new start says so; several processes
    sharing a name are each news once, not at every announcement."""
    clients = Clients(ttl_s=5.0)
    assert clients.heard("app", 0.0, reconnects=3, incarnation="a")  # first heard, after reconnects
    assert not clients.heard("app", 2.0, reconnects=3, incarnation="a")
    assert clients.heard("app", 4.0, reconnects=0, incarnation="b")  # started again
    assert not clients.heard("app", 5.5, reconnects=0, incarnation="b")
    assert clients.heard("app", 7.0, reconnects=0, incarnation="c")  # a second process, same name
    assert not any(clients.heard("app", 9.0 + i, 0, start) for i, start in enumerate("bcbc"))
    # twelve processes under one name, each announcing every second: each start news once, then
    # quiet (a review: with eight remembered, twelve were sent their replies again every second)
    news = [clients.heard("app", 20.0 + t + i / 100, 0, f"p{i}") for t in range(30) for i in range(12)]
    assert sum(news[12:]) <= 12 and not any(news[-36:])


def test_heard_says_when_a_client_s_connection_came_back() -> None:
    clients = Clients(ttl_s=5.0)
    assert not clients.heard("gw", 0.0, reconnects=0)
    assert not clients.heard("gw", 1.0, reconnects=0)
    assert clients.heard("gw", 2.0, reconnects=1)  # it may have missed replies meanwhile
    assert not clients.heard("gw", 3.0, reconnects=1)
    assert clients.heard("late", 3.0, reconnects=2)  # first heard after reconnecting: a re-send costs little
    # the count is the client's word: a client claiming a reconnect in every message is believed
    # at most once a second
    assert clients.heard("noisy", 10.0, reconnects=1)
    assert not clients.heard("noisy", 10.5, reconnects=2)
    assert clients.heard("noisy", 11.0, reconnects=3)


def test_a_flood_of_names_forgets_the_longest_silent_and_keeps_the_map_bounded() -> None:
    """Anyone allowed to publish announcements may send thousands of made-up names: the map keeps
    at most MAX_CLIENTS, forgetting the longest silent first (as never heard from: requests kept),
    and a real client that keeps announcing is never forgotten."""
    from dlora.common import clients as module

    clients = Clients(ttl_s=5.0)
    clients.heard("gw", 0.0)
    for i in range(2 * module.MAX_CLIENTS):
        now = i * 1e-4
        clients.heard(f"fake-{i}", now)
        if i % 1000 == 0:
            clients.heard("gw", now)
    assert len(clients._last) == module.MAX_CLIENTS
    assert "fake-0" not in clients._last and f"fake-{2 * module.MAX_CLIENTS - 1}" in clients._last
    assert "gw" in clients._last  # it announced lately
    for t in range(3, 1000, 4):  # others heard all along (workers' stats): no forgiveness
        clients.noted(float(t))
    clients.heard("gw", 1000.0)  # the names, silent 100 TTLs: forgotten at the next announcement
    assert list(clients._last) == ["gw"]
