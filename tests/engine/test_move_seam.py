"""A request with stop strings moved at any step: its text (held back while it could begin a stop
string) goes with it, so the client's text has nothing missing and a stop string across the seam
still stops it (found by a probe: ~19 characters lost per move, and 2 of 20 seams missed the stop)."""

from __future__ import annotations

import pytest
import torch

from dlora.common.messages import FinishReason, SamplingParams
from dlora.model.make_tiny import TinyOutput
from dlora.services.worker.engine import LLMEngine
from tests.engine.helpers import make_engine

PROMPT = [9, 10, 11, 12, 13, 14, 15, 16]


def run(engine: LLMEngine, steps: int | None = None) -> tuple[str, list[int], FinishReason | None]:
    text, ids, reason, n = "", [], None, 0
    while engine.has_unfinished() and (steps is None or n < steps):
        for o in engine.step():
            text, ids = text + o.new_text, ids + o.new_token_ids
            reason = o.finish_reason if o.finished else reason
        n += 1
    return text, ids, reason


@pytest.mark.parametrize("keep", [False, True])
def test_a_move_at_any_step_keeps_the_text_and_the_stop(tiny_llama: TinyOutput, keep: bool) -> None:
    """With include_stop_str_in_output (``keep``) nothing is held back for a stop string, so its
    beginning was sent before the move, and the destination must still look in it (a helper's
    probe: moved after 4-7 tokens the request ran on to its length; so did a recovered one)."""
    whole = make_engine(tiny_llama)
    whole.add_request("r", prompt_token_ids=PROMPT, params=SamplingParams(max_tokens=30, ignore_eos=True))
    text, _, _ = run(whole)
    stop = text[12:22]  # ten characters the output holds: the request stops there
    params = SamplingParams(max_tokens=30, ignore_eos=True, stop=[stop], include_stop_str_in_output=keep)
    whole.add_request("s", prompt_token_ids=PROMPT, params=params)
    expected = run(whole)
    assert expected[2] is FinishReason.STOP and expected[0] == text[: 22 if keep else 12]
    for k in range(1, len(expected[1])):
        source, destination = make_engine(tiny_llama), make_engine(tiny_llama)
        source.add_request("s", prompt_token_ids=PROMPT, params=params)
        before, ids, _ = run(source, k)
        seq = source.seqs["s"]  # what moves.handoff takes
        destination.add_request(
            "s",
            prompt_token_ids=PROMPT,
            params=params,
            resume_token_ids=ids,
            resume_text_pending=seq.detok.pending,
            resume_text_held=seq.text[seq.emitted :],
        )
        after, more, reason = run(destination)
        assert (before + after, ids + more, reason) == expected, k


def test_a_prompt_counts_once_where_its_first_token_is_made(tiny_llama: TinyOutput) -> None:
    """Prompt tokens (vLLM's prompt_tokens_total) count at prefill, as vLLM counts them: they counted
    on admission, so a request aborted while it waited (a client gone, a timeout) counted a prompt
    never computed, and a long queue counted before it ran. One moved, recovered or handed over
    before its first token counts where that token is made; one that made tokens before, nowhere."""
    source, destination = make_engine(tiny_llama), make_engine(tiny_llama)
    params = SamplingParams(max_tokens=4, ignore_eos=True)
    source.add_request("r", prompt_token_ids=PROMPT, params=params)
    source.add_request("gone", prompt_token_ids=PROMPT[:5], params=params)
    assert source.stats.prompt_tokens == 0  # waiting: nothing computed yet
    source.abort("gone")
    source.abort("r")  # moved away before it ran
    destination.add_request("r", prompt_token_ids=PROMPT, params=params)
    destination.add_request("new", prompt_token_ids=PROMPT[:3], params=params)
    destination.add_request("resumed", prompt_token_ids=PROMPT[:2], params=params, resume_token_ids=[7])
    assert run(destination)[2] is FinishReason.LENGTH  # and it runs as any other
    assert (source.stats.prompt_tokens, destination.stats.prompt_tokens) == (0, len(PROMPT) + 3)


def test_a_cache_moved_to_a_narrower_dtype_that_overflows_it_is_refused_not_imported(tiny_llama: TinyOutput) -> None:
    """Workers of one cluster may serve in different precisions, and a move plan ships the cache
    whatever they are: an fp32 worker's K/V past float16's 65,504 became infinity in an fp16
    worker's cache, and the request's next token came from NaN attention. The import refuses a
    cache that is not finite in this worker's dtype, before taking any block (the worker then
    recomputes it, its own precision's K/V); one that fits is taken, converted."""
    from dlora.services.worker.engine import RequestError
    from dlora.services.worker.engine.kv_transfer import KVSnapshot

    source, params = make_engine(tiny_llama), SamplingParams(max_tokens=8)
    source.add_request("r", prompt_token_ids=PROMPT, params=params, adapter="lora-0")
    _, sent, _ = run(source, steps=3)
    kv = source.export_kv("r")
    assert kv is not None and kv.k.dtype == torch.float32
    fp16 = make_engine(tiny_llama, dtype="float16")
    free = fp16.blocks.num_free
    large = KVSnapshot(kv.tokens, kv.k * 1e5, kv.v)  # what an fp32 adapter's activations can make
    with pytest.raises(RequestError, match="float16"):
        fp16.add_request("r", prompt_token_ids=PROMPT, params=params, adapter="lora-0", resume_token_ids=sent, kv=large)
    assert fp16.blocks.num_free == free and not fp16.has_unfinished()
    fp16.add_request("r", prompt_token_ids=PROMPT, params=params, adapter="lora-0", resume_token_ids=sent, kv=kv)
    _, more, reason = run(fp16)
    assert reason is FinishReason.LENGTH and len(sent + more) == 8
