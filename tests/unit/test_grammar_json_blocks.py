"""A Lark grammar's %json blocks laid out as a schema is (``served_schema.laid_out``)."""

from __future__ import annotations

from dlora.common.messages import SamplingParams
from dlora.services.worker.engine.served_schema import laid_out
from dlora.services.worker.engine.structured import Grammars, check
from tests.unit.test_token_bytes import byte_level

BLOCK = '{"type": "object", "properties": {"k": {"type": "integer"}}, "required": ["k"]}'


def _takes(grammar: str, text: str) -> bool:
    hf = byte_level()
    matcher = Grammars(hf, len(hf), {hf.eos_token_id}).matcher(SamplingParams(grammar=grammar), [])
    assert matcher is not None
    return bool(matcher.consume_tokens(hf.encode(text, add_special_tokens=False)) and matcher.is_accepting())


def test_a_json_block_is_compact_as_a_schema_is() -> None:
    """A %json block was compiled with llguidance's defaults, whitespace anywhere: a random model
    wrote 'R={ "k"' and then whitespace to max_tokens, never closing the document (vLLM #4093's
    kind, ended for schemas by their layout). Laid out as a schema is: json.dumps's separators."""
    grammar = f'start: "R=" %json {BLOCK}\n'
    assert _takes(grammar, 'R={"k": 1}')
    assert not _takes(grammar, 'R={ "k": 1}')
    assert not _takes(grammar, 'R={"k"\r\n: 1}')
    # a block that says its own layout keeps it; numbers are kept as written; an empty block too
    flexible = BLOCK[:-1] + ', "x-guidance": {"whitespace_flexible": true}}'
    assert _takes(f'start: "R=" %json {flexible}\n', 'R={ "k" : 1 }')
    assert '"maximum": 0.10000000000000000001' in laid_out('start: %json {"maximum": 0.10000000000000000001}')
    check(SamplingParams(grammar="start: %json {}\n"))
    assert _takes('start: %json {"type": "array"} "," %json { }\n', "[1, 2],[]")
    unread = 'start: %json {"a": 1,}\n'  # not JSON: left for llguidance to say why
    assert laid_out(unread) == unread


def test_only_json_blocks_are_laid_out_not_strings_or_comments() -> None:
    """'%json {' was found in a Lark string literal, which gained the layout's options (a grammar
    served before, a 400: "Expected value"), and in a comment ("// obj: %json {...}"), whose
    unread JSON stopped the scan: the grammar's real block kept whitespace anywhere (vLLM #4093's
    kind again). Strings, regexes and comments are Lark's, and left as written."""
    literal = 'start: "%json {}" obj\nobj: %json {"type": "object"}\n'
    assert laid_out(literal).startswith('start: "%json {}" obj\n')
    check(SamplingParams(grammar=literal))
    assert _takes(literal, '%json {}{"k": 1}')
    assert not _takes(literal, '%json {}{ "k": 1}')
    for comment in ("// obj: %json {schema}", "# obj: %json {schema}"):
        grammar = f'{comment}\nstart: "R=" %json {BLOCK}\n'
        assert laid_out(grammar).startswith(comment + "\n")
        assert _takes(grammar, 'R={"k": 1}')
        assert not _takes(grammar, 'R={ "k": 1}')
    regex = 'start: /%json \\{\\}/ %json {"type": "array"}\n'
    assert laid_out(regex).startswith("start: /%json \\{\\}/ %json {")
    assert _takes(regex, "%json {}[1, 2]")
