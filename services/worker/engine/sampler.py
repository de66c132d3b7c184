"""Choose each sequence's next token from its logits: greedy, or temperature / top-k / top-p."""

from __future__ import annotations

import torch

from dlora.common.messages import SamplingParams


def sample(
    logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator | None]
) -> list[int]:
    """Next token id per row of logits (B, vocab), fp32. Greedy rows take the argmax.

    Rows that sample draw from their own generator when they have one, so a seeded request gives
    the same tokens whatever else shares its batch.
    """
    out = logits.argmax(dim=-1).tolist()
    for i, p in enumerate(params):
        if p.temperature == 0.0:
            continue
        probs = filtered_probs(logits[i], p)
        g = generators[i]
        out[i] = int(torch.multinomial(probs.cpu(), 1, generator=g).item())
    return out


_MASK = (1 << 63) - 1


def position_generator(seed: int, position: int) -> torch.Generator:
    """The generator for a seeded request's draw at output ``position``. Keyed by position rather
    than carried along, so a request resumed elsewhere (moved, or after its worker died) draws
    what it would have drawn had it stayed: a token regenerated after a crash is the one the
    client already has."""
    return torch.Generator().manual_seed((seed * 0x9E3779B97F4A7C15 + position) & _MASK)


def filtered_probs(logits: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    """Probabilities (vocab,) after temperature, then top-k, then top-p (nucleus)."""
    scaled = logits.float() / p.temperature
    if 0 < p.top_k < scaled.numel():
        kth = torch.topk(scaled, p.top_k).values[-1]
        scaled = scaled.masked_fill(scaled < kth, float("-inf"))
    if p.top_p < 1.0:
        sorted_logits, order = scaled.sort(descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        # Drop a token when the tokens before it already reach top_p; the first always stays.
        drop_sorted = (cum - sorted_logits.softmax(-1)) >= p.top_p
        drop = torch.zeros_like(drop_sorted).scatter(0, order, drop_sorted)
        scaled = scaled.masked_fill(drop, float("-inf"))
    return scaled.softmax(-1)
