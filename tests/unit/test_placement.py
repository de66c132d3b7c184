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


def test_slots_count_rank() -> None:
    shares = {"big": 0.5, "small": 0.5}
    ranks = {"big": 64, "small": 16}
    workers = [WorkerCapacity("w0", 1000, slots=4), WorkerCapacity("w1", 1000, slots=2)]
    p = place(shares, workers, ranks)
    assert "big" not in p["w1"]  # four slots do not fit in two
    for w in workers:
        assert sum(4 if a == "big" else 1 for a in p[w.worker]) <= w.slots


def test_current_placement_is_kept_and_extended() -> None:
    shares = {"a": 0.5, "b": 0.5}
    p = place(shares, WORKERS[:2], dict.fromkeys(shares, 16), current={"w0": ["b"]})
    assert "b" in p["w0"] and any("a" in ads for ads in p.values())
