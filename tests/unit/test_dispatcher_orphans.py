"""The wait of a re-dispatch that finds no live worker (``dispatcher/orphans.py``): pure."""

from dlora.common.state import INFLIGHT_TTL_S
from dlora.services.dispatcher.orphans import OrphanWait


def test_a_request_waits_from_the_first_time_it_found_no_worker_then_is_failed() -> None:
    wait = OrphanWait(wait_s=60.0)
    assert wait.waits("r", 100.0) and wait.first_wait("r", 100.0)
    assert wait.waits("r", 150.0) and not wait.first_wait("r", 150.0)  # the sweep tried again
    assert not wait.waits("r", 160.0) and "r" not in wait  # over: failed, and forgotten
    assert wait.waits("r", 170.0)  # a later loss of it waits anew


def test_one_sent_on_or_ended_otherwise_is_forgotten_but_not_before_its_record_would_expire() -> None:
    wait = OrphanWait(wait_s=60.0)
    wait.waits("sent", 0.0)
    wait.over("sent")
    assert "sent" not in wait
    wait.waits("aborted elsewhere", 0.0)
    wait.prune(INFLIGHT_TTL_S - 1)
    assert "aborted elsewhere" in wait  # still failing on time if its sweep comes
    wait.prune(INFLIGHT_TTL_S)
    assert "aborted elsewhere" not in wait
    assert not OrphanWait(wait_s=0.0).waits("r", 5.0)  # 0: failed at once
