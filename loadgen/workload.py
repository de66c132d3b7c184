"""A workload: who asks what when. Arrivals x adapter popularity x lengths, deterministic per seed."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from dlora.loadgen.traces import LLMRequestRow


@dataclass(frozen=True)
class RequestSpec:
    arrival_s: float
    adapter: str | None  # None: the base model
    prompt_len: int
    output_len: int


@dataclass(frozen=True)
class LengthScaling:
    """How trace lengths are fitted to a small machine: divided by ``divide``, then capped."""

    divide: float = 1.0
    max_prompt: int = 1 << 30
    max_output: int = 1 << 30

    def apply(self, prompt: int, output: int) -> tuple[int, int]:
        p = min(self.max_prompt, max(1, round(prompt / self.divide)))
        o = min(self.max_output, max(1, round(output / self.divide)))
        return p, o


def build(
    arrivals: list[float],
    weights: list[float],
    lengths: list[LLMRequestRow],
    rng: np.random.Generator,
    scaling: LengthScaling = LengthScaling(),
    names: list[str | None] | None = None,
    shift_every_s: float | None = None,
    lengths_in_order: bool = False,
) -> list[RequestSpec]:
    """One request per arrival.

    Its adapter is drawn by ``weights`` over ``names`` (default ``lora-<i>``; None = the base
    model). With ``shift_every_s`` popularity moves over time: every that many seconds the weights
    rotate by one adapter, so the hot adapter changes (what migration is for). Its lengths are
    drawn from ``lengths`` rows, or taken in order (a trace replayed with its own lengths).
    """
    names = names or [f"lora-{i}" for i in range(len(weights))]
    if len(names) != len(weights):
        raise ValueError(f"{len(names)} adapter names for {len(weights)} weights")
    drawn = rng.choice(len(weights), size=len(arrivals), p=np.asarray(weights))
    picks = np.arange(len(arrivals)) % len(lengths) if lengths_in_order else rng.integers(0, len(lengths), len(arrivals))
    out = []
    for t, a, k in zip(arrivals, drawn, picks):
        if shift_every_s:
            a = (a + int(t // shift_every_s)) % len(weights)
        p, o = scaling.apply(lengths[k].input_tokens, lengths[k].output_tokens)
        out.append(RequestSpec(arrival_s=float(t), adapter=names[a], prompt_len=p, output_len=o))
    return out
