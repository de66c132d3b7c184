"""A step's sampled tokens taken into their requests: text, stop conditions, logprobs, and a
request whose token cannot be taken failed alone (the synchronous step's and async scheduling's);
before them, the KV the step wrote taken into the block manager (``written``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from dlora.common.messages import ErrorCode
from dlora.kernels.host import HostCopy
from dlora.services.worker.engine.faults import describe, raise_if_lost
from dlora.services.worker.engine.inputs import rows_of
from dlora.services.worker.engine.outputs import LaunchedLogprobs, RequestOutput, token_logprobs
from dlora.services.worker.engine.sampler import NotFinite, NothingAllowed, SamplingError
from dlora.services.worker.engine.sequence import Sequence
from dlora.services.worker.engine.structured import label, refusal

if TYPE_CHECKING:
    from dlora.services.worker.engine.engine import LLMEngine


def take(
    engine: LLMEngine,
    ran: list[Sequence],
    logits: torch.Tensor | None,
    tokens: list[int | SamplingError],
    reserved: bool = False,
    launched: LaunchedLogprobs | None = None,
) -> list[RequestOutput]:
    """Each sampled token taken into its request: text, stop conditions, logprobs (``launched``:
    computed with the draw). A request whose token cannot be taken fails alone. ``reserved``: the
    tokens' places were reserved when drawn (async scheduling); one ended or dropped since is
    passed over."""
    outputs, now = [], engine.clock()
    gone = {i for i, s in enumerate(ran) if not engine.holds(s)} if reserved else set()
    wanted = {
        i: (tok, seq.params.logprobs)
        for i, (seq, tok) in enumerate(zip(ran, tokens))
        if seq.params.logprobs is not None and isinstance(tok, int) and i not in gone
    }
    logprobs = token_logprobs(logits, wanted, launched) if logits is not None else {}
    for i, (seq, tok) in enumerate(zip(ran, tokens)):
        if i in gone:
            if isinstance(tok, NotFinite):  # aborted since: its blocks were cached all the same
                engine.blocks.forget(seq.request_id)
            continue
        if isinstance(tok, NotFinite):
            outputs.append(not_finite(engine, seq, tok))
            continue
        if isinstance(tok, SamplingError):
            code = ErrorCode.BAD_REQUEST if isinstance(tok, NothingAllowed) else ErrorCode.INTERNAL
            outputs.append(engine._fail(seq, f"sampling failed: {tok}", code))
            continue
        try:
            if seq.grammar is not None and (why := refusal(seq.grammar, tok, label(seq.params))) is not None:
                field = seq.params.structured_outputs()[0]  # the constraint's fault
                outputs.append(engine._fail(seq, why, ErrorCode.BAD_REQUEST, param=field))
                continue
            out = engine._advance(seq, tok, reserved)
            if isinstance(lp := logprobs.get(i), Exception):
                raise lp
            out.logprobs = [lp] if lp is not None else None
            if out.num_output_tokens == 1 and seq.scheduled_at is not None:
                out.scheduled_s = now - seq.scheduled_at
            outputs.append(out)
        except Exception as e:  # noqa: BLE001 - one request's fault must not end the step for the rest
            raise_if_lost(e)
            outputs.append(engine._fail(seq, f"could not take the sampled token: {describe(e)}"))
    return outputs


def not_finite(engine: LLMEngine, seq: Sequence, why: NotFinite) -> RequestOutput:
    """Fail ``seq``, whose logits were not finite, its blocks out of the prefix cache first: its
    KV may be NaN, and a retry (a 500 invites one) would reuse it and fail for good. A 500, as
    vLLM's NaN faults are (the request is well formed; the weights or a kernel are at fault), whose
    reason names what computed it and in which precision: an adapter's weights that overflow
    float16 fail this way on every prompt, and the operator must be told which one."""
    engine.blocks.forget(seq.request_id)
    # The worker's key is name@version (common/versions.py): the client named the adapter alone.
    name, _, version = (seq.adapter or "").partition("@")
    weights = f"adapter {name!r}" + (f" (version {version})" if version else "") if name else "the base model"
    dtype = str(engine.dtype).removeprefix("torch.")
    return engine._fail(seq, f"sampling failed: {why} (computed by {weights} in {dtype} on this worker)")


def written(
    engine: LLMEngine, ran: list[Sequence], logits: torch.Tensor | None
) -> tuple[list[Sequence], torch.Tensor | None]:
    """Take in the KV the step wrote (the prefix cache names the blocks it filled); keep what
    goes on to sample, with its logits: a prefill chunk short of the prompt's end does not."""
    done, chunks, keys = [], [], {}
    for i, s in enumerate(ran):
        start, end = s.num_cached, s.num_cached + s.num_scheduled
        if engine.blocks.enable_prefix_caching:
            if s.lookup is not None:  # counted once the step it was made for is kept
                engine.stats.record_prefix_cache(*s.take_lookup())
            if s.adapter not in keys:
                keys[s.adapter] = engine._cache_key(s.adapter)
            ids = s.all_ids() if engine.blocks.fills_block(start, end) else []  # a decode mostly fills none
            engine.blocks.computed(s.request_id, ids, start, end, s.salted(keys[s.adapter]))
        if end < s.total_len:
            s.num_cached = end
            chunks.append(i)
        else:
            done.append(i)
    if not chunks:
        return ran, logits
    engine._chunks = check_chunks([ran[i] for i in chunks], rows_of(logits, chunks))
    return [ran[i] for i in done], rows_of(logits, done)


@dataclass(frozen=True)
class Chunks:
    """A step's prefill chunks short of their prompt's end: no token is drawn from their logits,
    but NaN there means NaN K/V in the blocks the chunk filled, cached already; ``bad`` (n,) bool
    on its way to the host, read when the step is taken in (``fail_chunks``)."""

    seqs: list[Sequence]
    bad: HostCopy


def check_chunks(seqs: list[Sequence], logits: torch.Tensor | None) -> Chunks | None:
    """Queue the check of ``seqs``' chunk logits (rows of ``logits``); None: nothing to check."""
    if not seqs or logits is None:
        return None
    return Chunks(seqs, HostCopy(~torch.isfinite(logits).all(dim=-1)))


def fail_chunks(engine: LLMEngine) -> list[RequestOutput]:
    """Fail each request of the engine's last checked chunks whose logits were not finite, before
    another prompt reuses the blocks it cached (vLLM aborts on NaN in intermediate chunks alike,
    vllm-project/vllm#50283); one ended or dropped since only has its blocks taken out."""
    chunks, engine._chunks = engine._chunks, None
    if chunks is None:
        return []
    why = NotFinite("the model's logits for this request's prompt are not finite (NaN or infinity)")
    failed = []
    for s, bad in zip(chunks.seqs, chunks.bad.wait().tolist()):
        if bad and engine.holds(s):
            failed.append(not_finite(engine, s, why))
        elif bad:
            engine.blocks.forget(s.request_id)
    return failed
