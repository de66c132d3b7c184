"""What the engine gives back: each request's output of a step, the error that refuses a request,
and a token's log-probabilities."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dlora.common.messages import ErrorCode, FinishReason, SamplingParams, TokenLogprob
from dlora.kernels.host import HostCopy, to_device
from dlora.services.worker.engine.faults import raise_if_lost
from dlora.services.worker.engine.grammar_start import completes
from dlora.services.worker.engine.sequence import RESERVED, Sequence, Status
from dlora.services.worker.engine.stopping import Stop, check_stop, stop_string_in, visible_end


class RequestError(ValueError):
    """The request cannot be served as given; the message says why (a 4xx for the caller), and
    ``param`` the SamplingParams field at fault where it is one."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


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
    # Whose fault, with an error: BAD_REQUEST where the request's own, else the server's. None
    # without one (it claimed INTERNAL on every output that had not failed); an error without a
    # code is the server's (``chunks.chunk_for``), as TokenChunk's None reads with its error.
    error_code: ErrorCode | None = None
    error_param: str | None = None  # with BAD_REQUEST: the SamplingParams field at fault, if one
    logprobs: list[TokenLogprob] | None = None  # per new token, when the request asked for them
    stop_reason: str | int | None = None  # the stop string or stop token id that ended it (vLLM's)
    prompt_logprobs: list[TokenLogprob] | None = None  # with the first output token, when asked
    num_cached_tokens: int = 0  # prompt tokens its prefill found in the prefix cache (vLLM's)
    # With a request's first output token: seconds since its first step was scheduled (its prefill
    # and first decode); what came before was its wait (the worker's queue time).
    scheduled_s: float | None = None


def failed_output(seq: Sequence, reason: str, code: ErrorCode, param: str | None = None) -> RequestOutput:
    """The last output of a request that failed: no tokens, the reason, whose fault (``code``) and
    the field at fault (``param``, a request's)."""
    return RequestOutput(
        request_id=seq.request_id,
        new_token_ids=[],
        new_text="",
        finished=True,
        finish_reason=FinishReason.ERROR,
        num_prompt_tokens=len(seq.prompt_ids),
        num_output_tokens=len(seq.output_ids),
        error=reason,
        error_code=code,
        error_param=param,
    )


def ended_on_resume(
    seq: Sequence, eos_ids: set[int], max_model_len: int, primary_eos: int | None
) -> RequestOutput | None:
    """The last output of a request resumed with output that already ends it (``check_stop``'s
    rules, ``min_tokens`` and ``ignore_eos`` included): its last token a stop token or EOS ends it
    "stop", that token its ``stop_reason`` (none for the tokenizer's EOS); so does its structured
    document complete (its matcher, taken the output, stopped); as many tokens as ``max_tokens`` or
    a full context end it "length". No token more, and the text it held with what its last tokens
    left unfinished (those before a stop token that ends it: ``advance``'s end); None where it goes
    on. A record written with a request's final token but not its end is resumed so
    (sgl-project/sglang #12151: a decode side went on after the prefill's EOS); one past its bounds
    was refused before (``check_tokens``)."""
    if not seq.output_ids:
        return None
    n, text = len(seq.output_ids), seq.text
    stop = check_stop(
        text,
        len(text),
        seq.output_ids[-1],
        seq.params,
        eos_ids,
        n,
        seq.total_len,
        max_model_len,
        document_complete=seq.grammar is not None and seq.grammar.is_stopped(),
        primary_eos=primary_eos,
    )
    if stop.reason is None:  # (no new text: no stop string can end in it)
        return None
    # as ``advance`` ends: the unfinished text comes out, of the tokens before a stop token that is cut
    stop = _ended(stop, seq.detok.held(leave=1) if stop.dropped else seq.detok.flush(), seq.params, n)
    seq.status, seq.finish_reason = Status.FINISHED, stop.reason
    return RequestOutput(
        request_id=seq.request_id,
        new_token_ids=[],
        new_text=stop.text[seq.emitted :],
        finished=True,
        finish_reason=stop.reason,
        num_prompt_tokens=len(seq.prompt_ids),
        num_output_tokens=n,
        stop_reason=stop.matched,
    )


def _ended(stop: Stop, tail: str, params: SamplingParams, num_output: int) -> Stop:
    """A request's end with ``tail``, what its last tokens left unfinished (a character split
    across them), after its text: that may complete a stop string, which then ends it there."""
    text = stop.text + tail
    return stop_string_in(text, len(stop.text), params, num_output) or stop._replace(text=text)


def token_logprobs(
    logits: torch.Tensor, wanted: dict[int, tuple[int, int]], launched: LaunchedLogprobs | None = None
) -> dict[int, TokenLogprob | Exception]:
    """For each row i of ``logits`` (B, vocab) in ``wanted`` (i -> (chosen token, top)): the chosen
    token's log-probability under the model's distribution and the ``top`` most likely tokens'.
    The rows at once and brought to the host in one transfer (on a GPU one wait, not a few per
    row); ``topk`` once per distinct ``top``, so which of tied tokens a row lists does not depend
    on what else asked beside it. If the rows fail together, each is tried alone, and one that
    fails has its exception in its place (its request fails alone, as the sampler's rows do).
    ``launched``: the same computed when the tokens were drawn (``launch_logprobs``; rows not
    wanted now are left out), unless it fails."""
    if not wanted:
        return {}
    try:
        if launched is not None:
            return {i: lp for i, lp in launched.result().items() if i in wanted}
    except Exception as e:  # noqa: BLE001 - computed again below, row by row if need be
        raise_if_lost(e)
    try:
        return dict(_logprobs(logits, wanted))
    except Exception:  # noqa: BLE001 - one row's fault must not fail the others
        out: dict[int, TokenLogprob | Exception] = {}
        for i, asked in wanted.items():
            try:
                out[i] = _logprobs(logits, {i: asked})[i]
            except Exception as e:  # noqa: BLE001
                out[i] = e
        return out


def _logprobs(logits: torch.Tensor, wanted: dict[int, tuple[int, int]]) -> dict[int, TokenLogprob]:
    if not wanted:
        return {}
    chosen = to_device([token for token, _ in wanted.values()], torch.int64, logits.device)
    return launch_logprobs(logits, chosen, {i: top for i, (_, top) in wanted.items()}).result()


class LaunchedLogprobs:
    """``token_logprobs``' values, computed on the logits' device and on their way to the host
    (``HostCopy``): async scheduling queues them with the step's sampling, so taking them in
    waits for that step only (``token_logprobs`` then would wait for the step launched since)."""

    def __init__(self, rows: list[int], tops: dict[int, int], sizes: list[int], values: torch.Tensor) -> None:
        self._rows, self._tops, self._sizes, self._values = rows, tops, sizes, HostCopy(values)

    def result(self) -> dict[int, TokenLogprob]:
        host = self._values.wait().tolist()
        out = {}
        for j, i in enumerate(self._rows):
            top = self._tops[i]
            alternatives: list[tuple[int, float]] = []
            if top:
                at = 2 + sum(2 * t for t in self._sizes[: self._sizes.index(top)])
                values, ids = host[j][at : at + top], host[j][at + top : at + 2 * top]
                alternatives = [(int(t), v) for t, v in zip(ids, values)]
            out[i] = TokenLogprob(int(host[j][0]), host[j][1], alternatives)
        return out


def launch_logprobs(logits: torch.Tensor, chosen: torch.Tensor, tops: dict[int, int]) -> LaunchedLogprobs:
    """For each row i of ``logits`` (B, vocab) in ``tops`` (i -> how many alternatives), in that
    order, with ``chosen`` (len(tops),) int64 on the logits' device the tokens taken: what
    ``token_logprobs`` gives, queued on the device. Token ids travel as floats (exact below 2^24)."""
    rows = list(tops)
    lp = torch.log_softmax(logits.index_select(0, to_device(rows, torch.int64, logits.device)).float(), dim=-1)
    parts = [chosen.to(lp.dtype).unsqueeze(1), lp.gather(1, chosen.unsqueeze(1))]
    sizes = sorted(set(tops.values()) - {0})
    for top in sizes:  # topk once per distinct size: which of tied tokens a row lists is its own
        best = torch.topk(lp, top)
        parts += [best.values, best.indices.to(lp.dtype)]
    return LaunchedLogprobs(rows, tops, sizes, torch.cat(parts, dim=1))


def reserve(seq: Sequence) -> None:
    """Take the place of the token ``seq`` is sampling now, before its value reaches the host
    (async scheduling): its length, cache count and status are what ``advance`` will leave, so
    the next step can be scheduled meanwhile; ``advance(..., reserved=True)`` writes the value."""
    seq.num_cached = seq.total_len
    seq.status = Status.RUNNING
    seq.output_ids.append(RESERVED)


def advance(
    seq: Sequence,
    token: int,
    eos_ids: set[int],
    max_model_len: int,
    primary_eos: int | None = None,
    reserved: bool = False,
) -> RequestOutput:
    """Record the sampled token on ``seq``, update its text and stop conditions, and report the
    delta; a finished output's sequence is for the caller to free. ``reserved``: the step that
    sampled it already took its place (``reserve``: async scheduling), so only its value is new."""
    if reserved:
        seq.output_ids[-1] = token
    else:
        seq.num_cached = seq.total_len
        seq.status = Status.RUNNING
        seq.output_ids.append(token)
    if seq.grammar_from is None and completes(seq.output_ids, seq.params.structured_after_token_ids):
        seq.grammar_from = len(seq.output_ids)  # the grammar binds the next token on
    first = len(seq.output_ids) == 1
    old_len = len(seq.text)
    # What the tokens held back before this one spell: the text, if this token ends it unshown
    ending = seq.detok.pending and (token in eos_ids or token in seq.params.stop_token_ids)
    held = seq.detok.held() if ending else ""
    stop = check_stop(
        seq.text + seq.detok.push([token]),
        old_len,
        token,
        seq.params,
        eos_ids,
        len(seq.output_ids),
        seq.total_len,
        max_model_len,
        document_complete=seq.grammar is not None and seq.grammar.is_stopped(),
        primary_eos=primary_eos,
    )
    if stop.reason is not None and not isinstance(stop.matched, str):  # text after a stop string is cut anyway
        stop = _ended(stop, held if stop.dropped else seq.detok.flush(), seq.params, len(seq.output_ids))
    seq.text, reason = stop.text, stop.reason
    entries = None
    if first and seq.params.prompt_logprobs is not None:  # sent now; not read again
        entries, seq.prompt_logprobs = seq.prompt_logprobs, []
    visible = visible_end(seq.text, seq.emitted, seq.params, finished=reason is not None)
    new_text = seq.text[seq.emitted : visible]
    seq.emitted = visible
    return RequestOutput(
        request_id=seq.request_id,
        new_token_ids=[token],
        new_text=new_text,
        finished=reason is not None,
        finish_reason=reason,
        num_prompt_tokens=len(seq.prompt_ids),
        num_output_tokens=len(seq.output_ids),
        num_cached_tokens=seq.num_cached_prompt,
        stop_reason=stop.matched,
        # the first output token ever (not a resumed request's): its prompt's entries go with it
        prompt_logprobs=entries,
    )
