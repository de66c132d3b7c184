"""Requests of an adapter being read (``LLMEngine.loading``) wait in the engine unseen by the
policy while the others step, and run once ``install_adapter`` takes what ``read_adapter`` read:
the tokens those of an engine that held the adapter from the start."""

from __future__ import annotations

import pytest

from dlora.common.messages import SamplingParams
from dlora.model.make_tiny import TinyOutput
from dlora.services.worker.engine import RequestError
from tests.engine.helpers import make_engine, run_all

PROMPT = [5, 40, 41, 300, 17]


@pytest.mark.parametrize("policy", ["unmerged-only", "dlora", "merged-only"])
def test_requests_wait_for_their_adapter_s_read_and_then_run_as_if_it_had_been_held(
    tiny_llama: TinyOutput, policy: str
) -> None:
    name, path = next(iter(tiny_llama.adapters.items()))
    held = run_all(make_engine(tiny_llama, policy=policy), {"base": (None, PROMPT), "lora": (name, PROMPT)}, 5)
    engine = make_engine(tiny_llama, policy=policy)
    engine.unregister_adapter(name)
    with pytest.raises(RequestError, match="not registered"):  # neither held nor being read
        engine.add_request("early", prompt_token_ids=PROMPT, adapter=name)
    engine.loading.add(name)
    params = SamplingParams(max_tokens=5)
    engine.add_request("base", prompt_token_ids=PROMPT, params=params)
    engine.add_request("lora", prompt_token_ids=PROMPT, params=params, adapter=name)
    assert [q.request_id for q in engine.queue()] == ["base"]  # the policy sees only what can run
    got: dict[str, list[int]] = {"base": [], "lora": []}
    while "base" in engine.seqs:
        for o in engine.step():
            got[o.request_id] += o.new_token_ids
    assert not got["lora"] and not engine.runnable() and engine.has_unfinished()
    assert engine.fail_all("a step failed") == []  # it was in no step: not failed with them
    engine.install_adapter(engine.read_adapter(name, path))
    assert engine.runnable() and not engine.loading
    while engine.has_unfinished():
        for o in engine.step():
            got[o.request_id] += o.new_token_ids
    assert got == held
