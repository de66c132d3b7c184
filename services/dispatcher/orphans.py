"""Re-dispatches that found no live worker, waiting for one. Pure: the caller passes the clock.

A user's trial: with one worker on a host, every request in flight on it was failed ("no worker
is available") when it crashed, though systemd or ``dlora up`` had it back a few seconds later. Such
a request now waits ``wait_s`` from the first time it found no worker, its in-flight record left
on the lost worker: the dispatcher's orphan sweep sends it on once a worker is live, and that
worker started again under its id hands it back.
"""

from __future__ import annotations

from dlora.common.state import INFLIGHT_TTL_S


class OrphanWait:
    def __init__(self, wait_s: float) -> None:
        self.wait_s = wait_s
        self._since: dict[str, float] = {}  # request id -> when it first found no worker

    def __contains__(self, request_id: str) -> bool:
        return request_id in self._since

    def waits(self, request_id: str, now: float) -> bool:
        """Whether the request, finding no live worker at ``now``, waits on (else it is failed, and
        forgotten here)."""
        first = self._since.setdefault(request_id, now)
        if now - first < self.wait_s:
            return True
        del self._since[request_id]
        return False

    def first_wait(self, request_id: str, now: float) -> bool:
        """Whether ``waits`` began the request's wait just now (the caller says so once)."""
        return self._since.get(request_id) == now

    def over(self, request_id: str) -> None:
        """The request was sent on, or dropped."""
        self._since.pop(request_id, None)

    def prune(self, now: float) -> None:
        """Forget requests that ended otherwise (an abort this dispatcher did not hear) once their
        records would have expired (their worker is not there to refresh them): not sooner, or a
        request still waiting would begin its wait again."""
        self._since = {rid: at for rid, at in self._since.items() if now - at < INFLIGHT_TTL_S}
