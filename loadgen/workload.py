"""A workload: who asks what when. Arrivals x adapter popularity x lengths, deterministic per seed."""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

from dlora.loadgen.popularity import Schedule
from dlora.loadgen.traces import LLMRequestRow


@dataclass(frozen=True)
class RequestSpec:
    arrival_s: float
    adapter: str | None  # None: the base model
    prompt_len: int
    output_len: int
    # The prompt's leading blocks, by hash id, ``block_tokens`` tokens each (Mooncake traces):
    # requests naming the same id share that block token for token, as a prefix cache would see.
    hash_ids: tuple[int, ...] = ()
    block_tokens: int = 0


@functools.lru_cache(maxsize=4096)
def _block(hash_id: int, size: int, vocab: int) -> tuple[int, ...]:
    return tuple(np.random.default_rng([hash_id, 0x5EED]).integers(3, vocab, size).tolist())


def prompt_ids(index: int, spec: RequestSpec, vocab: int = 256) -> list[int]:
    """The prompt of request ``index``: exactly ``spec.prompt_len`` token ids in [3, vocab)
    (exact lengths make runs comparable; ids below 3 are left to special tokens).

    Its hash-id blocks come first, each a function of its id alone, so requests that share an id
    share that block; the rest is a function of ``index``.
    """
    out: list[int] = []
    for h in spec.hash_ids:
        if len(out) >= spec.prompt_len:
            break
        out += _block(h, spec.block_tokens, vocab)
    out = out[: spec.prompt_len]
    return out + [(13 * index + 7 * j) % (vocab - 3) + 3 for j in range(len(out), spec.prompt_len)]


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
    weights: list[float] | Schedule,
    lengths: list[LLMRequestRow],
    rng: np.random.Generator,
    scaling: LengthScaling = LengthScaling(),
    names: list[str | None] | None = None,
    shift_every_s: float | None = None,
    lengths_in_order: bool = False,
    block_tokens: int | None = None,
) -> list[RequestSpec]:
    """One request per arrival.

    Its adapter is drawn by ``weights`` over ``names`` (default ``lora-<i>``; None = the base
    model); a ``Schedule`` gives the weights in force at its arrival time. With ``shift_every_s``
    popularity moves over time: every that many seconds the weights rotate by one adapter, so the
    hot adapter changes (what migration is for). Its lengths are drawn from ``lengths`` rows, or
    taken in order (a trace replayed with its own lengths). Rows with hash ids (Mooncake) keep
    them, with blocks of ``block_tokens`` trace tokens scaled like the lengths.
    """
    n = len(weights.weights[0]) if isinstance(weights, Schedule) else len(weights)
    names = names or [f"lora-{i}" for i in range(n)]
    if len(names) != n:
        raise ValueError(f"{len(names)} adapter names for {n} weights")
    if isinstance(weights, Schedule):
        drawn = [rng.choice(n, p=np.asarray(weights.at(t))) for t in arrivals]
    else:
        drawn = rng.choice(n, size=len(arrivals), p=np.asarray(weights))
    picks = np.arange(len(arrivals)) % len(lengths) if lengths_in_order else rng.integers(0, len(lengths), len(arrivals))
    block = max(1, round(block_tokens / scaling.divide)) if block_tokens else 0
    out = []
    for t, a, k in zip(arrivals, drawn, picks):
        if shift_every_s:
            a = (a + int(t // shift_every_s)) % n
        p, o = scaling.apply(lengths[k].input_tokens, lengths[k].output_tokens)
        hash_ids = lengths[k].hash_ids if block else ()
        out.append(RequestSpec(arrival_s=float(t), adapter=names[a], prompt_len=p, output_len=o,
                               hash_ids=hash_ids, block_tokens=block if hash_ids else 0))
    return out
