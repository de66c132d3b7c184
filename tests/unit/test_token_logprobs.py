"""outputs.token_logprobs: every row that asked, at once, as each row alone would give them."""

from __future__ import annotations

import pytest
import torch

from dlora.services.worker.engine.outputs import token_logprobs


def test_rows_with_different_tops_get_their_own_and_the_others_none() -> None:
    logits = torch.randn(4, 50, generator=torch.Generator().manual_seed(0)) * 3
    got = token_logprobs(logits, {0: (3, 2), 2: (7, 0), 3: (1, 5)})
    assert set(got) == {0, 2, 3}
    for i, (token, top) in {0: (3, 2), 2: (7, 0), 3: (1, 5)}.items():
        lp = torch.log_softmax(logits[i], -1)
        assert got[i].token_id == token and got[i].logprob == pytest.approx(float(lp[token]), abs=1e-6)
        best = torch.topk(lp, top) if top else None
        assert [t for t, _ in got[i].top] == (best.indices.tolist() if best is not None else [])
        assert [v for _, v in got[i].top] == pytest.approx(best.values.tolist() if best is not None else [])
    assert token_logprobs(logits, {}) == {}


def test_a_rows_alternatives_among_ties_do_not_depend_on_what_else_asked() -> None:
    logits = (torch.randn(3, 400, generator=torch.Generator().manual_seed(1)) * 2).round()  # many ties
    alone = token_logprobs(logits, {0: (5, 2), 2: (9, 3)})
    beside = token_logprobs(logits, {0: (5, 2), 1: (4, 20), 2: (9, 3)})
    assert alone[0] == beside[0] and alone[2] == beside[2]
    assert len(beside[1].top) == 20 and beside[1].top[0][1] == pytest.approx(
        float(torch.log_softmax(logits[1], -1).max())
    )
