"""Structured output: every request with a JSON Schema ends as a document the schema accepts, in
every mode and beside free-text requests; bad schemas are refused with llguidance's reason."""

from __future__ import annotations

import json

import pytest

from dlora.common.messages import FinishReason, SamplingParams
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
