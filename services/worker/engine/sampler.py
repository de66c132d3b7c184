"""Choose each sequence's next token from its logits: greedy, or temperature / top-k / top-p.

Safe for every parameter value the API accepts: temperatures below ``GREEDY_BELOW`` act greedy
(dividing by them overflows; vLLM's ``_SAMPLING_EPS`` draws the same line), ``top_p`` 0 and
``top_k`` 1 keep one token, and a row whose logits are not finite fails alone with a reason.
"""

from __future__ import annotations

from typing import Any

import torch

from dlora.common.messages import SamplingParams
from dlora.services.worker.engine.structured import allowed

# Temperatures below this sample greedily (vLLM: vllm/sampling_params.py, _SAMPLING_EPS = 1e-5).
GREEDY_BELOW = 1e-5


class SamplingError(ValueError):
    """One row could not be sampled; the message says why (the other rows are unaffected)."""


def is_greedy(p: SamplingParams) -> bool:
    return p.temperature < GREEDY_BELOW or p.top_k == 1 or p.top_p == 0.0


def has_penalties(p: SamplingParams) -> bool:
    return p.presence_penalty != 0.0 or p.frequency_penalty != 0.0 or p.repetition_penalty != 1.0


def apply_penalties(
    logits: torch.Tensor, p: SamplingParams, prompt_ids: list[int], output_ids: list[int]
) -> torch.Tensor:
    """One row of logits (vocab,) after the penalties, as vLLM applies them: the repetition penalty
    over prompt and output tokens (transformers' RepetitionPenaltyLogitsProcessor), then OpenAI's
    frequency and presence penalties over the output tokens
    (platform.openai.com/docs/advanced-usage: mu[j] - c[j] * frequency - (c[j] > 0) * presence)."""
    logits = logits.float().clone()
    if p.repetition_penalty != 1.0 and (prompt_ids or output_ids):
        seen = torch.tensor(sorted(set(prompt_ids) | set(output_ids)), device=logits.device)
        picked = logits[seen]
        logits[seen] = torch.where(picked > 0, picked / p.repetition_penalty, picked * p.repetition_penalty)
    if (p.frequency_penalty or p.presence_penalty) and output_ids:
        counts = torch.bincount(torch.tensor(output_ids, device=logits.device), minlength=logits.numel())
        counts = counts[: logits.numel()].to(logits.dtype)
        logits -= counts * p.frequency_penalty + (counts > 0).to(logits.dtype) * p.presence_penalty
    return logits


def sample(
    logits: torch.Tensor,
    params: list[SamplingParams],
    generators: list[torch.Generator | None],
    histories: list[tuple[list[int], list[int]]] | None = None,
) -> list[int | SamplingError]:
    """Next token id per row of logits (B, vocab), fp32. Greedy rows take the argmax.

    Rows that sample draw from their own generator when they have one, so a seeded request gives
    the same tokens whatever else shares its batch. Rows with penalties are penalised first by
    their (prompt ids, output ids) in ``histories``. A row that cannot be sampled (its logits hold
    NaN or infinity) gets a ``SamplingError`` in its place instead of a token.
    """
    # One pass for the usual batch; only rows holding a non-finite value are looked at again, where
    # -inf is a masked token (structured output), not a fault, unless every token is masked.
    # The argmax and the finiteness flags come to the host in one transfer: on a GPU each
    # transfer is a synchronisation the step waits for.
    argmax, all_finite = torch.stack((logits.argmax(dim=-1), torch.isfinite(logits).all(dim=-1).long())).tolist()
    finite = [bool(ok) for ok in all_finite]
    for i, ok in enumerate(finite):
        if not ok:
            row = logits[i]
            finite[i] = not (torch.isnan(row).any() or torch.isposinf(row).any() or torch.isneginf(row).all())
    out: list[int | SamplingError] = list(argmax)
    simple = [not has_penalties(p) and is_greedy(p) for p in params]
    for i, p in enumerate(params):
        if not finite[i]:
            out[i] = SamplingError(
                "the model's logits for this request are not finite (NaN or infinity, or "
                "every token masked); nothing can be sampled from them"
            )
            continue
        if simple[i]:  # the batch argmax is its token
            continue
        try:
            out[i] = _sample_row(logits[i], p, generators[i], histories[i] if histories else ([], []))
        except (RuntimeError, ValueError) as e:  # one row's numbers, never the batch's
            out[i] = SamplingError(
                f"{e} (temperature={p.temperature}, top_p={p.top_p}, top_k={p.top_k}, "
                f"repetition_penalty={p.repetition_penalty})"
            )
    return out


def _sample_row(
    row: torch.Tensor, p: SamplingParams, generator: torch.Generator | None, history: tuple[list[int], list[int]]
) -> int:
    if has_penalties(p):
        row = apply_penalties(row, p, *history)
        if torch.isnan(row).any() or torch.isposinf(row).any():
            raise ValueError("the penalties pushed the logits out of the float range")
    if is_greedy(p):
        return int(row.argmax())
    probs = filtered_probs(row, p)
    if not torch.isfinite(probs).all() or probs.sum() <= 0:
        raise ValueError("no finite distribution is left to sample from")
    return int(torch.multinomial(probs.cpu(), 1, generator=generator).item())


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


def constrain(logits: torch.Tensor, matchers: list[Any]) -> torch.Tensor:
    """``logits`` (B, vocab) with the tokens each row's structured-output matcher (llguidance; None:
    unconstrained) forbids set to -inf; a matcher that fails masks its whole row, so that row
    alone fails to sample."""
    rows = [i for i, m in enumerate(matchers) if m is not None]
    if not rows:
        return logits
    masked = logits.clone()
    for i in rows:
        try:
            ok = torch.from_numpy(allowed(matchers[i], masked.shape[-1])).to(masked.device)
        except Exception:  # noqa: BLE001 - its own row fails (every token masked), not the step
            ok = torch.zeros(masked.shape[-1], dtype=torch.bool, device=masked.device)
        masked[i].masked_fill_(~ok, float("-inf"))
    return masked
