"""String formats served as what their readers read back (``read_back_formats.READ_BACK_FORMATS``)."""

from __future__ import annotations

import contextlib
import json
import random
import re

import numpy as np
import pytest

from dlora.common.messages import SamplingParams
from dlora.services.worker.engine.structured import Grammars
from tests.unit.test_token_bytes import byte_level

EMAILS = [  # (the address, whether email-validator, pydantic's EmailStr, takes it)
    ("kalo@remi.com", True),
    ("a+b.c@x-y.z.io", True),
    ("{a}'b@abc--d.com", True),  # "--" past a label's fourth character
    ("a@b.tests", True),
    ("a@b", False),  # "It should have a period"
    ("a@localhost", False),
    ("a@b.test", False),  # special-use names
    ("a@B.Local", False),
    ("a@b.localhost", False),
    ("a@b.123", False),  # "not within a valid top-level domain"
    ("a@[1.2.3.4]", False),  # a domain literal
    ('"a b"@c.com', False),  # a quoted local part
    ("a@ab--c.com", False),  # "two letters followed by two dashes"
    ("a@" + "b" * 64 + ".com", False),  # a label past 63
    ("kalo@xn--bcher-kva.example", True),  # IDNA's A-labels (bücher.example, .рф): its one "--"
    ("kalo@sub.xn--bcher-kva.xn--p1ai", True),
    ("a@xn---bcher.example", False),  # no A-label: a hyphen after its "--"
    ("a@b.xn--p1", False),  # a top-level domain ends in a letter
]
# What email-validator checks of an ASCII address (its table's cases): dot-atom, a period after
# the "@", labels of at most 63 characters, a top-level domain ending in a letter, no special use.
_SPECIAL = {"arpa", "invalid", "local", "localhost", "onion", "test"}
_DOT_ATOM = re.compile(r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+(\.[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+)*")
_DNS_LABEL = re.compile(r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?")
_A_LABEL = re.compile(r"(?i)xn--[a-z0-9]")  # (its Punycode is email-validator's to read: not here)


def _read_back(address: str) -> bool:
    local, _, domain = address.rpartition("@")
    labels = domain.split(".")
    return (
        len(address) <= 254
        and _DOT_ATOM.fullmatch(local) is not None
        and len(labels) > 1
        and all(_DNS_LABEL.fullmatch(label) and (label[2:4] != "--" or _A_LABEL.match(label)) for label in labels)
        and labels[-1][-1].isalpha()
        and (labels[-1].isalpha() or _A_LABEL.match(labels[-1]) is not None)
        and labels[-1].lower() not in _SPECIAL
    )


@pytest.mark.parametrize("address,ok", EMAILS)
def test_an_email_is_one_pydantic_reads_back(address: str, ok: bool) -> None:
    """llguidance's "email" (as xgrammar's) took "a@b", "a@localhost", "a@b.test", domain literals,
    "ab--c" labels and labels past 63 characters: pydantic's EmailStr (email-validator) refused the
    document ("It should have a period", ...). Served as the part it reads back."""
    assert _read_back(address) is ok  # (the table's own check; with email-validator where installed)
    with contextlib.suppress(ImportError):
        from email_validator import EmailNotValidError, validate_email

        try:
            validate_email(address, check_deliverability=False)
            assert ok, address
        except EmailNotValidError:
            assert not ok, address
    hf = byte_level()
    grammars = Grammars(hf, len(hf), {hf.eos_token_id})
    for schema in ({"type": "string", "format": "email"}, {"type": "string", "format": "email", "pattern": "^[^0-9]"}):
        matcher = grammars.matcher(SamplingParams(json_schema=json.dumps(schema)), [])
        assert matcher is not None
        taken = matcher.consume_tokens(hf.encode(json.dumps(address), add_special_tokens=False))
        assert (taken and matcher.is_accepting()) is ok, (schema, address)


def test_random_emails_are_ones_pydantic_reads_back() -> None:
    """Uniform draws over the tokens the grammar allows (a random model's): 229 of 300 addresses
    were refused by email-validator before, "a@b"-like and overlong labels most."""
    hf = byte_level()
    grammars = Grammars(hf, len(hf), {hf.eos_token_id})
    params = SamplingParams(json_schema=json.dumps({"type": "string", "format": "email"}))
    rng = random.Random(0)
    for _ in range(60):
        matcher = grammars.matcher(params, [])
        assert matcher is not None
        out: list[int] = []
        while not matcher.is_stopped():
            bits = np.unpackbits(np.frombuffer(matcher.compute_bitmask(), dtype=np.uint8), bitorder="little")
            token = int(rng.choice(np.nonzero(bits[: len(hf)])[0]))
            if token == hf.eos_token_id:
                break
            assert matcher.consume_token(token)
            out.append(token)
        address = json.loads(hf.decode(out))
        assert _read_back(address), address
