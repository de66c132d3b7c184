from dlora.common.messages import AdapterResidency, WorkerStats
from dlora.services.dispatcher.choose import choose_worker


def w(name: str, running: int, waiting: int = 0, adapters: tuple[str, ...] = (), free: int = 100) -> WorkerStats:
    return WorkerStats(worker=name, running=running, waiting=waiting, free_blocks=free, total_blocks=100,
                       block_size=16, max_loras=4, adapters=[AdapterResidency(name=a, slot=0, merged=False) for a in adapters])


def test_no_workers_no_choice() -> None:
    assert choose_worker([], "a") is None


def test_least_loaded_wins() -> None:
    assert choose_worker([w("x", 5), w("y", 1), w("z", 3)], None) == "y"


def test_holding_the_adapter_wins_among_equally_loaded() -> None:
    assert choose_worker([w("x", 2), w("y", 3, adapters=("a",))], "a") == "y"
    # ...but not against a much less loaded worker
    assert choose_worker([w("x", 0), w("y", 6, adapters=("a",))], "a") == "x"


def test_ties_break_on_kv_use_then_name() -> None:
    assert choose_worker([w("x", 1, free=10), w("y", 1, free=90)], None) == "y"
    assert choose_worker([w("b", 1), w("a", 1)], None) == "a"
