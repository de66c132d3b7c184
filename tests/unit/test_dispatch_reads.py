"""Dispatch's price of reading an adapter into a worker's host memory: a worker's own measured
reads, on a line in the bytes of the adapter's files (``dlora.common.reads``), joined where a read
is under way."""

import msgspec
import pytest

from dlora.common.reads import pooled_read, read_price
from dlora.services.dispatcher.choose import DispatchCosts, DispatchMode, choose_worker
from dlora.services.dispatcher.state import DispatchState
from tests.unit.test_dispatch_choice import w


def test_a_worker_s_own_measured_adapter_reads_price_the_load_of_an_adapter_it_lacks() -> None:
    """A load was priced at the setting's 50 ms wherever a worker's reads take seconds (a trial:
    5-9 s for 400 MB adapters), so dispatch spread an adapter's requests over workers that each
    read it (simulated, 32 x 512 with reads 30x NVMe's: 10,270 reads, 45.1 ms/token; priced as
    measured: 3,816 and 29.1). Not measured yet: the setting."""
    holder = w("y", [("a", 300)], ("a",))  # 3 s of queued work at 10 ms a token
    for read_s, expected in ((0.0, "x"), (0.5, "x"), (5.0, "y")):
        lacks = msgspec.structs.replace(w("x"), adapter_read_seconds=read_s)
        assert choose_worker([lacks, holder], "a") == expected
    # one that has read nothing yet (just started, or older) at the others' mean, not at 50 ms (a review)
    measured = msgspec.structs.replace(w("z", [(None, 1000)]), adapter_read_seconds=5.0)
    assert choose_worker([w("x"), holder, measured], "a") == "y"


def test_a_read_is_priced_by_the_adapter_s_bytes_against_the_bytes_a_worker_read() -> None:
    """One mean over every size priced a trial's 157 MB read and a 391 MB one alike (0.8 s; the
    second took 7.9 s). A worker's reads of 16 MB took 1 s: a 64 MB adapter costs 4 s to read
    there, an 8 MB one 0.5 s (simulated, ranks 8-64, reads 30x NVMe's: mean 28.8 -> 26.8 ms/token),
    whatever their ranks (at one rank, an adapter on q and v only reads a fifth of one on all
    seven projections). A worker that has read nothing yet: the mean of the others' reads at its
    size."""
    mb = 1_000_000
    holder = w("y", [("a", 200)], ("a",))  # 2 s of queued work at 10 ms a token
    lacks = msgspec.structs.replace(w("x"), adapter_read_seconds=1.0, adapter_read_bytes=16.0 * mb)
    for nbytes, expected in ((64 * mb, "y"), (8 * mb, "x"), (0, "x")):  # 0: not known, the mean read (1 s)
        assert choose_worker([lacks, holder], "a", file_bytes=nbytes) == expected, nbytes
        state = DispatchState(5.0, DispatchMode.PROACTIVE, DispatchCosts())
        state.file_bytes = {"a": nbytes} if nbytes else {}
        state.heard(lacks, 0.0)
        state.heard(holder, 0.0)
        assert state.choose(state.live(0.0), "a") == expected, nbytes
    assert (lacks.read_seconds(32 * mb), lacks.read_seconds(0), w("z").read_seconds(32 * mb)) == (2.0, 1.0, 0.0)
    fresh = w("z", [(None, 50)])  # read nothing yet: at the others' read of 64 MB (4 s), not their 1 s mean
    assert choose_worker([fresh, holder, lacks], "a", file_bytes=64 * mb) == "y"
    # a worker whose reads of several sizes fitted a line (a part the size does not change) is
    # priced on it; one that read nothing, at the mean of the others' prices, which is a line too
    fitted = msgspec.structs.replace(lacks, adapter_read_seconds=0.02, adapter_read_bytes=100.0 * mb)
    fitted = msgspec.structs.replace(fitted, adapter_read_seconds_per_byte=1e-4 / mb)
    assert fitted.read_seconds(8 * mb) == pytest.approx(0.02 + 1e-4 * (8 - 100))
    for nbytes in (8 * mb, 64 * mb, 512 * mb):
        pooled = read_price(*pooled_read([fitted, lacks, w("z")]), nbytes)
        assert pooled == pytest.approx((fitted.read_seconds(nbytes) + lacks.read_seconds(nbytes)) / 2), nbytes


def test_a_worker_reading_an_adapter_takes_its_next_requests_without_a_second_read() -> None:
    """A trial: a burst of a new adapter's requests split over two workers, and each read it (seconds
    for a 400 MB adapter), the first reader priced as lacking it until its read ended. Requests of
    it queued there (its stats list them while they wait for the read), or sent there since, join
    that read."""
    idle = msgspec.structs.replace(w("y"), adapter_read_seconds=5.0)
    reading = msgspec.structs.replace(w("x", [("a", 64)]), adapter_read_seconds=5.0)
    assert choose_worker([reading, idle], "a") == "x"
    sent = msgspec.structs.replace(w("x"), adapter_read_seconds=5.0)
    assert choose_worker([sent, idle], "a", sent_tokens={"x": 64.0}, sent_adapters={"x": ["a"]}) == "x"
    # not where its read failed lately: refused there meanwhile, every one sent after would be (a review)
    failed = msgspec.structs.replace(sent, failed_adapters=["a"])
    assert choose_worker([failed, idle], "a", sent_tokens={"x": 64.0}, sent_adapters={"x": ["a"]}) == "y"


def test_an_adapter_registered_before_its_bytes_were_kept_is_priced_by_its_rank() -> None:
    """A registry upgraded in place holds entries without ``file_bytes`` (0): priced flat, a 391 MB
    adapter's read would cost what a 157 MB one's does again (a review). Such an entry is priced at
    its rank times the bytes a rank of the entries that say both; flat only where none does."""
    from dlora.common.messages import AdapterEntry
    from dlora.common.reads import read_sizes

    def entry(name: str, rank: int, nbytes: int = 0) -> AdapterEntry:
        return AdapterEntry(name=name, path=f"/{name}", rank=rank, created=0.0, file_bytes=nbytes)

    sizes = read_sizes([entry("new8", 8, 10_000_000), entry("new32", 32, 30_000_000), entry("old64", 64)])
    assert sizes == {"new8": 10_000_000, "new32": 30_000_000, "old64": 64 * 1_000_000}
    assert read_sizes([entry("old8", 8), entry("old64", 64)]) == {"old8": 0, "old64": 0}
