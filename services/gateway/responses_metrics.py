"""Counts of the Responses API's stored responses (``responses_store``): its Redis reads and writes
by what they found, and the bytes written, so that an operator sees a store that fails or misses
(a TTL too short for its clients' chains) and sizes Redis by what it holds. Labels are a fixed
set of pairs, never a response's or tenant's id: the series are as many whatever the traffic."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter

# (op, outcome) pairs, every one declared from the start, so that a rate() not seen yet reads 0:
# read: a response named by previous_response_id, GET, input_items, cancel; reference: an item_reference's
# item (refused: its request named items of more than MAX_REFERENCED responses, none read); delete:
# DELETE; write: a finished response kept, one over responses_max_bytes not written, or Redis
# failing (on a read, failing is the 503 its request gets).
OUTCOMES = {
    "read": ("hit", "miss", "failed"),
    "reference": ("hit", "miss", "failed", "refused"),
    "delete": ("hit", "miss", "failed"),
    "write": ("stored", "too_large", "failed"),
}


class StoreCounts:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.ops = Counter(
            "dlora_responses_store",
            "Stored-response operations in Redis (Responses API), by what they found",
            ["op", "outcome"],
            registry=registry,
        )
        for op, outcomes in OUTCOMES.items():
            for outcome in outcomes:
                self.ops.labels(op, outcome)
        self.written = Counter(
            "dlora_responses_stored_bytes",
            "Bytes of stored responses written to Redis (the object and its conversation)",
            unit="bytes",
            registry=registry,
        )

    def count(self, op: str, outcome: str, n: int = 1) -> None:
        assert outcome in OUTCOMES[op], (op, outcome)
        if n:
            self.ops.labels(op, outcome).inc(n)
