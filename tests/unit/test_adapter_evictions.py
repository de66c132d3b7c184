"""Which adapters a worker drops from host memory past ``max_cpu_loras`` (``evictions``, pure), and
the order and the thread its reads run on."""

from collections import OrderedDict
from types import SimpleNamespace

import pytest

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


def test_a_read_still_running_does_not_hold_up_the_process_s_exit() -> None:
    """A trial: a worker stopped during a read of seconds exited only when the read's thread ended
    (``asyncio.to_thread``'s pool is joined at exit), 5 s after its hand-over."""
    import subprocess
    import sys

    code = (
        "import asyncio, time\n"
        "from dlora.services.worker.adapters import on_daemon_thread\n"
        "async def main():\n"
        "    on_daemon_thread(time.sleep, 600)  # a read that outlasts the process\n"
        "    assert await on_daemon_thread(sum, [1, 2]) == 3\n"
        "asyncio.run(main())\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)  # (not 600 s)


async def test_a_read_that_raises_stop_iteration_ends_all_the_same() -> None:
    """A review: a future cannot take a StopIteration; the read never ended, holding every read after it."""
    import asyncio

    import pytest

    from dlora.services.worker.adapters import on_daemon_thread

    def stops() -> None:
        raise StopIteration

    with pytest.raises(RuntimeError, match="StopIteration"):
        await asyncio.wait_for(on_daemon_thread(stops), 10)


def test_reads_requests_wait_for_come_before_prefetches_each_in_turn_of_asking() -> None:
    """The order the worker's reads and the simulator's follow (``ReadOrder``, pure)."""
    from dlora.services.worker.adapters import ReadOrder

    order = ReadOrder()
    for key, prefetch in (("p1", True), ("r1", False), ("p2", True), ("p1", True), ("r2", False), ("p2", False)):
        order.ask(key, prefetch)
    order.ask("r1", True)  # a prefetch of one a request asked for: no later
    assert "p1" in order and "x" not in order
    assert [order.next() for _ in range(5)] == ["r1", "r2", "p2", "p1", None]  # p2: a request asked for it too


def test_read_costs_fit_a_line_with_a_fixed_part_once_reads_of_several_sizes_were_seen() -> None:
    """A trial: rank 8 read in 4-11 ms, ranks 16-64 in 7-18 ms, rank 512 in 45 ms; priced in
    proportion from zero (0.017 s at a mean rank of 131), a rank-8 read cost 1 ms. The fitted line
    prices it near what it took; reads of one size only are priced in proportion, as before. (Sizes
    in MB here, as ranks of one adapter layout.)"""
    from dlora.common.reads import read_price
    from dlora.services.worker.adapters import ReadCosts

    costs = ReadCosts()
    for _ in range(3):
        costs.observe(0.010, 16)
    assert costs.per_byte is None  # one size: nothing to fit
    assert read_price(costs.seconds, costs.nbytes, costs.per_byte, 32) == pytest.approx(0.020)
    for seconds, size in [(0.007, 8), (0.012, 64), (0.045, 512), (0.008, 8), (0.011, 32), (0.046, 512)] * 3:
        costs.observe(seconds, size)
    assert costs.per_byte is not None and 0 < costs.per_byte < costs.seconds / costs.nbytes
    price = lambda size: read_price(costs.seconds, costs.nbytes, costs.per_byte, size)  # noqa: E731
    assert 0.004 < price(8) < 0.011 and 0.035 < price(512) < 0.055
    assert price(8) > 3 * costs.seconds * 8 / costs.nbytes  # the proportion's price of it: far too cheap
