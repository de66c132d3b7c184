"""A grammar's compile a loaded host starves (stopped at the bound in wall time, its CPU time short
of the bound) says nothing of the grammar: a 503 to retry, at the gateway's check and a worker's
alike, not the 400 "too complex ... simplify it" of a compile that took the CPU bound. Where no CPU
time can be read (no /proc) the two cannot be told apart, and the bound met in wall time stays a
400: a 503 there had a client retry a grammar that never compiles for ever. The host's load is made
by a CPU-time reader that reads nothing spent (``compile_bound._cpu_s``), not by timing."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from dlora.common.messages import SamplingParams
from dlora.model.make_tiny import TinyOutput
from dlora.services.worker.engine import compile_bound, structured
from dlora.services.worker.engine.compile_bound import TokenizerSpec
from dlora.services.worker.engine.structured import GrammarError, Grammars, GrammarUnavailable, check
from tests.unit.test_grammar_compile_bound import SLOW

BOUND_S = 0.2  # of CPU; the bound in wall time is 5 times it


def _grammars(tiny_llama: TinyOutput) -> Grammars:
    hf = AutoTokenizer.from_pretrained(tiny_llama.model)
    return Grammars(hf, len(hf), {hf.eos_token_id}, compile_timeout_s=BOUND_S)


def test_a_starved_compile_is_a_503_at_the_gateway_and_on_a_worker(
    tiny_llama: TinyOutput, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The engine turned a compile stopped in wall time into the too-slow refusal, a 400 telling the
    client to simplify a grammar that compiled on the worker it first ran on: a resume moved to a
    loaded worker ended so, mid-stream. Now it is ``GrammarUnavailable`` (a 503; a resume is handed
    back), at the gateway's check too, and whichever compile ahead found it says so."""
    monkeypatch.setattr(compile_bound, "_cpu_s", lambda pid: 0.0)  # no CPU time spent, ever
    monkeypatch.setattr(structured, "GRAMMAR_COMPILATION_TIMEOUT_S", BOUND_S)
    params = SamplingParams(json_schema=SLOW)
    with pytest.raises(GrammarUnavailable, match="json_schema cannot be compiled now: the server was too busy"):
        check(params)  # the gateway's, without a tokenizer
    grammars = _grammars(tiny_llama)
    with pytest.raises(GrammarUnavailable, match="json_schema cannot be compiled now: the server was too busy"):
        grammars.check(params)  # the gateway's, as far as a worker's first mask
    with pytest.raises(GrammarUnavailable, match="json_schema cannot be compiled now: the server was too busy"):
        grammars.matcher(params, [])  # a worker's
    refused = grammars.prepare(params)  # a worker's compile on arrival
    assert isinstance(refused, GrammarUnavailable), refused
    assert str(refused).startswith("json_schema cannot be compiled now: the server was too busy"), refused


def test_a_bound_met_in_wall_time_with_no_cpu_time_to_read_is_too_complex_for_now(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """No /proc: nothing tells a starved compile from a grammar too complex. It is refused as too
    complex (a 400, not a 503 to retry for ever), and not kept: compiled again when sent again."""
    monkeypatch.setattr(compile_bound, "_cpu_s", lambda pid: None)
    monkeypatch.setattr(structured, "GRAMMAR_COMPILATION_TIMEOUT_S", BOUND_S)
    validated: list[str] = []
    validate = structured._validator.validate

    def counted(grammar: str, bound_s: float, tokenizer: TokenizerSpec | None = None, memory_mb: int = 0) -> str | None:
        verdict = validate(grammar, bound_s, tokenizer, memory_mb)
        validated.append(str(verdict))
        return verdict

    monkeypatch.setattr(structured._validator, "validate", counted)
    params = SamplingParams(json_schema=SLOW.replace("^k", "^untimed"))
    for _ in range(2):
        with pytest.raises(GrammarError, match="json_schema cannot be used: too complex to compile within 0.2 s") as e:
            check(params)
        assert not isinstance(e.value, GrammarUnavailable)
    assert validated == [compile_bound.UNTIMED] * 2, validated
