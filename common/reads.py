"""What reading an adapter into a worker's host memory costs, as dispatch and the migration
planner price it: a worker's measured reads (``WorkerStats.adapter_read_*``), the line through
them in the bytes of the files read, and each registered adapter's bytes. Pure."""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from dlora.common.messages import AdapterEntry, WorkerStats


def read_price(seconds: float, read_bytes: float, per_byte: float | None, nbytes: float) -> float:
    """A read of an adapter whose files hold ``nbytes`` (0: not known) where reads took ``seconds``
    at a mean of ``read_bytes`` (0: not known): on the line through them rising ``per_byte`` seconds
    a byte, or (None) in proportion to the bytes (one mean over every size priced a trial's 157 MB
    read and a 391 MB one alike at 0.8 s; the second took 7.9 s); else ``seconds``. Never below 0
    (the line is fitted with ``per_byte`` at most ``seconds / read_bytes``)."""
    if not nbytes or not read_bytes:
        return seconds
    if per_byte is None:
        return seconds * nbytes / read_bytes
    return max(0.0, seconds + per_byte * (nbytes - read_bytes))


def read_sizes(entries: Iterable[AdapterEntry]) -> dict[str, int]:
    """Each registered adapter's bytes as reads are priced by them (``read_price``): its
    ``file_bytes``, or for one registered before they were kept (0) its rank times the bytes a rank
    of the entries that say both (a registry upgraded in place is priced as by rank until its
    adapters are registered again); 0 (the flat mean read) where none says its bytes."""
    entries = list(entries)
    sized = [e for e in entries if e.file_bytes and e.rank]
    per_rank = sum(e.file_bytes for e in sized) / sum(e.rank for e in sized) if sized else 0.0
    return {e.name: e.file_bytes or round(e.rank * per_rank) for e in entries}


def pooled_read(stats: Iterable[WorkerStats]) -> tuple[float, float, float | None]:
    """(seconds, bytes, seconds a byte more) of a read for a worker that measured none, as
    ``read_price`` takes them: the mean of the workers' own prices, which is a line too (each
    worker's line, or its proportion, averaged; one that does not say its sizes, an older one,
    as flat); (0, 0, None) when none measured."""
    if not (read := [s for s in stats if s.adapter_read_seconds]):
        return 0.0, 0.0, None
    sized = [s for s in read if s.adapter_read_bytes]
    if not sized:
        return sum(s.adapter_read_seconds for s in read) / len(read), 0.0, None
    slopes = [
        s.adapter_read_seconds / s.adapter_read_bytes
        if s.adapter_read_seconds_per_byte is None
        else s.adapter_read_seconds_per_byte
        for s in sized
    ]
    nbytes = sum(s.adapter_read_bytes for s in sized) / len(sized)
    per_byte = sum(slopes) / len(read)  # (a flat one's slope: 0)
    seconds = sum(s.read_seconds(nbytes) for s in read) / len(read)  # (a flat one's: its seconds)
    return seconds, nbytes, per_byte
