"""How the load generator reads a server's answers: Retry-After as the openai package reads it."""

from __future__ import annotations

import email.utils
import time

import pytest

from dlora.loadgen.clients import retry_after_s


@pytest.mark.parametrize(
    "headers,wait",
    [
        ({"Retry-After": "3.5"}, 3.5),  # a fraction was read as no wait (0.5 s of backoff)
        ({"Retry-After": "2"}, 2.0),
        ({"retry-after-ms": "250", "Retry-After": "9"}, 0.25),  # the milliseconds win, as openai's
        ({"Retry-After": "0"}, None),  # outside (0, 60]: the client's own backoff (it retried at once)
        ({"Retry-After": "600"}, None),
        ({"Retry-After": "soon"}, None),
        ({}, None),
    ],
)
def test_retry_after_is_read_as_the_openai_package_reads_it(headers: dict[str, str], wait: float | None) -> None:
    assert retry_after_s(headers) == wait


def test_retry_after_as_an_http_date() -> None:
    date = email.utils.formatdate(time.time() + 5, usegmt=True)
    assert 3.0 < (retry_after_s({"Retry-After": date}) or 0) <= 5.0
