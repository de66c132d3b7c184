"""A request's seed, drawn once where it enters: a resumed request draws what it would have."""

from __future__ import annotations

import secrets

import msgspec

from dlora.common.messages import GenerateRequest


def with_seed(req: GenerateRequest) -> GenerateRequest:
    """``req``, with a seed drawn for it if it samples without one. A seeded request's draws are
    keyed by output position (the worker's sampler), so wherever it resumes (moved, or after its
    worker died) it continues as it would have, and a token regenerated after a crash is the one
    the client already has."""
    if req.params.temperature == 0.0 or req.params.seed is not None:
        return req
    return msgspec.structs.replace(req, params=msgspec.structs.replace(req.params, seed=secrets.randbits(63)))
