"""The argparse value types of dlora's commands (loadgen's, the simulator's, the benches',
make-tiny's): numbers within bounds, sampling values within their ranges, rates, LoRA ranks; each
refuses a bad value with a usage error naming it, not a traceback."""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Callable
from typing import Any

from dlora.common.integers import integer_fields
from dlora.common.sampling import BODY_RANGES, RANGES, SamplingParams


def at_least(convert: Callable[[str], Any], low: float, strict: bool = False) -> Callable[[str], Any]:
    """An argparse type: ``convert(text)``, finite and at least ``low`` (above it when
    ``strict``); a usage error naming the option otherwise, not a traceback from deep inside (or a
    NaN that every comparison lets through, into the results as JSON's invalid ``NaN``)."""

    def parse(text: str) -> Any:
        try:
            value = convert(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"{text!r} is not {'an integer' if convert is int else 'a number'}"
            ) from None
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
        if value < low or (strict and value == low):
            raise argparse.ArgumentTypeError(f"{value} is {'not above' if strict else 'below'} {low:g}")
        return value

    return parse


count = at_least(int, 0)  # also make-tiny's
positive = at_least(int, 1)  # also the simulator's and make-tiny's
above_zero = at_least(float, 0, strict=True)
finite_float = at_least(float, -math.inf)


# The tables' integer fields (``SamplingParams``' types, and the bodies' counts): top_k 2.5 is a 400
# at dlora's gateway and vLLM's
WHOLE = integer_fields(SamplingParams) & RANGES.keys() | BODY_RANGES.keys()


def sampling_value(name: str) -> Callable[[str], float]:
    """An argparse type: a value of the sampling field ``name`` (an integer where it is one, top_k)
    inside its range in ``common.sampling.RANGES``, refused in the words the gateway's 400 and the
    engine say it (out of it, every request of the run would be refused)."""
    finite = at_least(int if name in WHOLE else float, -math.inf)

    def parse(text: str) -> float:
        value = finite(text)
        if (why := RANGES[name].problem(name, value)) is not None:
            raise argparse.ArgumentTypeError(why)
        return value  # type: ignore[no-any-return]

    return parse


def rate(text: str) -> float:
    """An argparse type: a rate above 0, or ``inf`` (every request at once, vLLM's default
    ``--request-rate inf``, which vLLM users pair with ``--max-concurrency``: it was refused as
    "not a finite number"). NaN and -inf stay refused."""
    if text.strip().lower() in ("inf", "infinity", "+inf", "+infinity"):
        return math.inf
    return above_zero(text)


def gamma_cv(text: str) -> float:
    """An argparse type: a gamma arrivals' CV above 0 whose shape, 1 / CV², is above 0 (a CV past
    ~1e154 overflowed its square into a traceback)."""
    cv = above_zero(text)
    if not math.isfinite(cv * cv):
        raise argparse.ArgumentTypeError(f"{cv:g} is too large: the gamma's shape 1/cv² would be 0")
    # (below ~1e-154 its square is 0 or subnormal: a shape of 1/0, or inf and every arrival nan)
    if cv * cv < sys.float_info.min or not math.isfinite(1 / (cv * cv)):
        raise argparse.ArgumentTypeError(f"{cv:g} is too small: the gamma's shape 1/cv² would overflow")
    return cv


def burstiness(text: str) -> float:
    """An argparse type: vLLM's gamma shape, above 0 or ``inf`` (``rate``), and not so small that
    its CV, 1/sqrt(shape), squares past a float (``gamma_cv``): ``--burstiness 1e-320`` was a
    traceback."""
    shape = rate(text)
    if not math.isfinite(1 / shape) and shape != math.inf:
        raise argparse.ArgumentTypeError(f"{shape:g} is too small: the gamma's CV 1/sqrt(it) would overflow")
    return shape


def ranks(text: str) -> list[int]:
    """An argparse type: LoRA ranks, comma-separated, each >= 1 (an empty item is refused, not
    dropped: "8,,16" would cycle other ranks over the adapters than the user wrote)."""
    items = [r.strip() for r in text.split(",")]
    if not any(items):
        raise argparse.ArgumentTypeError("no ranks given")
    if not all(items):
        raise argparse.ArgumentTypeError(f"{text!r} has an empty item")
    return [positive(r) for r in items]


def range_ratio(text: str) -> float:
    """An argparse type: vLLM's ``--random-range-ratio``, in [0, 1)."""
    value = float(at_least(float, 0)(text))
    if value >= 1:
        raise argparse.ArgumentTypeError(f"{value:g} is not below 1 (a length could be drawn as 0)")
    return value
