"""Where a decode step's time goes on the host: the engine's phases timed from outside, for
``dlora bench engine --profile`` (on a GPU, what async scheduling would hide)."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from dlora.services.worker.engine import LLMEngine

# A step's phases, by the engine method each is spent in. ``_forward`` runs inside ``_run``: the
# rest of ``_run`` is the KV bookkeeping and the sampling, whose transfer of the tokens to the
# host is where a GPU step's host waits for its kernels.
PHASES = {
    "_prepare": "prepare",
    "_forward": "forward",
    "_run": "sample",
    "_postprocess": "postprocess",
    "_observe": "observe",
}


@contextlib.contextmanager
def timed_phases(engine: LLMEngine) -> Iterator[dict[str, float]]:
    """Seconds the steps run inside spend in each phase, summed: prepare (switch, schedule, slots),
    forward (the model; on a GPU only the host's part, launches or a graph's replay), sample (the
    rest of the run: on a GPU, waiting for the kernels), postprocess (text, stops), observe (stats,
    the policy's feedback). What a step spends outside them (its decision, given here) is not
    counted. The host's share of a GPU step is all but ``sample``."""
    spent = dict.fromkeys(PHASES.values(), 0.0)
    forward_in_run = [0.0]  # what ``sample`` is short of: the forward timed inside a run
    running = [0]

    def timed(method: Callable[..., object], label: str) -> Callable[..., object]:
        def run(*args: object, **kwargs: object) -> object:
            start = time.perf_counter()
            running[0] += label == "sample"
            try:
                return method(*args, **kwargs)
            finally:
                running[0] -= label == "sample"
                spent[label] += time.perf_counter() - start
                if label == "forward" and running[0]:
                    forward_in_run[0] += time.perf_counter() - start

        return run

    missing = object()
    before = {name: vars(engine).get(name, missing) for name in PHASES}
    try:
        for name, label in PHASES.items():
            setattr(engine, name, timed(getattr(engine, name), label))
        yield spent
    finally:
        for name, was in before.items():  # as they were: the class's methods, or an override
            if was is missing:
                vars(engine).pop(name, None)
            else:
                setattr(engine, name, was)
        spent["sample"] -= forward_in_run[0]
