"""Choose each sequence's next token from its logits: greedy, or temperature / top-k / top-p.

Safe for every parameter value the API accepts: temperatures below ``GREEDY_BELOW`` act greedy
(dividing by them overflows; vLLM's ``_SAMPLING_EPS`` draws the same line), ``top_p`` 0 and
``top_k`` 1 keep one token, and a row whose logits are not finite fails alone with a reason.
"""

from __future__ import annotations

import hashlib
import math
from typing import TYPE_CHECKING, Any, cast

import numpy as np
import torch

from dlora.common.messages import SamplingParams
from dlora.kernels.host import HostCopy, to_device
from dlora.services.worker.engine.bad_words import banned_now
from dlora.services.worker.engine.faults import raise_if_lost
from dlora.services.worker.engine.penalties import GREEDY_BELOW, apply_penalties, apply_penalties_rows, has_penalties

if TYPE_CHECKING:
    from dlora.services.worker.engine.sequence import Sequence
    from dlora.services.worker.engine.structured import Grammars

# What a sampled row draws from: a 64-bit key (``position_key``), a generator, or None (the
# engine's default generator on the row's device).
RowRandom = int | torch.Generator | None


class SamplingError(ValueError):
    """One row could not be sampled; the message says why (the other rows are unaffected)."""


class NothingAllowed(SamplingError):
    """Every token of the row is masked: the request's own constraints leave none (its JSON
    schema, with min_tokens holding back a stop token the schema needs); its fault, a 4xx."""


class NotFinite(SamplingError):
    """The row's logits hold NaN or infinity: its weights overflowed the worker's precision, or a
    fault; its KV may be NaN too (the engine keeps none of it in the prefix cache)."""


def is_greedy(p: SamplingParams) -> bool:
    return p.temperature < GREEDY_BELOW or p.top_k == 1 or p.top_p == 0.0


def sample(
    logits: torch.Tensor,
    params: list[SamplingParams],
    generators: list[RowRandom],
    histories: list[tuple[list[int], list[int]]] | None = None,
) -> list[int | SamplingError]:
    """Next token id per row of logits (B, vocab), fp32: ``launch_sample``'s, waited for."""
    return launch_sample(logits, params, generators, histories).result()


class Sampled:
    """A batch's draws, on their way to the host: ``tokens`` (B,) int64 stays on the logits'
    device, where the next step's inputs can take it without the host (async scheduling);
    ``result()`` waits for the copy to the host (``HostCopy``: for this step's sampling and
    nothing queued after it) and gives each row's token or its ``SamplingError``."""

    def __init__(
        self,
        tokens: torch.Tensor,
        flags: torch.Tensor,
        params: list[SamplingParams],
        failed: dict[int, str],
        penalised: list[int],
    ) -> None:
        self.tokens = tokens
        self._params, self._failed, self._penalised = params, failed, set(penalised)
        self.broken: set[int] = set()  # rows whose grammar engine failed (``sample_sequences``)
        self._flags = HostCopy(flags)

    def result(self) -> list[int | SamplingError]:
        ids, bad, pushed, usable, masked = self._flags.wait().tolist()
        out: list[int | SamplingError] = []
        for i, p in enumerate(self._params):
            if i in self.broken:  # the grammar engine's failure, not the request's constraints
                out.append(SamplingError("the structured-output grammar failed on this request"))
            elif masked[i]:
                out.append(
                    NothingAllowed(
                        "no token is allowed: the request's constraints mask every one (its structured output, "
                        "allowed_token_ids, bad_words, logit_bias, min_tokens holding back its stop tokens and EOS)"
                    )
                )
            elif bad[i]:
                out.append(
                    NotFinite(
                        "the model's logits for this request are not finite (NaN or infinity); nothing "
                        "can be sampled from them"
                    )
                )
            elif i in self._failed:
                out.append(SamplingError(self._failed[i]))
            elif pushed[i] and i in self._penalised:
                out.append(SamplingError(_why("the penalties pushed the logits out of the float range", p)))
            elif not usable[i]:
                out.append(SamplingError(_why("no finite distribution is left to sample from", p)))
            else:
                out.append(ids[i])
        return out


def launch_sample(
    logits: torch.Tensor,
    params: list[SamplingParams],
    generators: list[RowRandom],
    histories: list[tuple[list[int], list[int]]] | None = None,
) -> Sampled:
    """Next token id per row of logits (B, vocab), fp32, queued on the logits' device. Greedy
    rows take the argmax.

    Rows that sample draw from their own key or generator (``generators``, ``RowRandom``) when they
    have one, so a seeded request gives the same tokens whatever else shares its batch. Rows with
    penalties are penalised first by their (prompt ids, output ids) in ``histories``. A row that
    cannot be sampled (its logits hold NaN or infinity) gets a ``SamplingError`` in its place
    instead of a token.

    Every row at once, as vLLM's sampler works: one pass gives each row's maximum and argmax (the
    maximum says whether the row can be used), the rows that sample are filtered together
    (``filtered_probs_rows``) and drawn by the exponential race (the argmax of p / E, E ~ Exp(1)
    from the row's key or generator, is a draw from p; ``_exponentials``), and what the host needs comes back in one
    transfer: on a GPU the step waits for nothing else (it waited for several per sampled row).
    A row whose every token is masked (-inf) gets ``NothingAllowed`` (the request's constraints
    leave none: its fault).
    """
    histories = histories or [([], [])] * len(params)
    work, failed = logits, {}
    penalised = [i for i, p in enumerate(params) if has_penalties(p)]
    if penalised:
        work = logits.float().clone()
        at = to_device(penalised, torch.int64, logits.device)
        chosen = logits.index_select(0, at)
        try:
            rows = [params[i] for i in penalised], [histories[i] for i in penalised]
            work.index_copy_(0, at, apply_penalties_rows(chosen, *rows))
        except (RuntimeError, ValueError):  # then row by row: one row's numbers, never the batch's
            for i in penalised:
                try:
                    work[i] = apply_penalties(logits[i], params[i], *histories[i])
                except (RuntimeError, ValueError) as e:
                    raise_if_lost(e)
                    failed[i] = _why(e, params[i])
    peak, tokens = work.max(dim=-1)
    # The logits' own maximum: a row without penalties has it as its peak; only the penalised rows
    # are read again (the whole batch was, a (batch, vocab) pass of which most was the peak's).
    raw = peak.index_copy(0, at, chosen.amax(dim=-1).float()) if penalised else peak
    # -inf is a masked token (structured output), not a fault, unless every token is masked; max
    # carries a NaN through.
    unusable = torch.isnan(raw) | torch.isinf(raw)
    pushed = torch.isnan(peak) | (peak == float("inf"))  # by the penalties
    usable = torch.ones_like(unusable)
    drawn = [i for i, p in enumerate(params) if not is_greedy(p) and i not in failed]
    if drawn:
        rows = to_device(drawn, torch.int64, logits.device)
        probs = filtered_probs_rows(work.index_select(0, rows).float(), [params[i] for i in drawn])
        usable = usable.index_copy(0, rows, torch.isfinite(probs).all(dim=-1) & (probs.sum(dim=-1) > 0))
        race = probs.div_(_exponentials([generators[i] for i in drawn], probs.shape[-1], logits.device))
        tokens = tokens.index_copy(0, rows, race.argmax(dim=-1))
    masked = raw == float("-inf")
    flags = torch.stack((tokens, unusable.long(), pushed.long(), usable.long(), masked.long()))
    return Sampled(tokens, flags, params, failed, penalised)


def _why(e: object, p: SamplingParams) -> str:
    return (
        f"{e} (temperature={p.temperature}, top_p={p.top_p}, top_k={p.top_k}, "
        f"repetition_penalty={p.repetition_penalty})"
    )


def _exponentials(sources: list[RowRandom], vocab: int, device: torch.device) -> torch.Tensor:
    """(len(sources), vocab) draws of Exp(1), row i from ``sources[i]``: a key (``position_key``),
    a generator, or None (the engine's default generator on the device). Never 0: p / 0 would be
    NaN for p = 0 and win the argmax.

    On a GPU every row in one launch (``dlora_kernels/exponential_triton.py``: Philox keyed per row): a
    key is the row's own stream, a generator gives the row a key of one draw of its own, None rows
    draw theirs on the device. A generator and a launch per row cost ~30 µs of host time each.
    On a CPU torch's generators, one per row (a key seeds one): the Philox reference costs some
    120 elementwise passes there, torch's CPU generator one."""
    if device.type == "cuda":
        from dlora.kernels.exponential_triton import exponentials_triton

        return exponentials_triton(_keys(sources, device), vocab)
    q = torch.empty(len(sources), vocab, device=device)
    for i, s in enumerate(sources):
        g = torch.Generator().manual_seed(s) if isinstance(s, int) else s
        if g is not None and not _same_device(g.device, q.device):
            g = torch.Generator(q.device).manual_seed(int(torch.randint(_MASK, (1,), generator=g)))
        q[i].exponential_(generator=g)
    return q.clamp_min_(torch.finfo(q.dtype).tiny)


def _keys(sources: list[RowRandom], device: torch.device) -> torch.Tensor:
    """One int64 Philox key per row on ``device``, copied or drawn without waiting for the device:
    a key as it is (as a signed 64-bit word), a host generator's rows one draw of it each (one
    call per generator), None rows one draw on the device, a device generator's rows a draw there."""
    host = [_signed64(s) if isinstance(s, int) else 0 for s in sources]
    by_generator: dict[int, list[int]] = {}
    for i, s in enumerate(sources):
        if isinstance(s, torch.Generator) and s.device.type == "cpu":
            by_generator.setdefault(id(s), []).append(i)
    for rows in by_generator.values():
        g = cast(torch.Generator, sources[rows[0]])
        for i, key in zip(rows, torch.randint(_MASK, (len(rows),), generator=g).tolist()):
            host[i] = key
    keys = to_device(host, torch.int64, device)
    fresh = [i for i, s in enumerate(sources) if s is None]
    if fresh:
        keys.index_copy_(0, to_device(fresh, torch.int64, device), torch.randint(_MASK, (len(fresh),), device=device))
    for i, s in enumerate(sources):
        if isinstance(s, torch.Generator) and s.device.type != "cpu":
            keys[i] = torch.randint(_MASK, (1,), generator=s, device=s.device)[0].to(device)
    return keys


_MASK = (1 << 63) - 1


def _signed64(key: int) -> int:
    """A 64-bit key in [0, 2**64) as the int64 with the same bits."""
    return key - (1 << 64) if key >= 1 << 63 else key


def _same_device(a: torch.device, b: torch.device) -> bool:
    """``torch.Generator("cuda").device`` may carry no index where a tensor's says cuda:0."""
    return a.type == b.type and (a.index or 0) == (b.index or 0)


def position_key(seed: int, position: int) -> int:
    """The 64-bit key of a seeded request's draw at output ``position``: its generator's seed on a
    CPU (``position_generator``), its Philox key on a GPU. Keyed by position rather than carried
    along, so a request resumed elsewhere (moved, or after its worker died) draws what it would
    have drawn had it stayed: a token regenerated after a crash is the one the client already has.

    The pair is hashed (BLAKE2b, 64 bits): torch's CPU generator (mt19937) keeps only the low 32
    bits of what it is seeded with, so a seed mixed arithmetically made whole families of request
    seeds draw alike (s and s + 2**32; -1 and 2**63 - 1). Hashed, two pairs meet only by chance."""
    return int.from_bytes(hashlib.blake2b(b"%d:%d" % (seed, position), digest_size=8).digest(), "little")


def position_generator(seed: int, position: int) -> torch.Generator:
    """A CPU generator seeded with ``position_key(seed, position)``: what a CPU row draws from."""
    return torch.Generator().manual_seed(position_key(seed, position))


def filtered_probs(logits: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    """Probabilities (vocab,) after temperature, then min-p (a token less likely than ``min_p``
    times the most likely goes), then top-k, then top-p (nucleus): vLLM's order. The most likely
    token always keeps its place, so the result is a distribution for any accepted parameters.
    One row at a time: the reference ``filtered_probs_rows``, which ``sample`` uses, is tested
    against."""
    scaled = logits.float() / max(p.temperature, GREEDY_BELOW)
    if p.min_p > 0.0:
        scaled = scaled.masked_fill(scaled < scaled.max() + math.log(p.min_p), float("-inf"))
    if 0 < p.top_k < scaled.numel():
        kth = torch.topk(scaled, p.top_k).values[-1]
        scaled = scaled.masked_fill(scaled < kth, float("-inf"))
    if p.top_p < 1.0:
        sorted_logits, order = scaled.sort(descending=True, stable=True)  # ties in index order, as the rows' version
        cum = sorted_logits.softmax(-1).cumsum(-1)
        # Drop a token when the tokens before it already reach top_p; the first always stays.
        drop_sorted = (cum - sorted_logits.softmax(-1)) >= p.top_p
        drop_sorted[0] = False
        drop = torch.zeros_like(drop_sorted).scatter(0, order, drop_sorted)
        scaled = scaled.masked_fill(drop, float("-inf"))
    return scaled.softmax(-1)


def filtered_probs_rows(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """``filtered_probs`` of every row of ``logits`` (n, vocab) under its own parameters. The rows
    that filter share one sort (the k-th largest value and the nucleus read off the same
    descending order); the others are a softmax (a sort of 64 x 32,000 takes 0.1 s on 2 cores)."""
    vocab, dev = logits.shape[-1], logits.device
    temperature = to_device([max(p.temperature, GREEDY_BELOW) for p in params], torch.float32, dev)
    scaled = logits.float() / temperature[:, None]
    if any(p.min_p > 0.0 for p in params):  # log(min_p) below the row's top logit; min_p 0: -inf, no-op
        floor = to_device([math.log(p.min_p) if p.min_p > 0 else -math.inf for p in params], torch.float32, dev)
        scaled = scaled.masked_fill(scaled < scaled.amax(-1, keepdim=True) + floor[:, None], float("-inf"))
    ks = [p.top_k if 0 < p.top_k < vocab else vocab for p in params]
    rows = [i for i, (k, p) in enumerate(zip(ks, params)) if k < vocab or p.top_p < 1.0]
    if not rows:
        return scaled.softmax(-1)
    at = to_device(rows, torch.int64, dev)
    ordered, order = scaled.index_select(0, at).sort(dim=-1, descending=True, stable=True)
    kth = ordered.gather(1, to_device([ks[i] - 1 for i in rows], torch.int64, dev)[:, None])
    ordered = ordered.masked_fill(ordered < kth, float("-inf"))
    top_p = to_device([params[i].top_p if params[i].top_p < 1.0 else float("inf") for i in rows], torch.float32, dev)
    kept = ordered.softmax(-1)
    # Drop a token when the tokens before it already reach top_p; the first always stays.
    drop = (kept.cumsum(-1) - kept) >= top_p[:, None]
    drop[:, 0] = False
    filtered = torch.empty_like(ordered).scatter_(1, order, ordered.masked_fill(drop, float("-inf")).softmax(-1))
    return scaled.softmax(-1).index_copy_(0, at, filtered)


def constrain(logits: torch.Tensor, matchers: list[Any], grammars: Grammars | None) -> tuple[torch.Tensor, set[int]]:
    """``logits`` (B, vocab) with the tokens each row's structured-output matcher (llguidance; None:
    unconstrained) forbids set to -inf, and the rows whose matcher failed (masked whole, so that
    row alone fails to sample; the caller says why). ``grammars``: the matchers' maker (None only
    when no row has one). The rows' bitmasks (a bit per token, ``Grammars.bitmasks``) reach the
    device in one asynchronous copy and are unpacked there: a GPU step moves vocab / 8 bytes a
    row, the host builds no per-token mask, and the logits are written once."""
    rows = [i for i, m in enumerate(matchers) if m is not None]
    if not rows:
        return logits, set()
    assert grammars is not None
    words, failed = grammars.bitmasks([matchers[i] for i in rows])
    vocab, device = logits.shape[-1], logits.device
    # A word's bytes in memory order, least significant first (x86, ARM and every GPU): bit j of
    # byte k is token 32 w + 8 k + j. Inverted first, so the bits unpacked are the forbidden ones.
    packed = np.invert(words).view(np.uint8)
    if device.type == "cpu":  # numpy's one pass; torch's shifts cost twice the old host mask here
        forbidden = torch.from_numpy(np.unpackbits(packed, axis=1, bitorder="little").view(np.bool_))[:, :vocab]
    else:
        forbidden = unpack_bits(to_device(packed, torch.uint8, device))[:, :vocab]
    if forbidden.shape[-1] < vocab:  # ids past the tokenizer's: never allowed
        forbidden = torch.nn.functional.pad(forbidden, (0, vocab - forbidden.shape[-1]), value=True)
    if len(rows) < len(matchers):
        at = to_device(rows, torch.int64, device)
        forbidden = torch.zeros(logits.shape, dtype=torch.bool, device=device).index_copy_(0, at, forbidden)
    return logits.masked_fill(forbidden, float("-inf")), {rows[j] for j in failed}


def unpack_bits(packed: torch.Tensor) -> torch.Tensor:
    """``np.unpackbits(packed, axis=1, bitorder="little")`` on ``packed``'s device, as bools:
    (rows, bytes) uint8 -> (rows, 8 bytes)."""
    bits = (packed.unsqueeze(-1) >> torch.arange(8, dtype=torch.uint8, device=packed.device)) & 1
    return bits.view(packed.shape[0], -1).view(torch.bool)


def bias(
    logits: torch.Tensor,
    params: list[SamplingParams],
    num_outputs: list[int],
    eos_ids: set[int],
    banned: list[list[int]] | None = None,
    allowed: list[torch.Tensor | None] | None = None,
) -> torch.Tensor:
    """``logits`` (B, vocab) with each row's ``logit_bias`` added; while the row has generated fewer
    than its ``min_tokens`` (``num_outputs``), its stop tokens and every EOS id (with
    ``ignore_eos`` too, as vLLM's all_stop_token_ids) set to -inf, and so are the row's
    ``banned`` tokens (its bad words', ``bad_words.banned_now``) and, where the row has an
    ``allowed`` mask ((vocab,) bool, ``allowed_mask``: its ``allowed_token_ids``), every token
    outside it: vLLM's allowed-token, bad-words, logit-bias and min-tokens processors, before the
    penalties as there. The same tensor when no row asks for any, else a sparse add and a mask on
    the rows that restrict. Token ids past the logits' width are skipped (the engine refuses them)."""
    vocab = logits.shape[-1]
    banned = banned or [[]] * len(params)
    at: list[int] = []
    values: list[float] = []
    for i, (p, n, ban) in enumerate(zip(params, num_outputs, banned)):
        if not p.logit_bias and n >= p.min_tokens and not ban:  # most rows, every step: nothing to build
            continue
        changes = list(p.logit_bias.items()) + [(t, float("-inf")) for t in ban]
        if n < p.min_tokens:
            changes += [(t, float("-inf")) for t in set(p.stop_token_ids) | eos_ids]  # EOS even with ignore_eos
        for token, value in changes:
            if token < vocab:
                at.append(i * vocab + token)
                values.append(value)
    restricted = [i for i, a in enumerate(allowed or []) if a is not None]
    if not at and not restricted:
        return logits
    out = logits.clone(memory_format=torch.contiguous_format)  # viewed flat below
    device = logits.device
    if at:
        index = to_device(at, torch.int64, device)
        out.view(-1).index_put_((index,), to_device(values, logits.dtype, device), accumulate=True)
    if restricted:
        assert allowed is not None
        keep = torch.stack([cast(torch.Tensor, allowed[i]) for i in restricted])  # built once per request
        rows = to_device(restricted, torch.int64, device)
        out.index_copy_(0, rows, out.index_select(0, rows).masked_fill_(~keep, float("-inf")))
    return out


def allowed_mask(token_ids: list[int], vocab: int, device: torch.device) -> torch.Tensor:
    """(vocab,) bool: ``token_ids`` (each in [0, vocab)) allowed; made once when a request is added
    (rebuilt from up to 2^18 ids at every step, one request cost its whole batch 120 ms a step)."""
    mask = torch.zeros(vocab, dtype=torch.bool)
    mask[torch.tensor(sorted(set(token_ids)), dtype=torch.int64)] = True
    return mask.to(device)


def sample_sequences(
    logits: torch.Tensor,
    seqs: list[Sequence],
    rng: torch.Generator | None,
    eos_ids: set[int],
    grammars: Grammars | None = None,
) -> Sampled:
    """``launch_sample`` for the sequences whose logits (B, vocab) these are: each row biased and
    restricted (``logit_bias``, ``min_tokens``, ``bad_words``, ``allowed_token_ids``), constrained
    by its structured-output matcher (made by ``grammars``), penalised by its history, and drawn
    from its seed's generator at its position (``rng`` without a seed)."""
    generators: list[RowRandom] = [
        position_key(s.params.seed, len(s.output_ids)) if s.params.seed is not None else rng for s in seqs
    ]
    params, histories = [s.params for s in seqs], [(s.prompt_ids, s.output_ids) for s in seqs]
    banned = [banned_now(s.bad_words_ids, s.output_ids) if s.bad_words_ids else [] for s in seqs]
    allowed = [s.allowed_mask for s in seqs]
    biased = bias(logits, params, [len(out) for _, out in histories], eos_ids, banned, allowed)
    constrained, broken = constrain(biased, [s.grammar for s in seqs], grammars)
    sampled = launch_sample(constrained, params, generators, histories)
    sampled.broken = broken
    return sampled
