import math

from dlora.services.dispatcher.placement import WorkerCapacity, min_tolerance, place, round_robin

WORKERS = [WorkerCapacity(f"w{i}", kv_room=1000, slots=4) for i in range(4)]


def test_skewed_shares_get_more_replicas_and_beat_round_robin() -> None:
    shares = {"hot": 0.7, "b": 0.1, "c": 0.1, "d": 0.05, "e": 0.05}
    ranks = dict.fromkeys(shares, 16)
    p = place(shares, WORKERS, ranks)
    replicas = {a: sum(a in ads for ads in p.values()) for a in shares}
    assert replicas["hot"] >= 3 and all(n >= 1 for n in replicas.values())
    rr = round_robin(list(shares), WORKERS, ranks)
    assert min_tolerance(p, shares, WORKERS, ranks) >= 1.5 * min_tolerance(rr, shares, WORKERS, ranks)


def test_a_slot_holds_one_adapter_of_any_rank() -> None:
    """As the engine holds them (max_loras adapters, each at its own rank): a rank-64 adapter
    takes one slot, not four rank-16 units."""
    shares = {"big": 0.4, "small": 0.3, "tiny": 0.3}
    ranks = {"big": 64, "small": 16, "tiny": 8}
    workers = [WorkerCapacity("w0", 1000, slots=2), WorkerCapacity("w1", 1000, slots=1)]
    p = place(shares, workers, ranks)
    assert all(len(p[w.worker]) <= w.slots for w in workers)
    assert sum(len(ads) for ads in p.values()) == 3  # all three fit in three slots
    assert len(round_robin(list(shares), workers, ranks)["w0"]) == 2


def test_current_placement_is_kept_and_extended() -> None:
    shares = {"a": 0.5, "b": 0.5}
    p = place(shares, WORKERS[:2], dict.fromkeys(shares, 16), current={"w0": ["b"]})
    assert "b" in p["w0"] and any("a" in ads for ads in p.values())


def test_a_placement_interval_decays_the_traffic_and_places_by_the_registered_adapters_shares() -> None:
    """The dispatcher's interval (``decay``, ``placement_of``), pure so the simulator runs it too:
    counts decay by ``DECAY`` (ones worn down to nothing go), an adapter no longer registered gets
    no share, each worker keeps what its stats list; no live worker or no traffic: no placement."""
    from dlora.common.messages import AdapterResidency, WorkerStats
    from dlora.services.dispatcher.placement import DECAY, decay, placement_of

    def stats(name: str, *held: str) -> WorkerStats:
        adapters = [AdapterResidency(name=a, version="v", slot=None, merged=False) for a in held]
        return WorkerStats(
            worker=name, running=0, waiting=0, free_blocks=100, total_blocks=100, block_size=16, max_loras=2,
            adapters=adapters,
        )  # fmt: skip

    traffic = decay({"hot": 10.0, "gone": 5.0, "faint": 1e-3})
    assert traffic == {"hot": 10.0 * DECAY, "gone": 5.0 * DECAY}
    assert placement_of(traffic, [stats("w0", "x"), stats("w1")], {"hot": 16}) == {"w0": ["x", "hot"], "w1": ["hot"]}
    assert placement_of({"hot": 1.0}, [], {"hot": 16}) is None
    assert placement_of({}, [stats("w0")], {"hot": 16}) is None


def _reference_place(
    shares: dict[str, float],
    workers: list[WorkerCapacity],
    ranks: dict[str, int],
    current: dict[str, list[str]],
    penalty: float,
) -> dict[str, list[str]]:
    """``place`` as first written: every tolerance worked out again from scratch at each replica
    (at 256 workers x 1,000 adapters one placement took 34 s). The indexed one must choose alike.
    Its sums are exactly rounded (``math.fsum``; first: summed in the workers' order, whose
    rounding broke ties between workers alike at random)."""
    capacity = {w.worker: w for w in workers}
    placed = {w.worker: list(current.get(w.worker, [])) for w in workers}

    def holders(a: str) -> list[str]:
        return [w for w, adapters in placed.items() if a in adapters]

    def part(w: str, a: str) -> float:
        mixed = any(ranks.get(o, 16) != ranks.get(a, 16) for o in placed[w] if o != a)
        return capacity[w].free_kv_blocks / max(1, len(placed[w])) * (1 - penalty if mixed else 1.0)

    def over(w: str) -> int:
        return max(0, -capacity[w].kv_room)

    def tolerance(a: str) -> float:
        return math.fsum(part(w, a) for w in holders(a)) / max(shares[a], 1e-9)

    for a in sorted(shares, key=lambda a: -shares[a]):
        if not holders(a):
            fits = [w for w in placed if capacity[w].slots - len(placed[w]) > 0]
            if fits:
                roomiest = max(fits, key=lambda w: (capacity[w].free_kv_blocks / (1 + len(placed[w])), -over(w), w))
                placed[roomiest].append(a)
    while True:
        for a in sorted(shares, key=tolerance):
            options = [w for w in placed if a not in placed[w] and capacity[w].slots - len(placed[w]) > 0]
            if options:

                def gain(w: str, a: str = a) -> float:
                    placed[w].append(a)
                    value = tolerance(a)
                    placed[w].remove(a)
                    return value

                placed[max(options, key=lambda w: (gain(w), -over(w), w))].append(a)
                break
        else:
            return placed


def test_the_indexed_placement_chooses_as_the_first_one_did() -> None:
    """Random fleets: ties of tolerance (equal shares, no free memory, some past it), mixed ranks, adapters held
    twice or unknown, workers full from the start: the same placement to the last replica."""
    import random

    rng = random.Random(0)
    for _ in range(300):
        adapters = [f"a{i}" for i in range(rng.randint(1, 20))]
        shares = {a: rng.choice([rng.random(), 0.5, 0.25]) for a in rng.sample(adapters, rng.randint(1, len(adapters)))}
        ranks = {a: rng.choice([8, 16, 32]) for a in adapters if rng.random() < 0.9}
        slots = rng.randint(1, 5)  # each worker's, or (a review) some of none and some of others
        workers = [
            WorkerCapacity(f"w{i}", free or -rng.choice([0, 10, 20]), rng.choice([slots, slots, 0, 3]))
            for i in range(rng.randint(1, 8))
            for free in [rng.choice([0, 100, rng.randint(0, 1000)])]
        ]
        current = {
            w.worker: [rng.choice([*adapters, "unknown"]) for _ in range(rng.randint(0, slots + 2))]
            for w in workers
            if rng.random() < 0.7
        }
        penalty = rng.choice([0.0, 0.1, 0.5])
        expected = _reference_place(shares, workers, ranks, {w: list(a) for w, a in current.items()}, penalty)
        assert place(shares, workers, ranks, current, penalty) == expected


def test_the_placement_counts_kv_on_its_way_to_a_worker_as_taken() -> None:
    """w0 has 100 blocks free and 80 of them are coming (a plan's moved requests, their caches on the
    way); w1 has 60 free. The hot adapter went to w0, the roomier by ``free_blocks`` alone, which its
    arrivals were about to fill: it goes to w1."""
    from dlora.common.messages import WorkerStats
    from dlora.services.dispatcher.placement import placement_of

    def stats(name: str, free: int, coming: int = 0) -> WorkerStats:
        return WorkerStats(
            worker=name, running=0, waiting=0, free_blocks=free, total_blocks=100, block_size=16, max_loras=1,
            arriving_kv_blocks=coming,
        )  # fmt: skip

    ranks = {"hot": 16, "cold": 16}
    assert placement_of({"hot": 1.0, "cold": 0.2}, [stats("w0", 100), stats("w1", 60)], ranks)["w0"] == ["hot"]
    assert placement_of({"hot": 1.0, "cold": 0.2}, [stats("w0", 100, 80), stats("w1", 60)], ranks)["w1"] == ["hot"]


def test_with_every_queue_past_its_room_the_least_past_it_takes_the_hot_adapter() -> None:
    """Every worker's queue needs more blocks than it has free: each one's room clamps to 0, and by
    name alone the hot adapter went to w2, past its room by 500 blocks, where w1 is past it by 10
    (left by the last session). Ranked by how far past its room each is, w1 takes it, then w0."""
    from dlora.common.messages import WorkerStats
    from dlora.services.dispatcher.placement import placement_of

    def stats(name: str, free: int, coming: int) -> WorkerStats:
        return WorkerStats(
            worker=name, running=0, waiting=0, free_blocks=free, total_blocks=100, block_size=16, max_loras=1,
            arriving_kv_blocks=coming,
        )  # fmt: skip

    live = [stats("w0", 10, 50), stats("w1", 10, 20), stats("w2", 0, 500)]
    assert placement_of({"hot": 1.0, "cold": 0.2}, live, {"hot": 16, "cold": 16}) == {
        "w0": ["cold"],
        "w1": ["hot"],
        "w2": ["hot"],
    }
