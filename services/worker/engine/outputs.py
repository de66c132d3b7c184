"""What the engine gives back: each request's output of a step, the error that refuses a request,
and a token's log-probabilities."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dlora.common.messages import FinishReason, TokenLogprob


class RequestError(ValueError):
    """The request cannot be served as given; the message says why (a 4xx for the caller)."""


@dataclass
class RequestOutput:
    """What one step produced for one request."""

    request_id: str
    new_token_ids: list[int]
    new_text: str  # text completed this step (held back while it could be part of a stop string)
    finished: bool
    finish_reason: FinishReason | None
    num_prompt_tokens: int
    num_output_tokens: int
    error: str | None = None  # why the request failed (finish_reason ERROR)
    logprobs: list[TokenLogprob] | None = None  # per new token, when the request asked for them


def token_logprob(logits: torch.Tensor, token: int, top: int) -> TokenLogprob:
    """The chosen token's log-probability under the model's distribution, logits (vocab,), and
    the ``top`` most likely tokens'."""
    lp = torch.log_softmax(logits.float(), dim=-1)
    best = torch.topk(lp, top) if top else None
    alternatives = list(zip(best.indices.tolist(), best.values.tolist())) if best is not None else []
    return TokenLogprob(token, float(lp[token]), alternatives)
