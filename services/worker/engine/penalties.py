"""The penalties a row's logits take before sampling: transformers' repetition penalty over the
prompt and output tokens, OpenAI's frequency and presence penalties over the output tokens, in
vLLM's order; one row (``apply_penalties``) or a batch in a fixed number of launches
(``apply_penalties_rows``). Pure: tensors in, tensors out."""

from __future__ import annotations

import torch

from dlora.common.messages import SamplingParams
from dlora.kernels.host import to_device

# Temperatures below this sample greedily (vLLM: vllm/sampling_params.py, _SAMPLING_EPS = 1e-5);
# a saturated logit (``repetition``) stays finite divided by any temperature above it.
GREEDY_BELOW = 1e-5


def has_penalties(p: SamplingParams) -> bool:
    return p.presence_penalty != 0.0 or p.frequency_penalty != 0.0 or p.repetition_penalty != 1.0


_FINITE = torch.finfo(torch.float32)
# Where a seen logit saturates: divided by the smallest temperature sampled with (GREEDY_BELOW) it
# stays finite (at float32's largest, temperature 0.7 made it infinity again and the softmax NaN).
_SATURATED = _FINITE.max * GREEDY_BELOW / 2
# The largest logit magnitude a mild penalty (``saturates``) is known to keep within ``_SATURATED``:
# far past a trained model's (tens to hundreds), but an assumption, not a dtype's bound: fp16 logits
# stop at 65,504, while bf16 (the GPU default) and fp32 reach float32's 3.4e38. A logit beyond it
# under a mild penalty is scaled as it is, not saturated (past float32, the row fails as pushed).
LOGIT_BOUND = 2.0**64
# Penalties within [1 / _MILD, _MILD] take no logit up to ``LOGIT_BOUND`` past ``_SATURATED``
# (1.7e33 / 1.8e19, halved for the rounding of the product): some 4.6e13.
_MILD = _SATURATED / LOGIT_BOUND / 2


def saturates(penalty: float) -> bool:
    """Whether repetition penalty ``penalty`` can push a logit of magnitude up to ``LOGIT_BOUND``
    past ``_SATURATED``: one below 1 / ``_MILD`` or above ``_MILD`` (some 4.6e13). Known on the
    host from the request before a step, so a batch of milder penalties (the 1.05 to 2 clients
    send) leaves the saturation's three passes over its (batch, vocab) logits out."""
    return not 1 / _MILD <= penalty <= _MILD


def repetition(
    picked: torch.Tensor, penalty: torch.Tensor | float, saturate: bool | torch.Tensor = True
) -> torch.Tensor:
    """transformers' repetition penalty on the logits of seen tokens ``picked`` (any shape, fp32;
    ``penalty`` a float or a tensor broadcast to it): a positive logit divided by it, any other
    multiplied. Any penalty above 0 is taken (vLLM's bound), and one far from 1 (1e-40, 1e300) would
    push a finite logit past float32 (to infinity, or NaN as 0 x inf), failing a valid request:
    such a logit saturates instead (at ``_SATURATED``, which any temperature keeps finite), as
    favoured or shunned as float32 says. A masked (-inf) logit stays masked. ``saturate`` False
    (no penalty here ``saturates``): the same numbers for logits up to ``LOGIT_BOUND``, in three
    elementwise passes fewer; a bool tensor broadcast to ``picked``: only where it is true (the rows
    whose own penalty ``saturates``, so a row's numbers never depend on the rows beside it)."""
    if isinstance(penalty, torch.Tensor):
        penalty = penalty.clamp(_FINITE.tiny, _FINITE.max)
    else:
        penalty = min(max(penalty, _FINITE.tiny), _FINITE.max)
    out = torch.where(picked > 0, picked / penalty, picked * penalty)
    if saturate is False:
        return out
    keep = picked.isfinite() if saturate is True else picked.isfinite() & saturate
    return torch.where(keep, out.clamp(-_SATURATED, _SATURATED), out)


def apply_penalties(
    logits: torch.Tensor, p: SamplingParams, prompt_ids: list[int], output_ids: list[int]
) -> torch.Tensor:
    """One row of logits (vocab,) after the penalties, as vLLM applies them: the repetition penalty
    over prompt and output tokens (transformers' RepetitionPenaltyLogitsProcessor), then OpenAI's
    frequency and presence penalties over the output tokens
    (platform.openai.com/docs/advanced-usage: mu[j] - c[j] * frequency - (c[j] > 0) * presence)."""
    logits = logits.float().clone()
    if p.repetition_penalty != 1.0 and (prompt_ids or output_ids):
        seen = to_device(sorted(set(prompt_ids) | set(output_ids)), torch.int64, logits.device)
        picked = logits[seen]
        logits[seen] = repetition(picked, p.repetition_penalty, saturates(p.repetition_penalty))
    if (p.frequency_penalty or p.presence_penalty) and output_ids:
        # index_add_, not bincount: bincount reads its input's range back to the host (on a GPU, a
        # wait for the device per row).
        ids = to_device(output_ids, torch.int64, logits.device)
        counts = torch.zeros_like(logits).index_add_(0, ids, torch.ones_like(ids, dtype=logits.dtype))
        logits -= counts * p.frequency_penalty + (counts > 0).to(logits.dtype) * p.presence_penalty
    return logits


def apply_penalties_rows(
    logits: torch.Tensor, params: list[SamplingParams], histories: list[tuple[list[int], list[int]]]
) -> torch.Tensor:
    """``apply_penalties`` of every row of ``logits`` (n, vocab) under its own parameters and (prompt
    ids, output ids), in a fixed number of launches whatever n (a few per row before). Never written
    in place, so not copied first (a (n, vocab) pass a step): ``logits`` itself (fp32) where no row
    has a penalty to apply."""
    out = logits.float()
    n, vocab = out.shape
    dev = out.device

    def flat(rows: list[int], ids: list[list[int]]) -> torch.Tensor:  # (row, token) -> row * vocab + token
        return to_device([j * vocab + t for j, row_ids in zip(rows, ids) for t in row_ids], torch.int64, dev)

    rep = [j for j, (p, (pr, ou)) in enumerate(zip(params, histories)) if p.repetition_penalty != 1.0 and (pr or ou)]
    if rep:
        seen = torch.zeros(n * vocab, dtype=torch.bool, device=dev)
        seen[flat(rep, [sorted(set(histories[j][0]) | set(histories[j][1])) for j in rep])] = True
        penalty = to_device([p.repetition_penalty for p in params], torch.float32, dev)[:, None]
        # Per row, as ``apply_penalties`` decides alone: a mild row beside a far one is not saturated
        # (its logit past ``LOGIT_BOUND`` would otherwise be, or not, by what shares its batch).
        far = [saturates(p.repetition_penalty) for p in params]
        saturate = all(far) or (any(far) and to_device(far, torch.bool, dev)[:, None])  # (a mask: one more pass)
        out = torch.where(seen.view(n, vocab), repetition(out, penalty, saturate), out)
    counted = [j for j, p in enumerate(params) if (p.frequency_penalty or p.presence_penalty) and histories[j][1]]
    if counted:
        ids = flat(counted, [histories[j][1] for j in counted])
        counts = torch.zeros(n * vocab, dtype=out.dtype, device=dev).index_add_(
            0, ids, torch.ones_like(ids, dtype=out.dtype)
        )
        counts = counts.view(n, vocab)
        frequency = to_device([p.frequency_penalty for p in params], torch.float32, dev)[:, None]
        presence = to_device([p.presence_penalty for p in params], torch.float32, dev)[:, None]
        out = out - (counts * frequency + (counts > 0).to(out.dtype) * presence)
    return out
