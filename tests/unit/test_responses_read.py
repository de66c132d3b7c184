"""How a stored record is read back (services/gateway/responses_read.py) where no Redis is needed:
the item ids its DELETE, or a retry written over it, takes out of their holders' sets. The reads
of the routes run against the real stack in tests/integration/test_responses_store.py."""

from __future__ import annotations

import tracemalloc

import msgspec

from dlora.services.gateway.responses_read import held


def test_a_records_held_ids_are_read_without_its_items_built() -> None:
    """``held`` decoded a record's input and response whole (every item built) to read their
    ids: the DELETE of an 8 MiB record of short items, or a retry written over one, held the
    event loop 1.4 s and took 84 MB. Its ids alone are read now: the read allocates a small part
    of the record's size (bytes counted by tracemalloc), an item whose other fields do not decode
    (a string of bad UTF-8, a number past a double's range) gives its id, and a field of no
    such shape still holds none."""
    text = [{"type": "output_text", "text": "x" * 1000}]
    output = [{"type": "message", "role": "assistant", "content": text, "id": f"msg_{k}"} for k in range(500)]
    response = msgspec.json.encode({"status": "completed", "output": [*output, {"id": 5}, {"id": "msg_0"}]})
    items = b'[{"type": "message", "role": "user", "content": "kalo", "id": "msg_in"}]'
    tracemalloc.start()
    try:
        got = held(items, response)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert got == ["msg_in", *(f"msg_{k}" for k in range(500))]
    assert peak < len(response) // 4, peak
    odd = held(b'[{"id": "msg_in", "content": "\xff"}]', b'{"output": [{"id": "msg_0", "n": 1e400}]}')
    assert odd == ["msg_in", "msg_0"]
    for other in (b"{cut", b'{"output": [1]}', b'{"output": {}}', b'{"status": 1}', b'{"background": "yes"}'):
        assert held(items, other) == ["msg_in"], other
        assert held(b"[1]", other) == [], other
    assert held(None, None) == []
