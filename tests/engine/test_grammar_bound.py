"""A worker's (and the gateway's) tokenizer-bound compiles are bounded as ``check`` is: a schema
llguidance takes hours over is refused, naming the field, and the engine goes on serving."""

from __future__ import annotations

import json
import threading

import pytest

from dlora.common.messages import SamplingParams
from dlora.model.make_tiny import TinyOutput
from dlora.services.worker.engine import RequestError, compile_bound, structured
from tests.engine.helpers import make_engine
from tests.unit.test_grammar_compile_bound import LIVENESS_S, ORDINARY, SLOW, UNSTARVED

PROMPT = [5, 40, 41, 300, 17]


def test_a_schema_too_slow_to_compile_is_refused_and_the_engine_serves_on(
    tiny_llama: TinyOutput, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(structured, "GRAMMAR_COMPILATION_TIMEOUT_S", 1.0, raising=False)
    monkeypatch.setattr(compile_bound, "_WALL_PER_CPU", UNSTARVED)  # (the host's load: not a 503)
    engine = make_engine(tiny_llama)
    outcome: list[BaseException | None] = []

    def admit() -> None:  # as arrival does: prepared in a thread, then admitted
        engine.grammars.prepare(SamplingParams(max_tokens=8, json_schema=SLOW))
        try:
            engine.add_request("slow", prompt_token_ids=PROMPT, params=SamplingParams(max_tokens=8, json_schema=SLOW))
            outcome.append(None)
        except BaseException as e:  # noqa: BLE001 - the outcome asserted
            outcome.append(e)

    thread = threading.Thread(target=admit, daemon=True)
    thread.start()
    thread.join(LIVENESS_S)
    assert outcome, "the compile ran on past the liveness bound"
    assert isinstance(outcome[0], RequestError), outcome
    assert outcome[0].param == "json_schema", outcome[0].param
    assert str(outcome[0]).startswith("json_schema cannot be used: too complex to compile within 1 s")
    ordinary = SamplingParams(max_tokens=40, temperature=0, json_schema=ORDINARY)
    engine.add_request("ordinary", prompt_token_ids=PROMPT, params=ordinary)
    text = ""
    while engine.has_unfinished():
        text += "".join(o.new_text for o in engine.step())
    assert isinstance(json.loads(text) if text.endswith("}") else {}, dict)  # a document, or cut at max_tokens


def test_the_bounded_compile_is_the_tokenizers_compile_first_mask_and_all(tiny_llama: TinyOutput) -> None:
    """The child checked ``validate_grammar`` alone, without the tokenizer: the matcher's own
    construction, bounded by nothing, took up to 4 times as long (5,000 properties: 0.6 s against
    2.4 s of CPU, growing faster than the validation) and a first mask's failure went unseen. The
    child compiles as the engine does: a schema that fails only at its first mask says so there."""
    from llguidance import LLMatcher

    from dlora.services.worker.engine.compile_bound import Validator

    engine = make_engine(tiny_llama)
    grammar = structured.constraint(SamplingParams(json_schema=json.dumps({"$ref": "#"})))
    assert grammar is not None and LLMatcher.validate_grammar(grammar) == ""  # passes without the tokenizer
    verdict = Validator().validate(grammar, 30.0, engine.grammars.tokenizer_spec)
    assert verdict, verdict  # its first mask's failure, as the engine finds it
    with pytest.raises(structured.GrammarError) as refused:
        engine.grammars.matcher(SamplingParams(json_schema=json.dumps({"$ref": "#"})), [])
    assert str(refused.value).endswith(structured._reason(verdict)), (str(refused.value), verdict)


# A regex llguidance's lexer expands into ~250 MB while it compiles (a second or two: within the
# time bound): past a cap of 150 MiB, where the compiler's process, its tokenizer and an ordinary
# schema's compile hold ~50 MiB.
HUNGRY = "(a{1000}){1000}"


def test_a_compile_past_the_memory_cap_is_refused_saying_so(tiny_llama: TinyOutput) -> None:
    """The compile's child process had no memory cap: a constraint whose compile takes all the
    memory it can reach ended at the host's OOM killer (vLLM #7332's kind), which may pick another
    process (a worker, its requests with it). Capped (``grammar_compilation_memory_mb``), it is
    refused naming the field, and the cap takes an ordinary schema."""
    engine = make_engine(tiny_llama)
    engine.grammars.compile_memory_mb = 150
    with pytest.raises(RequestError) as refused:
        engine.add_request("hungry", prompt_token_ids=PROMPT, params=SamplingParams(max_tokens=8, regex=HUNGRY))
    assert refused.value.param == "regex", refused.value.param
    assert str(refused.value).startswith("regex cannot be used: too large to compile within 150 MiB of memory")
    engine.add_request("ordinary", prompt_token_ids=PROMPT, params=SamplingParams(max_tokens=4, json_schema=ORDINARY))
    while engine.has_unfinished():
        engine.step()
    engine.grammars.compile_memory_mb = 0  # no cap: compiled (what the cap refused is no error of the regex)
    assert engine.grammars.matcher(SamplingParams(regex=HUNGRY), []) is not None
