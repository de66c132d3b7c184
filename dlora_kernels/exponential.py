"""Exp(1) draws for the sampler's exponential race, keyed per row: row i's draws are a function of
its 64-bit key and the token index alone (counter-based: Philox4x32-10, Salmon et al., "Parallel
random numbers: as easy as 1, 2, 3", SC'11, as Triton's ``tl.rand`` computes it). A GPU then draws
every sampled row of a step in one launch (``exponential_triton``) where a torch generator per row
cost a generator's set-up on the host and a launch each, and a seeded row still draws the same
whatever shares its batch.

This module is the torch reference, in int64 arithmetic (each 32-bit word in an int64, products
wrapping as two's complement, whose low 64 bits are the unsigned product's): the Triton kernel
equals it to the last bit of the uniform and to rounding of the logarithm. About 120 elementwise
passes: a CPU keeps drawing from torch's own generators (``engine/sampler.py``).
"""

from __future__ import annotations

import torch

_M32 = 0xFFFFFFFF
# Philox4x32's key increments (Weyl sequence) and round multipliers: triton/language/random.py.
_KEY_A, _KEY_B = 0x9E3779B9, 0xBB67AE85
_ROUND_A, _ROUND_B = 0xD2511F53, 0xCD9E8D57
ROUNDS = 10
# Triton's uint_to_uniform_float for 32 bits: the largest scale with (2**31 - 1) * scale < 1.
_SCALE = 4.6566127342e-10
# The least uniform a draw takes (u is 0 for two words of 2**32): E = -log(u) at most 22.2, never
# inf, which would make p / E 0 for the one token a row allows and hand the argmax token 0.
U_MIN = 2.0**-32


def philox(keys: torch.Tensor, n: int) -> torch.Tensor:
    """The first output word of Philox4x32-10, (rows, n) int64 in [0, 2**32): element (i, j) with
    key ``keys[i]`` (int64: its low 32 bits the first key word, its high 32 the second) and
    counter (j, 0, 0, 0)."""
    keys = keys.to(torch.int64)
    k0, k1 = (keys & _M32)[:, None], ((keys >> 32) & _M32)[:, None]
    c0 = torch.arange(n, dtype=torch.int64, device=keys.device).expand(len(keys), n)
    c1 = c2 = c3 = torch.zeros_like(c0)
    for _ in range(ROUNDS):
        prod_b, prod_a = c2 * _ROUND_B, c0 * _ROUND_A  # wrap: the low 64 bits of each product
        c0, c1, c2, c3 = (
            ((prod_b >> 32) & _M32) ^ c1 ^ k0,
            prod_b & _M32,
            ((prod_a >> 32) & _M32) ^ c3 ^ k1,
            prod_a & _M32,
        )
        k0, k1 = (k0 + _KEY_A) & _M32, (k1 + _KEY_B) & _M32
    return c0


def philox_uniform(keys: torch.Tensor, n: int) -> torch.Tensor:
    """Uniform draws in [0, 1), (rows, n) float32: ``philox``'s words read as ``tl.rand`` reads
    them (as int32, negative ones complemented, times ``_SCALE``)."""
    c0 = philox(keys, n)
    folded = torch.where(c0 > 0x7FFFFFFF, _M32 - c0, c0)  # as int32, ~x where negative
    return folded.to(torch.float32) * torch.tensor(_SCALE, dtype=torch.float32, device=keys.device)


def exponentials_torch(keys: torch.Tensor, n: int) -> torch.Tensor:
    """Exp(1) draws (rows, n) float32, ``-log(max(u, U_MIN))`` of ``philox_uniform``: in (0, 22.2]
    (u < 1), so p / E is finite, and 0 only where p is."""
    return philox_uniform(keys, n).clamp_min_(U_MIN).log_().neg_()
