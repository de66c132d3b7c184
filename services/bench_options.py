"""The types of ``dlora bench``'s options: numbers and lists a benchmark cannot run with, and
unknown policy names, refused as usage errors naming the option before any run (each failed deep
inside with a traceback, or after the runs before it, or ran and wrote nonsense: users' and
helpers' trials)."""

from __future__ import annotations

import argparse
from collections.abc import Callable

# Bench options that may be 0 (or any finite number): the rest of the numbers, and every item of
# the comma-separated lists below, must be above 0.
_MAY_BE_ZERO = {"seed", "think_s", "adapters@features"}
_LISTS = {
    "batch_sizes": int, "adapters@engine": int, "tokens": int, "groups": int, "strides": int,
    "rates": float, "overheads": float, "alphas": float, "loads": float, "cluster_slots": int,
    "migration_slots": int, "migration_alphas": float, "migration_loads": float,
}  # fmt: skip


def policies(text: str) -> str:
    """``--policies``: comma-separated policy names, at least one, each known (a typo was found
    when its turn came, after the runs before it, and lost them: a helper's trial)."""
    from dlora.services.worker.policy.config import PolicyName

    names, known = [v.strip() for v in text.split(",") if v.strip()], [p.value for p in PolicyName]
    if not names:
        raise argparse.ArgumentTypeError("no policy given")
    if unknown := [n for n in names if n not in known]:
        raise argparse.ArgumentTypeError(f"unknown policy {unknown[0]!r} (one of {', '.join(known)})")
    return text


def check_bench_numbers(parser: argparse.ArgumentParser) -> None:
    """Give ``parser``'s numbers and comma-separated number lists a type that refuses, as a
    usage error naming the option, what a benchmark cannot run with: 0 or fewer steps, rounds,
    requests or workers, a NaN rate, a list item that is not a number (each failed deep inside
    with a traceback, or ran and wrote nonsense: a user's trial). Lists stay text."""
    from dlora.loadgen.arg_types import above_zero, at_least, positive

    name = parser.prog.split()[-1]
    for action in parser._actions:  # argparse's own list of the options it parses
        dest = action.dest
        if dest in _MAY_BE_ZERO or f"{dest}@{name}" in _MAY_BE_ZERO:
            if action.type in (int, float):
                action.type = at_least(action.type, 0)
            continue
        if action.type is int:
            action.type = positive
        elif action.type is float:
            action.type = above_zero
        elif (kind := _LISTS.get(f"{dest}@{name}", _LISTS.get(dest))) is not None:
            action.type = _number_list(at_least(kind, 0, strict=True))


def sizes(text: str) -> str:
    """``bench migration --sizes``: WORKERSxADAPTERSxREQUESTS, comma-separated, each at least 1."""
    for size in text.split(","):
        parts = size.strip().split("x")
        if len(parts) != 3 or not all(p.isdigit() and int(p) > 0 for p in parts):
            raise argparse.ArgumentTypeError(f"{size!r} is not WORKERSxADAPTERSxREQUESTS (three counts above 0)")
    return text


def _number_list(item: Callable[[str], object]) -> Callable[[str], str]:
    def parse(text: str) -> str:
        for part in text.split(","):
            item(part.strip())  # raises argparse.ArgumentTypeError, naming the value
        return text

    return parse
