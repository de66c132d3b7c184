"""Which adapters a worker drops from host memory past ``max_cpu_loras`` (``evictions``, pure)."""

from collections import OrderedDict
from types import SimpleNamespace

from dlora.services.worker.adapters import evictions


def _engine(held: list[str], loading: set[str], cap: int) -> SimpleNamespace:
    return SimpleNamespace(adapters=dict.fromkeys(held), loading=loading, config=SimpleNamespace(max_cpu_loras=cap))


def test_the_idle_one_used_least_lately_goes_never_one_busy() -> None:
    used = OrderedDict.fromkeys(["a", "b", "c"])
    assert evictions(_engine(["x", "a", "b", "c"], set(), 2), used, {"a", None}) == ["x", "b"]  # x never noted
    assert list(used) == ["a", "c"]


def test_an_adapter_being_read_keeps_its_place_and_is_never_dropped() -> None:
    """A read beside the steps: its key is asked for (in ``used``) before it is held. Dropped with
    the idle ones, its unregistering failed the read that installed another (the simulator's test);
    forgotten, it went first once held, as if never asked for."""
    used = OrderedDict.fromkeys(["reading", "a", "b"])
    assert evictions(_engine(["a", "b"], {"reading"}, 1), used, {None}) == ["a"]
    assert list(used) == ["reading", "b"]
