"""Which worker takes a request. Pure: worker stats in, a worker id out.

For now: among live workers, prefer those that already hold the adapter (no load), then the
least loaded (running + waiting requests, then fewest free KV blocks used). The migration issue
replaces this with dLoRA's cost-based dispatch.
"""

from __future__ import annotations

from dlora.common.messages import WorkerStats


def choose_worker(workers: list[WorkerStats], adapter: str | None) -> str | None:
    """The worker for a request of ``adapter``; None when no worker is live."""
    if not workers:
        return None

    def cost(w: WorkerStats) -> tuple[int, int, float, str]:
        holds = adapter is None or any(a.name == adapter for a in w.adapters)
        load = w.running + w.waiting
        used = 1.0 - w.free_blocks / max(1, w.total_blocks)
        return (0 if holds else 1, load, used, w.worker)

    # Holding the adapter matters only among equally loaded workers: a loaded worker with the
    # adapter should not take everything while another idles.
    least = min(w.running + w.waiting for w in workers)
    candidates = [w for w in workers if w.running + w.waiting <= least + 1]
    return min(candidates, key=cost).worker
