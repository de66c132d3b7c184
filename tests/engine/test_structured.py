"""Structured output: every request with a JSON Schema ends as a document the schema accepts, in
every mode and beside free-text requests; bad schemas are refused with llguidance's reason."""

from __future__ import annotations

import json
import re

import msgspec
import numpy as np
import pytest
import torch

from dlora.common.messages import ErrorCode, FinishReason, SamplingParams
from dlora.model.make_tiny import TinyOutput
from dlora.services.worker.engine import LLMEngine, RequestError
from dlora.services.worker.engine.structured import JSON_OBJECT_SCHEMA
from tests.engine.helpers import make_engine

PROMPT = [5, 40, 41, 300, 17]
SCHEMA = {
    "type": "object",
    "properties": {"size": {"enum": [1, 2, 3]}, "ok": {"type": "boolean"}, "tag": {"enum": ["kalo", "remi"]}},
    "required": ["size", "ok", "tag"],
    "additionalProperties": False,
}


def run(engine: LLMEngine, requests: dict[str, SamplingParams], adapter: str | None = "lora-0") -> dict[str, tuple]:
    for rid, params in requests.items():
        engine.add_request(rid, prompt_token_ids=PROMPT, params=params, adapter=adapter)
    out = {rid: ([], "", None) for rid in requests}
    while engine.has_unfinished():
        for o in engine.step():
            tokens, text, _ = out[o.request_id]
            out[o.request_id] = (tokens + o.new_token_ids, text + o.new_text, o.finish_reason)
    return out


@pytest.mark.parametrize("policy", ["unmerged-only", "merged-only"])
@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_output_follows_the_schema(tiny_llama: TinyOutput, policy: str, temperature: float) -> None:
    engine = make_engine(tiny_llama, policy=policy)
    schema = SamplingParams(max_tokens=200, temperature=temperature, seed=5, json_schema=json.dumps(SCHEMA))
    out = run(engine, {"json": schema, "free": SamplingParams(max_tokens=8)})
    _, text, reason = out["json"]
    doc = json.loads(text)  # complete and valid, and it ended there
    assert reason is FinishReason.STOP
    assert set(doc) == {"size", "ok", "tag"} and doc["size"] in (1, 2, 3) and doc["tag"] in ("kalo", "remi")
    assert isinstance(doc["ok"], bool)
    assert len(out["free"][0]) == 8  # its batch mate is untouched


def test_json_object_mode_gives_an_object(tiny_llama: TinyOutput) -> None:
    engine = make_engine(tiny_llama)
    tokens, text, reason = run(engine, {"j": SamplingParams(max_tokens=60, json_schema=JSON_OBJECT_SCHEMA)})["j"]
    assert text.startswith("{")
    if reason is FinishReason.STOP:
        assert isinstance(json.loads(text), dict)


def test_a_resumed_request_keeps_its_place_in_the_document(tiny_llama: TinyOutput) -> None:
    engine = make_engine(tiny_llama)
    params = SamplingParams(max_tokens=200, json_schema=json.dumps(SCHEMA))
    whole = run(engine, {"a": params})["a"]
    half = whole[0][: len(whole[0]) // 2]
    engine.add_request("b", prompt_token_ids=PROMPT, params=params, adapter="lora-0", resume_token_ids=half)
    rest = []
    while engine.has_unfinished():
        for o in engine.step():
            rest += o.new_token_ids
    assert half + rest == whole[0]


def test_unusable_schemas_are_refused(tiny_llama: TinyOutput) -> None:
    engine = make_engine(tiny_llama)
    for schema, fragment in (
        ("not json", "not a JSON object"),
        (json.dumps({"type": "integer", "minimum": 5, "maximum": 1}), "cannot be used"),
    ):
        with pytest.raises(RequestError, match=fragment):
            engine.add_request("x", prompt_token_ids=PROMPT, params=SamplingParams(json_schema=schema))


@pytest.mark.parametrize(
    "schema",
    [
        {"$ref": "#"},  # itself and nothing else: no document
        {"$defs": {"a": {"$ref": "#/$defs/b"}, "b": {"$ref": "#/$defs/a"}}, "$ref": "#/$defs/a"},
    ],
)
def test_a_schema_that_accepts_no_document_is_refused_not_answered_empty(tiny_llama: TinyOutput, schema: dict) -> None:
    """Such a schema passes llguidance's check and fails at the first token's mask, which then
    allows only end-of-sequence: the request ended at once with "stop" and no text (a 200)."""
    engine = make_engine(tiny_llama)
    compiled: list[str] = []
    compile_ = engine.grammars._compile
    engine.grammars._compile = lambda g: compiled.append(g) or compile_(g)  # type: ignore[method-assign]
    for rid in ("x", "y"):  # (a review: one that fails was compiled again, on the loop, for each request)
        with pytest.raises(RequestError, match="cannot be used"):
            engine.add_request(rid, prompt_token_ids=PROMPT, params=SamplingParams(json_schema=json.dumps(schema)))
    assert not engine.has_unfinished() and len(compiled) == 1


class _GivesUp:
    """A matcher that refuses the next token as llguidance does past its limits (its error: a line,
    then its parser's state)."""

    def __init__(self, matcher: object) -> None:
        self.matcher = matcher

    def __getattr__(self, name: str) -> object:
        return getattr(self.matcher, name)

    def consume_token(self, token: int) -> bool:
        return False

    def get_error(self) -> str:
        return "Too many items (limit 50000)\n<state>\n..."


def test_a_schema_the_grammar_engine_gives_up_on_midway_fails_as_the_request_s_fault(tiny_llama: TinyOutput) -> None:
    """A matcher that fails while the document grows (llguidance's item limits) ends its request as
    bad_request (the schema's fault, a 400), with the first line of the reason, and the rest run on."""
    engine = make_engine(tiny_llama)
    engine.add_request(
        "x", prompt_token_ids=PROMPT, params=SamplingParams(json_schema=json.dumps(SCHEMA), max_tokens=30)
    )
    engine.add_request("free", prompt_token_ids=PROMPT, params=SamplingParams(max_tokens=5, ignore_eos=True))
    engine.seqs["x"].matcher = _GivesUp(engine.seqs["x"].matcher)
    outputs = {o.request_id: o for o in engine.step()}
    assert outputs["x"].error_code == "bad_request"
    assert outputs["x"].error == "json_schema cannot be used: Too many items (limit 50000)"
    assert outputs["x"].error_param == "json_schema"  # the gateway names its body's field from it
    assert engine.has_unfinished() and "x" not in engine.seqs


def test_min_tokens_that_hold_back_the_token_a_schema_needs_fail_as_the_requests_fault(tiny_llama: TinyOutput) -> None:
    """The schema allows only "{" first, and min_tokens masks it as a stop token: nothing is left.
    It failed as an internal error blaming the model's logits (a 500)."""
    engine = make_engine(tiny_llama)
    brace = engine.tokenizer.encode("{", add_special_tokens=False)[0]
    params = SamplingParams(max_tokens=20, json_schema=json.dumps(SCHEMA), stop_token_ids=[brace], min_tokens=5)
    engine.add_request("r", prompt_token_ids=PROMPT, params=params, adapter="lora-0")
    [out] = [o for _ in range(3) for o in engine.step()]
    assert out.error_code is ErrorCode.BAD_REQUEST and "constraints mask every one" in out.error


def test_a_grammar_engine_that_fails_to_mask_is_an_internal_error_not_the_requests_fault(
    tiny_llama: TinyOutput,
) -> None:
    """Its row is masked whole, as a row the request's constraints empty is; only the latter is the
    client's fault (review: both came back as a 400 naming the request's constraints)."""

    class _Broken:
        def __init__(self, matcher) -> None:  # type: ignore[no-untyped-def]
            self.matcher = matcher

        def compute_bitmask(self) -> bytes:
            raise RuntimeError("the grammar engine failed")

        def __getattr__(self, name: str):  # type: ignore[no-untyped-def]
            return getattr(self.matcher, name)

    engine = make_engine(tiny_llama)
    engine.add_request("x", prompt_token_ids=PROMPT, params=SamplingParams(json_schema=json.dumps(SCHEMA)))
    engine.seqs["x"].matcher = _Broken(engine.seqs["x"].matcher)
    [out] = engine.step()
    assert out.error_code is ErrorCode.INTERNAL and "grammar failed" in out.error


@pytest.mark.parametrize("par", [True, False], ids=["llguidance-threads", "row-by-row"])
def test_the_device_unpacked_bitmask_masks_what_llguidance_s_own_apply_masks(tiny_llama: TinyOutput, par: bool) -> None:
    """Each row's bitmask goes to the device packed (a bit per token) and is unpacked there; the
    logits it leaves are llguidance's ``apply_token_bitmask_inplace`` of the matcher's own
    bitmask, for matchers at different places in their documents, beside an unconstrained row,
    with logits wider than the tokenizer (those ids never allowed); row by row (after the
    threaded fill refuses a matcher it cannot take) the same."""
    from llguidance.numpy import apply_token_bitmask_inplace

    from dlora.services.worker.engine.sampler import constrain

    engine = make_engine(tiny_llama)
    params = SamplingParams(json_schema=json.dumps(SCHEMA))
    ids = engine.tokenizer.encode('{"size": 2, "ok": true', add_special_tokens=False)
    matchers = [engine.grammars.matcher(params, ids[:k]) for k in (0, 1, 3, len(ids))]
    if not par:
        matchers[0] = _GivesUp(matchers[0])  # no LLMatcher: the threaded fill raises for the batch
    rows: list = [matchers[0], None, *matchers[1:]]
    vocab = engine.model_config.vocab_size + 40
    logits = torch.randn(len(rows), vocab, generator=torch.Generator().manual_seed(0))
    masked, failed = constrain(logits.to(engine.device), rows, engine.grammars)
    masked = masked.cpu()
    assert not failed
    for i, m in enumerate(rows):
        expected = logits[i].numpy().copy()[None]
        if m is not None:
            apply_token_bitmask_inplace(expected, np.frombuffer(m.compute_bitmask(), dtype=np.int32)[None])
            expected[0, engine.grammars.tokenizer.vocab_size :] = -np.inf
        assert np.array_equal(masked[i].numpy(), expected[0]), i
    assert all(0 < torch.isinf(masked[i]).sum() < vocab for i in (0, 2, 3, 4))  # some allowed, some not


def test_the_device_unpack_is_numpy_s_unpackbits() -> None:
    """What a GPU step runs (``unpack_bits``), run here on the CPU against numpy's, which the CPU
    path uses."""
    from dlora.services.worker.engine.sampler import unpack_bits

    packed = np.random.default_rng(0).integers(0, 256, size=(3, 37), dtype=np.uint8)
    expected = np.unpackbits(packed, axis=1, bitorder="little").astype(bool)
    assert np.array_equal(unpack_bits(torch.from_numpy(packed)).numpy(), expected)


@pytest.mark.parametrize(
    ("params", "matches"),
    [
        (SamplingParams(max_tokens=40, regex=r"[0-9]{3}-[a-z]{2}"), lambda t: re.fullmatch(r"[0-9]{3}-[a-z]{2}", t)),
        (SamplingParams(max_tokens=40, choice=["kalo remi", "yes", "no"]), lambda t: t in ("kalo remi", "yes", "no")),
        (
            SamplingParams(max_tokens=40, grammar='start: "ab" DIGIT\nDIGIT: /[0-9]/'),
            lambda t: re.fullmatch("ab[0-9]", t),
        ),
        (
            SamplingParams(max_tokens=40, grammar='root ::= "x" [a-c] [a-c] "!"'),  # GBNF
            lambda t: re.fullmatch("x[a-c]{2}!", t),
        ),
    ],
    ids=["regex", "choice", "lark", "gbnf"],
)
def test_vllms_other_structured_outputs_are_followed(tiny_llama: TinyOutput, params: SamplingParams, matches) -> None:  # type: ignore[no-untyped-def]
    """vLLM's structured_outputs regex, choice and grammar (Lark or GBNF): the output is a whole
    match, and the request stops there, in a batch with free text (at temperature 1 too)."""
    engine = make_engine(tiny_llama)
    sampled = msgspec.structs.replace(params, temperature=1.0, seed=3)
    out = run(engine, {"greedy": params, "sampled": sampled, "free": SamplingParams(max_tokens=6)})
    for rid in ("greedy", "sampled"):
        _, text, reason = out[rid]
        assert reason is FinishReason.STOP and matches(text), (rid, text)


def test_structured_outputs_are_one_at_a_time_and_bad_ones_say_why(tiny_llama: TinyOutput) -> None:
    engine = make_engine(tiny_llama)
    for params, fragment in (
        (SamplingParams(regex="a+", choice=["a"]), "at most one structured output"),
        (SamplingParams(regex="(unclosed"), "regex cannot be"),
        (SamplingParams(grammar="start: missing_rule"), "grammar cannot be"),
        (SamplingParams(choice=["", "x"]), "non-empty strings"),
    ):
        with pytest.raises(RequestError, match=fragment):
            engine.add_request("x", prompt_token_ids=PROMPT, params=params)


def test_a_grammar_is_compiled_once_for_every_request_that_asks_for_it(
    tiny_llama: TinyOutput, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each choice compiled its own matcher on the worker's event loop (0.3-0.5 s for a 400 KB
    schema: n=32 held every other request there 15 s); a fresh one is kept and copied."""
    from llguidance import LLMatcher

    from dlora.services.worker.engine import structured

    compiled: list[str] = []

    class Counted:  # LLMatcher, its compilations counted
        grammar_from_json_schema = staticmethod(LLMatcher.grammar_from_json_schema)
        validate_grammar = staticmethod(LLMatcher.validate_grammar)

        def __new__(cls, tokenizer, grammar: str, **kw):  # type: ignore[no-untyped-def]
            compiled.append(grammar)
            return LLMatcher(tokenizer, grammar, **kw)

    monkeypatch.setattr(structured, "LLMatcher", Counted)
    engine = make_engine(tiny_llama)
    params = SamplingParams(max_tokens=12, json_schema=json.dumps(SCHEMA))
    engine.grammars.prepare(params)  # as admission does, in a thread
    for rid in ("a", "b", "c"):
        engine.add_request(rid, prompt_token_ids=PROMPT, params=params)
    out = {}
    while engine.has_unfinished():
        for o in engine.step():
            out[o.request_id] = out.get(o.request_id, []) + o.new_token_ids
    assert len(compiled) == 1
    texts = [engine.tokenizer.decode(out[r]) for r in ("a", "b", "c")]
    assert all(t == texts[0] for t in texts)  # greedy: one document each, none disturbed by the others


# A worker compiles a request's grammar in a thread of asyncio's (admission's prepare), or on its
# event loop if that one was since dropped from those kept: a deep chain of references overflowed
# either's 8 MB stack and the worker died (SIGSEGV), its other requests with it. Its own process here.
PREPARE_DEEP = """
import json, sys, threading
from transformers import AutoTokenizer
from dlora.common.messages import SamplingParams
from dlora.services.worker.engine.structured import Grammars
tokenizer = AutoTokenizer.from_pretrained(sys.argv[1])
grammars = Grammars(tokenizer, len(tokenizer), {tokenizer.eos_token_id})
defs = {f"d{i}": {"type": "object", "properties": {"x": {"$ref": f"#/$defs/d{i + 1}"}}} for i in range(1000)}
params = SamplingParams(json_schema=json.dumps({"$defs": defs | {"d1000": {"type": "integer"}}, "$ref": "#/$defs/d0"}))
thread = threading.Thread(target=grammars.prepare, args=(params,))
thread.start()
thread.join()
grammars._compiled.clear()  # dropped since: compiled again where the request is added
print("first mask allows", int(grammars.bitmasks([grammars.matcher(params, [])])[0].any()))
"""


def test_a_deep_chain_of_references_does_not_crash_the_worker(tiny_llama: TinyOutput) -> None:
    import subprocess
    import sys

    done = subprocess.run(
        [sys.executable, "-c", PREPARE_DEEP, str(tiny_llama.model)], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0 and "first mask allows 1" in done.stdout, (done.returncode, done.stderr[-2000:])


def test_a_grammar_is_converted_once_not_on_the_event_loop_for_each_request(
    tiny_llama: TinyOutput, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A worker's matcher() converted the request's GBNF grammar to Lark again on its event loop,
    each choice of each request, though admission had compiled it in a thread (1,500 rules: 2 s)."""
    from dlora.services.worker.engine import guidance_grammar

    converted: list[str] = []
    from_grammar = guidance_grammar._from_grammar

    def counted(text: str) -> str:
        converted.append(text)
        return from_grammar(text)

    monkeypatch.setattr(guidance_grammar, "_from_grammar", counted)
    engine = make_engine(tiny_llama)
    params = SamplingParams(max_tokens=12, grammar='root ::= "kalo" | "remi" rest\nrest ::= " " [a-z]{1,4}\n')
    engine.grammars.prepare(params)  # as admission does, in a thread
    for rid in ("a", "b", "c"):
        engine.add_request(rid, prompt_token_ids=PROMPT, params=params)
    while engine.has_unfinished():
        engine.step()
    assert converted == [params.grammar]


def test_requests_asking_at_once_for_a_grammar_compile_it_once(tiny_llama: TinyOutput) -> None:
    """The gateway compiles a request's structured output on a pool of 4 threads (4da9a68): a burst
    of requests with the same schema (a batch job's) compiled it on all 4 at once, each as long as
    one (300 patternProperties: 4 compiles, 5 s on 2 cores, where one took 2.3 s), and the pool
    held no other request meanwhile. The others wait for the one compile, and so its refusal too."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    from dlora.services.worker.engine.structured import GrammarError

    engine = make_engine(tiny_llama)
    grammars = engine.grammars
    entered, release = threading.Event(), threading.Event()
    compiled: list[str] = []
    compile_ = grammars._compile

    def slow(grammar: str):  # type: ignore[no-untyped-def]
        compiled.append(grammar)
        entered.set()
        release.wait(30)
        return compile_(grammar)

    grammars._compile = slow  # type: ignore[method-assign]
    for schema in (SCHEMA, {"$defs": {"a": {"$ref": "#/$defs/a"}}, "$ref": "#/$defs/a"}):  # taken; refused
        compiled.clear()
        entered.clear()
        release.clear()
        params = SamplingParams(max_tokens=12, json_schema=json.dumps(schema))

        def ask(_: int, params: SamplingParams = params) -> str:
            try:
                return "taken" if grammars.matcher(params, []) is not None else "none"
            except GrammarError as e:
                return str(e)

        with ThreadPoolExecutor(4) as pool:
            answers = pool.map(ask, range(4))
            assert entered.wait(30)
            threading.Event().wait(0.3)  # the other three reach the grammar meanwhile
            release.set()
            answers = list(answers)
        assert len(compiled) == 1 and len(set(answers)) == 1, (len(compiled), answers)


def test_pydantic_formats_and_integral_float_counts_are_served_and_followed(tiny_llama: TinyOutput) -> None:
    """A SecretStr's "password" format and counts written 2.0 were 400s; served, the counts hold
    (as integers) and the unknown format constrains nothing more than a string."""
    schema = {
        "type": "object",
        "properties": {
            "code": {"type": "string", "maxLength": 2.0},
            "pw": {"type": "string", "format": "password", "writeOnly": True, "maxLength": 3.0},
            "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "minItems": 1.0, "maxItems": 2.0},
        },
        "required": ["code", "pw", "tags"],
        "additionalProperties": False,
    }
    engine = make_engine(tiny_llama)
    asked = {
        f"s{seed}": SamplingParams(max_tokens=120, temperature=1.0, seed=seed, json_schema=json.dumps(schema))
        for seed in range(4)
    }
    for rid, (_, text, reason) in run(engine, asked).items():
        assert reason is FinishReason.STOP, (rid, text)
        doc = json.loads(text)
        assert len(doc["code"]) <= 2 and len(doc["pw"]) <= 3 and 1 <= len(doc["tags"]) <= 2, text


def test_an_object_holds_only_the_properties_its_schema_names(tiny_llama: TinyOutput) -> None:
    """As pydantic writes a model (no additionalProperties): a random model added keys until
    max_tokens, where vLLM's default backend serves the named ones alone."""
    schema = {
        "type": "object",
        "properties": {"ok": {"type": "boolean"}, "n": {"enum": [1, 2]}, "tag": {"type": "string", "maxLength": 3}},
        "required": ["ok"],
        "title": "Reply",
    }
    engine = make_engine(tiny_llama)
    asked = {
        f"s{seed}": SamplingParams(max_tokens=80, temperature=1.0, seed=seed, json_schema=json.dumps(schema))
        for seed in range(6)
    }
    for rid, (_, text, reason) in run(engine, asked, adapter="lora-2").items():
        assert reason is FinishReason.STOP, (rid, text)
        assert set(json.loads(text)) <= {"ok", "n", "tag"}, text


def test_a_oneof_whose_branches_overlap_is_followed_as_anyof(tiny_llama: TinyOutput) -> None:
    """Union[int, float] as OpenAPI generators write it was a 400 (llguidance proves no two such
    branches disjoint); served as vLLM's default backend serves it, each document one branch's."""
    schema = {
        "type": "object",
        "properties": {
            "v": {"oneOf": [{"type": "integer", "minimum": 0, "maximum": 9}, {"type": "number", "maximum": -1}]},
            "who": {"oneOf": [{"type": "string", "maxLength": 3}, {"enum": ["kalo", "remi"]}]},
        },
        "required": ["v", "who"],
    }
    engine = make_engine(tiny_llama)
    asked = {
        f"s{seed}": SamplingParams(max_tokens=80, temperature=1.0, seed=seed, json_schema=json.dumps(schema))
        for seed in range(6)
    }
    for rid, (_, text, reason) in run(engine, asked).items():
        assert reason is FinishReason.STOP, (rid, text)
        doc = json.loads(text)
        v, who = doc["v"], doc["who"]
        assert set(doc) == {"v", "who"} and not isinstance(v, bool), text
        assert (isinstance(v, int) and 0 <= v <= 9) or (isinstance(v, int | float) and v <= -1), text
        assert isinstance(who, str) and (len(who) <= 3 or who in ("kalo", "remi")), text
