from dlora.services.dispatcher.placement import WorkerCapacity, min_tolerance, place, round_robin

WORKERS = [WorkerCapacity(f"w{i}", free_kv_blocks=1000, slots=4) for i in range(4)]


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
