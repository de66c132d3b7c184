"""A request into the engine (``LLMEngine.add_request``, which is ``add_request`` here, bound):
refused at the door (``admission``), its sequence built with a resume's output and text so far,
its grammar started where it goes on, or ended at once where its resume already ended it."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from dlora.common.messages import SamplingParams
from dlora.services.worker.engine.admission import check_request, check_tokens, up_to_context
from dlora.services.worker.engine.bad_words import bad_words_token_ids
from dlora.services.worker.engine.detokenizer import IncrementalDetokenizer, sent_tail
from dlora.services.worker.engine.grammar_start import started_matcher
from dlora.services.worker.engine.kv_transfer import KVSnapshot, import_kv
from dlora.services.worker.engine.outputs import RequestError, ended_on_resume
from dlora.services.worker.engine.sampler import allowed_mask
from dlora.services.worker.engine.sequence import Sequence, fcfs_arrival
from dlora.services.worker.engine.stopping import grammar_needed
from dlora.services.worker.engine.structured import GrammarError, GrammarUnavailable

if TYPE_CHECKING:
    from dlora.services.worker.engine.engine import LLMEngine


def add_request(
    engine: LLMEngine,
    request_id: str,
    prompt: str | None = None,
    prompt_token_ids: list[int] | None = None,
    params: SamplingParams | None = None,
    adapter: str | None = None,
    resume_token_ids: list[int] | None = None,
    kv: KVSnapshot | None = None,
    resume_text_pending: int = 0,
    resume_text_held: str = "",
    priority: int = 0,
    arrival_time: float | None = None,
    cache_salt: str = "",
    bad_words_ids: list[list[int]] | None = None,
    whole: bool = False,
    prompt_field: str | None = None,
    decoded: bool = False,
    grammar_unavailable: str | None = None,
) -> None:
    """Queue a request. ``resume_token_ids``: outputs already produced (by a preempted, migrated or lost run);
    generation continues after them and they are not reported again (``resume_text_held``, their text not sent
    yet, and that of the last ``resume_text_pending`` come first, a stop string looked for across them); ending in
    a stop token or EOS, a complete structured document, or at max_tokens or the context, it ends so at the next
    step (``ended_on_resume``).
    ``kv``: the moved request's cache from another engine (``export_kv``), not recomputed. ``priority``: lower first
    (``fcfs_arrival``; one without output by ``arrival_time`` too: Unix seconds it entered the system, None:
    now). Its prompt tokens count once its first token is made here, unless it made some before (vLLM's
    prompt_tokens at prefill). ``cache_salt``: its prefix-cache blocks are shared only with requests of
    the same salt (``Sequence.salted``). ``bad_words_ids``: the token sequences of ``params.bad_words``
    (``bad_words_token_ids``), tokenized already (the worker does it on arrival, off its loop); None: tokenized
    here. ``whole``: refuse a request whose prompt and max_tokens overrun the context (``check_tokens``) rather
    than end it "length" there. ``prompt_field``: the field its sender gave the prompt in, where the caller
    tokenized a text prompt itself (the worker, on arrival): errors name it (None: the one here). ``decoded``:
    ``params`` came off the wire (the worker's), their types checked by its decoder, not again here.
    ``grammar_unavailable``: why its grammar could not be had when the caller compiled it ahead
    (``Grammars.prepare``, off the loop): raised as ``GrammarUnavailable``, not compiled again here.

    Raises:
        RequestError: the request cannot be served as asked (``OverContext``: past this engine's
            context), its grammar included (a 400).
        GrammarUnavailable: its grammar cannot be compiled here now (a 503: the worker's state).
    """
    params = params or SamplingParams()
    if request_id in engine.seqs:
        raise RequestError(f"request id {request_id!r} is already in flight")
    if adapter is not None and adapter not in engine.adapters and adapter not in engine.loading:
        raise RequestError(f"adapter {adapter!r} is not registered")
    ids = list(engine.tokenizer.encode(prompt)) if prompt is not None else list(prompt_token_ids or [])
    params = up_to_context(params, len(ids), engine.max_model_len)  # vLLM's max_tokens=None
    check_request(params, prompt, prompt_token_ids, cache_salt, typed=decoded)
    resumed = list(resume_token_ids or [])
    pending, held = resume_text_pending, resume_text_held
    field = prompt_field or ("prompt" if prompt is not None else "prompt_token_ids")
    check_tokens(ids, resumed, engine.model_config.vocab_size, engine.max_model_len, params, pending, field, whole)
    tail = sent_tail(engine.tokenizer, ids, resumed, params, pending, held)  # sent already: looked in, not again
    seq = Sequence(
        request_id=request_id,
        adapter=adapter,
        prompt_ids=ids,
        params=params,
        arrival=fcfs_arrival(engine._arrivals, bool(resumed), engine.seqs.values(), priority, arrival_time),
        arrival_time=time.time() if arrival_time is None else arrival_time,
        detok=IncrementalDetokenizer(engine.tokenizer, ids + resumed, params.skip_special_tokens, pending),
        output_ids=resumed,
        text=tail + held,
        emitted=len(tail),
        cache_salt=cache_salt,
    )
    # A resume its last token ends (``ends_by_token``: the worker compiles nothing for it either) is ended
    # before the work only one that goes on needs (a grammar that cannot compile now: a 503); another first
    # gets its grammar: a complete document ends it "stop", at max_tokens too, as ``advance`` ends one. At its
    # length with none to be had here now, it ends "length" as before: not an error in place of its output
    refused: Exception | None = None
    if grammar_needed(resumed, params, engine.eos_ids):
        if grammar_unavailable is not None:  # (compiled here again, it held the caller's loop as long)
            refused = GrammarUnavailable(grammar_unavailable)
        else:
            try:
                seq.matcher, seq.grammar_from = started_matcher(engine.grammars, params, resumed)
            except GrammarUnavailable as e:
                refused = e  # (the worker's state, not the request's fault: answered unavailable)
            except GrammarError as e:
                refused = RequestError(str(e), param=params.structured_outputs()[0])
    if (ended := ended_on_resume(seq, engine.eos_ids, engine.max_model_len, engine.primary_eos)) is not None:
        engine._taken.append(ended)  # the next step returns it; nothing is made for it, nor held
        return
    if refused is not None:
        raise refused
    if params.bad_words:
        seq.bad_words_ids = (
            bad_words_token_ids(engine.tokenizer, params.bad_words) if bad_words_ids is None else bad_words_ids
        )
    if params.allowed_token_ids:
        seq.allowed_mask = allowed_mask(params.allowed_token_ids, engine.model_config.vocab_size, engine.device)
    if kv is not None:
        import_kv(seq, kv, engine.blocks, engine.model.kv)
    engine._arrivals += 1
    engine.seqs[request_id] = seq
    seq.uncounted_prompt = 0 if resumed else len(ids)
