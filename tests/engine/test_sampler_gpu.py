"""The sampler on a GPU (make gpu-check runs this file there; skipped elsewhere)."""

from __future__ import annotations

import warnings

import pytest
import torch

from dlora.common.messages import SamplingParams
from dlora.kernels.exponential import exponentials_torch
from dlora.services.worker.engine.sampler import filtered_probs_rows, position_key, sample


@pytest.mark.skipif(not torch.cuda.is_available(), reason="host synchronisations are a GPU's (make gpu-check)")
def test_sampling_on_a_gpu_waits_for_the_device_as_often_at_any_batch() -> None:
    """The transfers the step waits for do not grow with the rows that sample (each waited several
    times before): the same count for 2 rows as for 32, penalties and seeds included."""
    counts = []
    for n in (2, 32):
        logits = torch.randn(n, 32000, device="cuda")
        params = [SamplingParams(temperature=0.8, top_p=0.9, top_k=50, seed=i, presence_penalty=0.5) for i in range(n)]
        generators: list = [position_key(i, 3) for i in range(n)]  # as the engine passes a seeded row's
        histories = [([1, 2], [3])] * n
        sample(logits, params, generators, histories)  # warm
        torch.cuda.set_sync_debug_mode("warn")
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                sample(logits, params, generators, histories)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        counts.append(len(caught))
    assert counts[0] == counts[1], counts


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the keyed draws are a GPU's (make gpu-check)")
def test_a_gpu_draws_each_seeded_row_from_its_philox_key() -> None:
    """A seeded row on a GPU is the race of its probabilities against the reference's draws for its
    key (dlora_kernels/exponential.py), whatever shares its batch; an unseeded row draws too."""
    n, vocab = 16, 32000
    logits = torch.randn(n, vocab, device="cuda", generator=torch.Generator("cuda").manual_seed(0)) * 2
    params = [SamplingParams(temperature=0.9, top_k=0 if i % 2 else 40, seed=i) for i in range(n)]
    keys = [position_key(i, 5) for i in range(n)]
    tokens = sample(logits, params, list(keys))
    signed = torch.tensor([k - 2**64 if k >= 2**63 else k for k in keys], device="cuda")
    race = filtered_probs_rows(logits, params) / exponentials_torch(signed, vocab)
    assert tokens == race.argmax(dim=-1).tolist()
    assert sample(logits[3:4], params[3:4], keys[3:4]) == tokens[3:4]  # alone, the same token
    unseeded = sample(logits, [SamplingParams(temperature=1.0)] * n, [None] * n)
    assert all(isinstance(t, int) and 0 <= t < vocab for t in unseeded)
