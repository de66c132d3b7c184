"""String formats a JSON Schema names (date-time, date, time, email) served as the patterns every
reader of the document reads back: llguidance's own formats took strings that pydantic, Python's
datetime and email-validator refuse. ``served_schema`` applies them."""

from __future__ import annotations

import string
from typing import Any

# RFC 3339's dates and times as the readers of a document read them back: llguidance allows second
# 60, lowercase "t" and "z", year 0000 and 29 February of any year (RFC 3339's grammar, the JSON
# Schema test suite's), and pydantic (its datetime, date, time fields) and Python's
# datetime.fromisoformat refuse one or another ("second must be in 0..59"): a 200 whose document
# its client could not load. Served as the part every one of them reads: "T" and "Z" in capitals,
# as vLLM's default backend (xgrammar) writes them, seconds 00-59, years 0001-9999, 29 February in
# leap years. Anchored: llguidance matches a pattern anywhere in the string, as JSON Schema does.
_YEAR = r"(?:[1-9][0-9]{3}|0[1-9][0-9]{2}|00[1-9][0-9]|000[1-9])"
_LEAP_YEAR = r"(?:[0-9]{2}(?:0[48]|[2468][048]|[13579][26])|(?:0[48]|[2468][048]|[13579][26])00)"
_MONTH_DAY = (
    r"(?:(?:0[13578]|1[02])-(?:0[1-9]|[12][0-9]|3[01])"  # months of 31 days
    r"|(?:0[469]|11)-(?:0[1-9]|[12][0-9]|30)|02-(?:0[1-9]|1[0-9]|2[0-8]))"  # of 30, February's first 28
)
_DATE = rf"(?:{_YEAR}-{_MONTH_DAY}|{_LEAP_YEAR}-02-29)"
_TIME = r"(?:[01][0-9]|2[0-3]):[0-5][0-9]:[0-5][0-9](?:\.[0-9]+)?(?:Z|[+-](?:[01][0-9]|2[0-3]):[0-5][0-9])"


def _none_of(words: tuple[str, ...], low: int, high: int, depth: int = 0, prefix: str = "") -> str:
    """A regex of the ASCII words of ``low`` to ``high`` letters, either case, but ``words``
    (lowercase): their trie's complement (llguidance's regexes have no lookahead)."""
    below = sorted({w[depth] for w in words if w.startswith(prefix) and len(w) > depth})
    alts = [] if depth < low or prefix in words else [""]
    other = "".join(c + c.upper() for c in string.ascii_lowercase if c not in below)
    if depth < high:
        alts.append(f"[{other}][A-Za-z]{{{max(0, low - depth - 1)},{high - depth - 1}}}")
        alts += [f"[{c}{c.upper()}]" + _none_of(words, low, high, depth + 1, prefix + c) for c in below]
    return "(?:" + "|".join(alts) + ")"


# An email address as email-validator reads it back (pydantic's EmailStr): llguidance's "email"
# (as xgrammar's) took "a@b", "a@localhost", "a@b.test", "a@[1.2.3.4]", "a@b.123", "a@ab--c.com"
# and 64-letter labels, each refused ("It should have a period", "a special-use or reserved name",
# ...): a 200 whose document its client's model could not load. Served as a dot-atom at a domain of
# one or more DNS labels (letters, digits, inner hyphens, at most 63, no "--" as their third and
# fourth characters: IDNA's) and a top-level domain of 2-63 letters that is no special-use name.
_ATEXT = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]"
_A, _H = "[A-Za-z0-9]", "[A-Za-z0-9-]"
# An internationalized domain's labels are IDNA's A-labels, "xn--" and Punycode (bücher.example is
# xn--bcher-kva.example, .рф xn--p1ai), which email-validator reads: refused, a model could not
# copy such an address from its prompt, and wrote another. (Punycode itself is no regex's to check.)
_ASCII_LABEL = rf"{_A}(?:{_A}|{_H}{_A}|{_H}{_H}{_A}|{_H}(?:{_A}{_H}|{_H}{_A}){_H}{{0,58}}{_A})?"
_LABEL = rf"(?:{_ASCII_LABEL}|[Xx][Nn]--{_A}(?:{_H}{{0,57}}{_A})?)"
_SPECIAL_USE = ("arpa", "invalid", "local", "localhost", "onion", "test")  # email-validator's
# A top-level domain ends in a letter, as email-validator reads it (an A-label's too).
_TLD = rf"(?:{_none_of(_SPECIAL_USE, 2, 63)}|[Xx][Nn]--(?:{_A}{_H}{{0,57}})?[A-Za-z])"
_EMAIL = rf"^{_ATEXT}+(?:\.{_ATEXT}+)*@(?:{_LABEL}\.)+{_TLD}$"
_EMAIL_LENGTH = 254  # RFC 5321's path, less its brackets: email-validator's bound
READ_BACK_FORMATS = {"date-time": f"^{_DATE}T{_TIME}$", "date": f"^{_DATE}$", "time": f"^{_TIME}$", "email": _EMAIL}


def read_back(node: dict[str, Any], name: str) -> bool:
    """``node``'s format ``name`` as its pattern (``READ_BACK_FORMATS``), beside a pattern of its
    own through allOf (llguidance matches both); whether it was one."""
    if (pattern := READ_BACK_FORMATS.get(name)) is None or not isinstance(node.get("allOf", []), list):
        return False
    if "pattern" not in node:
        node["pattern"] = pattern
    else:
        node["allOf"] = [*node.get("allOf", []), {"pattern": pattern}]
    if name == "email" and not (type(node.get("maxLength")) is int and node["maxLength"] <= _EMAIL_LENGTH):
        node["maxLength"] = _EMAIL_LENGTH
    return True
