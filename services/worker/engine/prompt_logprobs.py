"""Prompt logprobs (vLLM's ``prompt_logprobs``; the completions API's ``echo`` with ``logprobs``):
each prompt token's log-probability after the tokens before it, taken from the steps that prefill
the prompt, a chunk at a time, and sent with the request's first output token.

The hidden state at prompt position p predicts token p + 1, so a chunk of positions [a, b) gives
the entries of tokens a + 1 .. b (the last prompt position predicts the first output token, which
is sampled as usual). Entries are collected only while the request has no output yet, so a
preemption before its first token recomputes the prompt without repeating them, and a request
resumed elsewhere after its first token does not compute them again. Such a request takes
nothing from the prefix cache (``scheduler.NO_REUSE``): a cached block's positions have no
hidden states.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from dlora.common.messages import TokenLogprob
from dlora.kernels.host import to_device
from dlora.services.worker.engine.model import LlamaModel, StepInputs
from dlora.services.worker.engine.sequence import Sequence

# Rows of (rows, vocab) logits made at once: a 2,000-token prompt over a 128k vocabulary would be 1 GB.
_SLICE = 256


def wanted(seq: Sequence) -> tuple[int, int] | None:
    """The prompt positions [a, b) of this step's chunk whose entries ``seq`` still lacks, or None."""
    if not seq.collects_prompt_logprobs:
        return None
    a = max(seq.num_cached, len(seq.prompt_logprobs))  # entry i is position i's
    b = min(seq.num_cached + seq.num_scheduled, len(seq.prompt_ids) - 1)
    return (a, b) if a < b else None


def forward(model: LlamaModel, inputs: StepInputs, batch: list[Sequence]) -> torch.Tensor:
    """``model.forward(inputs)``: logits (B, vocab) at each sequence's last new token, with the
    prompt entries of the sequences that want them appended to their ``prompt_logprobs``."""
    rows: list[int] = []
    spans: list[tuple[Sequence, int, int]] = []
    offset = 0  # the flat index of the sequence's first new token
    for s in batch:
        if (w := wanted(s)) is not None:
            rows += range(offset + w[0] - s.num_cached, offset + w[1] - s.num_cached)
            spans.append((s, *w))
        offset += s.num_scheduled
    if not spans:
        return model.forward(inputs)
    inputs.extra_index = to_device(rows, torch.int64, inputs.input_ids.device)
    hidden = model.last_hidden(inputs)
    extra = hidden[len(batch) :]
    at = 0
    for s, a, b in spans:
        collect(s, extra[at : at + b - a], a, model.logits)
        at += b - a
    return model.logits(hidden[: len(batch)])


def collect(seq: Sequence, hidden: torch.Tensor, start: int, logits_of: Callable[[torch.Tensor], torch.Tensor]) -> None:
    """Append the entries of positions ``start`` .. ``start + len(hidden)`` (their normed hidden
    states (n, hidden)) to ``seq.prompt_logprobs``: the next prompt token's log-probability, its
    rank in the vocabulary, and the ``prompt_logprobs`` most likely alternatives, most likely first."""
    top = seq.params.prompt_logprobs or 0
    for i in range(0, hidden.shape[0], _SLICE):
        lp = torch.log_softmax(logits_of(hidden[i : i + _SLICE]), dim=-1)
        first = start + i + 1
        targets = torch.tensor(seq.prompt_ids[first : first + lp.shape[0]], device=lp.device)
        chosen = lp.gather(1, targets[:, None])
        ranks = (lp >= chosen).sum(dim=-1).tolist()  # vLLM's count: the tokens at least as likely
        alternatives: list[list[tuple[int, float]]] = [[] for _ in ranks]
        if top:
            values, ids = lp.topk(top, dim=-1)
            alternatives = [list(zip(r_ids, r_values)) for r_ids, r_values in zip(ids.tolist(), values.tolist())]
        for token, logprob, alt, rank in zip(targets.tolist(), chosen[:, 0].tolist(), alternatives, ranks):
            seq.prompt_logprobs.append(TokenLogprob(token, logprob, alt, rank))
