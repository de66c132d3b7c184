"""The sampler on a GPU (make gpu-check runs this file there; skipped elsewhere)."""

from __future__ import annotations

import warnings

import pytest
import torch

from dlora.common.messages import SamplingParams
from dlora.services.worker.engine.sampler import position_generator, sample


@pytest.mark.skipif(not torch.cuda.is_available(), reason="host synchronisations are a GPU's (make gpu-check)")
def test_sampling_on_a_gpu_waits_for_the_device_as_often_at_any_batch() -> None:
    """The transfers the step waits for do not grow with the rows that sample (each waited several
    times before): the same count for 2 rows as for 32, penalties and seeds included."""
    counts = []
    for n in (2, 32):
        logits = torch.randn(n, 32000, device="cuda")
        params = [SamplingParams(temperature=0.8, top_p=0.9, top_k=50, seed=i, presence_penalty=0.5) for i in range(n)]
        generators = [position_generator(i, 3) for i in range(n)]
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
