"""``common/recent.py``: what is heard lately, by key, forgotten by age and past a bound."""

from __future__ import annotations

from dlora.common.recent import Recent


def test_a_key_is_kept_span_s_from_its_last_put_and_the_least_lately_put_goes_first_past_most() -> None:
    """A worker's memory of the requests it handed back was a dict made again at each hand-back,
    with no bound (the kind that stalled every worker at 30,000 aborts); it is now this map."""
    heard: Recent[str, bool] = Recent(span_s=60.0, most=3)
    heard.put("a", True, 0.0)
    heard.put("b", False, 10.0)
    assert heard.get("a", 59.9) is True and heard.get("b", 59.9) is False and heard.get("c", 0.0) is None
    assert heard.get("a", 60.0) is None  # its span is over, though nothing was put since
    heard.put("a", False, 20.0)  # put again: kept from now, and the newest
    heard.put("c", True, 21.0)
    heard.put("d", True, 22.0)  # past most: b, the least lately put, goes
    assert [heard.get(k, 22.0) for k in "abcd"] == [False, None, True, True]
    heard.put("e", True, 80.5)  # a (put at 20.0) goes, past its span; c (21.0) stays
    assert [k for k in "abcde" if heard.get(k, 80.5) is not None] == ["c", "d", "e"]
