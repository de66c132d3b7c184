"""Choose each sequence's next token from its logits: greedy, or temperature / top-k / top-p.

Safe for every parameter value the API accepts: temperatures below ``GREEDY_BELOW`` act greedy
(dividing by them overflows; vLLM's ``_SAMPLING_EPS`` draws the same line), ``top_p`` 0 and
``top_k`` 1 keep one token, and a row whose logits are not finite fails alone with a reason.
"""

from __future__ import annotations

import torch

from dlora.common.messages import SamplingParams

# Temperatures below this sample greedily (vLLM: vllm/sampling_params.py, _SAMPLING_EPS = 1e-5).
GREEDY_BELOW = 1e-5


class SamplingError(ValueError):
    """One row could not be sampled; the message says why (the other rows are unaffected)."""


def is_greedy(p: SamplingParams) -> bool:
    return p.temperature < GREEDY_BELOW or p.top_k == 1 or p.top_p == 0.0


def sample(
    logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator | None]
) -> list[int | SamplingError]:
    """Next token id per row of logits (B, vocab), fp32. Greedy rows take the argmax.

    Rows that sample draw from their own generator when they have one, so a seeded request gives
    the same tokens whatever else shares its batch. A row that cannot be sampled (its logits hold
    NaN or infinity) gets a ``SamplingError`` in its place instead of a token.
    """
    finite = torch.isfinite(logits).all(dim=-1).tolist()
    out: list[int | SamplingError] = logits.argmax(dim=-1).tolist()
    for i, p in enumerate(params):
        if not finite[i]:
            out[i] = SamplingError("the model's logits for this request are not finite (NaN or infinity); "
                                   "nothing can be sampled from them")
        elif not is_greedy(p):
            probs = filtered_probs(logits[i], p)
            out[i] = int(torch.multinomial(probs.cpu(), 1, generator=generators[i]).item())
    return out


_MASK = (1 << 63) - 1


def position_generator(seed: int, position: int) -> torch.Generator:
    """The generator for a seeded request's draw at output ``position``. Keyed by position rather
    than carried along, so a request resumed elsewhere (moved, or after its worker died) draws
    what it would have drawn had it stayed: a token regenerated after a crash is the one the
    client already has."""
    return torch.Generator().manual_seed((seed * 0x9E3779B97F4A7C15 + position) & _MASK)


def filtered_probs(logits: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    """Probabilities (vocab,) after temperature, then top-k, then top-p (nucleus). The most likely
    token always keeps its place, so the result is a distribution for any accepted parameters."""
    scaled = logits.float() / max(p.temperature, GREEDY_BELOW)
    if 0 < p.top_k < scaled.numel():
        kth = torch.topk(scaled, p.top_k).values[-1]
        scaled = scaled.masked_fill(scaled < kth, float("-inf"))
    if p.top_p < 1.0:
        sorted_logits, order = scaled.sort(descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        # Drop a token when the tokens before it already reach top_p; the first always stays.
        drop_sorted = (cum - sorted_logits.softmax(-1)) >= p.top_p
        drop_sorted[0] = False
        drop = torch.zeros_like(drop_sorted).scatter(0, order, drop_sorted)
        scaled = scaled.masked_fill(drop, float("-inf"))
    return scaled.softmax(-1)
