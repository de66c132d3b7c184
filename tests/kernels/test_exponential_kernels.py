"""The sampler's keyed Exp(1) draws: the torch reference is Philox4x32-10 (Random123's known
answer), the Triton kernel equals it bit for bit in the uniforms (small shapes under the
interpreter; a 152,064-token vocabulary on a GPU), and the draws are Exp(1) and win the
exponential race as often as the probabilities say."""

from __future__ import annotations

import math

import pytest
import torch

from dlora.kernels import exponential
from dlora.kernels.exponential import U_MIN, exponentials_torch, philox, philox_uniform
from dlora.kernels.exponential_triton import exponentials_triton, philox_uniform_triton
from tests.kernels.conftest import cuda_only, device

# Keys at the edges of int64 and of its 32-bit halves, and a few in between.
KEYS = [0, 1, -1, 2**63 - 1, -(2**63), 2**32 - 1, 2**32, 123456789012345, -987654321]


def test_philox_is_random123s_known_answer() -> None:
    """Random123's kat_vectors, philox4x32 with 10 rounds, counter and key all zero: the first
    output word is 0x6627e8d5."""
    assert philox(torch.tensor([0]), 1).item() == 0x6627E8D5


@pytest.mark.parametrize("n", [1, 1000, 2049])
def test_triton_uniforms_equal_the_reference_bit_for_bit(n: int) -> None:
    keys = torch.tensor(KEYS, device=device())
    assert torch.equal(philox_uniform_triton(keys, n), philox_uniform(keys, n))
    torch.testing.assert_close(exponentials_triton(keys, n), exponentials_torch(keys, n), rtol=1e-6, atol=0)


@cuda_only
def test_triton_draws_equal_the_reference_at_a_large_vocabulary() -> None:
    keys = torch.arange(-32, 32, device="cuda") * 0x3779B97F4A7C15  # both halves of the key vary
    assert torch.equal(philox_uniform_triton(keys, 152064), philox_uniform(keys, 152064))
    torch.testing.assert_close(exponentials_triton(keys, 152064), exponentials_torch(keys, 152064), rtol=1e-6, atol=0)


def test_a_rows_draws_depend_on_its_key_alone() -> None:
    keys = torch.tensor(KEYS)
    together = exponentials_torch(keys, 300)
    for i, key in enumerate(KEYS):
        assert torch.equal(exponentials_torch(torch.tensor([key]), 300)[0], together[i])
    assert len({tuple(row[:8].tolist()) for row in together}) == len(KEYS)  # no two keys alike


def test_the_draws_are_exponential() -> None:
    """200,000 draws: the mean, the variance and P(E < ln 2) = 1/2 within four standard errors;
    none is 0 or negative (p / E must never be NaN or favour a zero probability)."""
    e = exponentials_torch(torch.arange(40) * 7919, 5000).double().flatten()
    n = e.numel()
    assert bool((e > 0).all())
    assert abs(e.mean().item() - 1) < 4 / math.sqrt(n)
    assert abs(e.var().item() - 1) < 4 * math.sqrt(8 / n)  # Var of the sample variance of Exp(1): 8/n
    assert abs((e < math.log(2)).double().mean().item() - 0.5) < 4 * 0.5 / math.sqrt(n)


def test_a_zero_uniform_draws_no_infinity(monkeypatch: pytest.MonkeyPatch) -> None:
    """u is 0 for two words in 2**32: E = inf there made p / E 0 for the one token a row allows
    (a grammar's, top_k 1), and the argmax took token 0. Clamped, E is finite and that token wins."""
    assert U_MIN == 2.3283064365386963e-10  # the kernel's literal
    monkeypatch.setattr(exponential, "philox_uniform", lambda keys, n: torch.zeros(len(keys), n))
    e = exponentials_torch(torch.tensor([1]), 4)
    assert torch.isfinite(e).all() and (torch.tensor([[0.0, 0.0, 1.0, 0.0]]) / e).argmax().item() == 2


def test_the_race_draws_from_the_probabilities() -> None:
    """argmax(p / E) over 4,000 keyed rows of the same distribution: each token as often as its
    probability, within 3 %."""
    p = torch.tensor([0.5, 0.25, 0.15, 0.1, 0.0])
    won = (p / exponentials_torch(torch.arange(4000) + 10**9, 5)).argmax(dim=-1)
    freq = torch.bincount(won, minlength=5).double() / 4000
    assert torch.allclose(freq, p.double(), atol=0.03), freq
    assert freq[4] == 0
