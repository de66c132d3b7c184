import pytest

from dlora.services.worker.engine.policy import FcfsMerged, FcfsUnmerged, QueuedRequest, make_policy


def q(rid: str, adapter: str | None, arrival: int) -> QueuedRequest:
    return QueuedRequest(rid, adapter, arrival, running=False, num_new=4)


QUEUE = [q("r2", "b", 2), q("r0", "a", 0), q("r1", None, 1), q("r3", "a", 3), q("r4", "c", 4)]


def test_unmerged_is_fcfs_within_the_adapter_slots() -> None:
    d = FcfsUnmerged(max_adapters=2).decide(QUEUE, merged_now=None)
    assert d.merged is None
    assert d.request_ids == ["r0", "r1", "r2", "r3"]  # c would be a third adapter


def test_merged_runs_the_head_of_line_adapter() -> None:
    d = FcfsMerged().decide(QUEUE, merged_now=None)
    assert d.merged == "a" and d.request_ids == ["r0", "r3"]


def test_merged_with_base_request_first_runs_base_unmerged() -> None:
    d = FcfsMerged().decide([q("x", None, 0), q("y", "a", 1)], merged_now="a")
    assert d.merged is None and d.request_ids == ["x"]


def test_merged_keeps_the_current_adapter_when_idle() -> None:
    assert FcfsMerged().decide([], merged_now="a").merged == "a"


def test_unknown_mode_is_refused() -> None:
    with pytest.raises(ValueError):
        make_policy("sometimes", 4)
