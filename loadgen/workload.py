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
) -> list[RequestSpec]:
    """One request per arrival; its adapter drawn by ``weights`` (adapter i = ``lora-<i>``) and
    its lengths drawn from ``lengths`` rows."""
    adapters = rng.choice(len(weights), size=len(arrivals), p=np.asarray(weights))
    picks = rng.integers(0, len(lengths), size=len(arrivals))
    out = []
    for t, a, k in zip(arrivals, adapters, picks):
        p, o = scaling.apply(lengths[k].input_tokens, lengths[k].output_tokens)
        out.append(RequestSpec(arrival_s=float(t), adapter=f"lora-{a}", prompt_len=p, output_len=o))
    return out
