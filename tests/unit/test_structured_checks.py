"""What the gateway and a worker refuse of a structured output before any token (``structured.check``),
without a tokenizer: each a 400 naming why, never a crash."""

from __future__ import annotations

import json

import pytest

from dlora.common.messages import SamplingParams
from dlora.services.worker.engine.structured import GrammarError, check

# llguidance 1.9 crashed its process (SIGSEGV) on these: the gateway's, and each worker's a request
# reached. Checked in a process of their own: were the screen to miss one, this test fails, not the run.
CRASHING = {"type": "integer", "minimum": -(2**63), "maximum": -(2**63) + 1}
CHECK = """
import json, sys
from dlora.common.messages import SamplingParams
from dlora.services.worker.engine.structured import GrammarError, check
try:
    check(SamplingParams(json_schema=sys.argv[1]))
except GrammarError as e:
    print("refused:", e)
"""


@pytest.mark.parametrize(
    "schema",
    [
        CRASHING,
        # a property (or a definition) named as a data keyword is a schema all the same (a review)
        {"type": "object", "properties": {"default": CRASHING}, "required": ["default"]},
        {"$defs": {"examples": CRASHING}, "$ref": "#/$defs/examples"},
    ],
)
def test_a_schema_that_crashed_the_grammar_engine_is_refused_first(schema: dict) -> None:
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", CHECK, json.dumps(schema)], capture_output=True, text=True)
    assert done.returncode == 0 and "refused:" in done.stdout and "outside the range" in done.stdout, done


@pytest.mark.parametrize(
    "schema",
    [
        # clamped to 2**63 - 1: a 200 whose number broke the schema
        {"type": "integer", "minimum": 2**70, "maximum": 2**70 + 3},
        {"type": "object", "properties": {"n": {"anyOf": [{"type": "number", "exclusiveMaximum": 1e300}]}}},
    ],
)
def test_numeric_bounds_past_64_bits_are_refused_before_the_grammar_engine(schema: dict) -> None:
    with pytest.raises(GrammarError, match="outside the range the grammar engine holds numbers in"):
        check(SamplingParams(json_schema=json.dumps(schema)))


def test_a_grammars_json_block_is_held_to_the_same_bounds() -> None:
    grammar = 'start: %json {"type": "integer", "minimum": -9223372036854775808, "maximum": 0}'
    with pytest.raises(GrammarError, match="minimum -9223372036854775808 is outside the range"):
        check(SamplingParams(grammar=grammar))


def test_bounds_within_64_bits_are_taken() -> None:
    """int64's maximum (OpenAPI's and protobuf's bound) read as a float was 2**63, and refused; a
    "maximum" key inside an enum's or a default's object is data, not a bound."""
    for schema in (
        {"type": "integer", "minimum": -(2**62), "maximum": 2**62},
        {"type": "integer", "minimum": 0, "maximum": 2**63 - 1},
        {"enum": [{"maximum": 10**19}]},
        {"type": "object", "default": {"maximum": 1e300}},
    ):
        check(SamplingParams(json_schema=json.dumps(schema)))


def test_a_bound_past_decimals_own_range_is_refused_not_a_500() -> None:
    """abs() of Decimal('1e1000000') raised decimal.Overflow: the gateway answered 500 (a review)."""
    with pytest.raises(GrammarError, match="maximum 1E\\+1000000 is outside"):
        check(SamplingParams(json_schema='{"type": "number", "maximum": 1e1000000}'))


def test_a_refused_bound_is_quoted_as_written() -> None:
    with pytest.raises(GrammarError, match="maximum 1E\\+300 is outside"):  # (int(1e300): 301 digits)
        check(SamplingParams(json_schema='{"type": "number", "maximum": 1e300}'))


@pytest.mark.parametrize(
    "regex,reason",
    [("(?=a)ab", "look-around"), ("(unclosed", "unclosed group")],
)
def test_a_regex_the_engine_cannot_read_says_why(regex: str, reason: str) -> None:
    """The message ended at 'regex parse error:' (the reason is on llguidance's later lines)."""
    with pytest.raises(GrammarError, match=reason):
        check(SamplingParams(regex=regex))


# llguidance compiles a grammar recursively, frames per level of its references: these (67 KB and
# 30 KB bodies) overflowed an 8 MB thread stack, SIGSEGV of the gateway (its shaping thread) or of
# the worker whose admission compiled it. Checked in a process of their own, as above.
def _ref_chain(levels: int) -> dict:
    defs = {f"d{i}": {"type": "object", "properties": {"x": {"$ref": f"#/$defs/d{i + 1}"}}} for i in range(levels)}
    return {"$defs": defs | {f"d{levels}": {"type": "integer"}}, "$ref": "#/$defs/d0"}


CHAINS = {
    "json_schema": json.dumps(_ref_chain(1000)),
    "grammar rules": "start: r0\n" + "".join(f"r{i}: r{i + 1}\n" for i in range(3000)) + 'r3000: "c"\n',
    "grammar terminals": "start: T0\n" + "".join(f'T{i}: "a" T{i + 1}\n' for i in range(6000)) + 'T6000: "c"\n',
}
DEEP_CHECK = """
import sys
from dlora.common.messages import SamplingParams
from dlora.services.worker.engine.structured import check
field = sys.argv[1].split()[0]
check(SamplingParams(**{field: sys.stdin.read()}))
print("taken")
"""


@pytest.mark.parametrize("kind", sorted(CHAINS))
def test_a_deep_chain_of_references_is_compiled_not_a_crash(kind: str) -> None:
    import subprocess
    import sys

    done = subprocess.run(
        [sys.executable, "-c", DEEP_CHECK, kind], input=CHAINS[kind], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0 and "taken" in done.stdout, (done.returncode, done.stderr[-2000:])


def test_a_gbnf_grammar_past_a_seconds_conversion_is_refused_saying_why() -> None:
    """llguidance's GBNF-to-Lark conversion (Python, the GIL held) takes time that grows with rules x
    characters: 3,000 chained rules held the gateway's shaping thread 12 s, a megabyte's for hours."""
    chain = "root ::= r0\n" + "".join(f'r{i} ::= "a" r{i + 1} | "b"\n' for i in range(3000)) + 'r3000 ::= "c"\n'
    with pytest.raises(GrammarError, match="GBNF grammar of 3002 rules .* write it in Lark"):
        check(SamplingParams(grammar=chain))
    lark = "start: r0\n" + "".join(f'r{i}: "a" r{i + 1} | "b"\n' for i in range(3000)) + 'r3000: "c"\n'
    check(SamplingParams(grammar=lark))  # the same in Lark: nothing to convert
    json_gbnf = 'root ::= object\nobject ::= "{" ws ( string ":" ws value ( "," ws string ":" ws value )* )? "}" ws\n'
    json_gbnf += 'value ::= object | string | number\nstring ::= "\\"" [a-z]* "\\"" ws\nnumber ::= [0-9]+ ws\n'
    check(SamplingParams(grammar=json_gbnf + 'ws ::= | " "\n'))


def test_a_constraint_past_what_a_compile_stack_is_sized_for_is_refused() -> None:
    """A compile's stack grows with the grammar's text (a megabyte of chained rules needs 256-512 MB),
    so the text is bounded too: a NATS client's larger grammar was a compile without a stack to match."""
    from dlora.services.worker.engine.guidance_grammar import MAX_CONSTRAINT_CHARS

    big = 'start: "a"\n' + "// padding\n" * (MAX_CONSTRAINT_CHARS // 11 + 1)
    with pytest.raises(GrammarError, match=f"characters, over the {MAX_CONSTRAINT_CHARS} served"):
        check(SamplingParams(grammar=big))
    check(SamplingParams(grammar=big[: MAX_CONSTRAINT_CHARS - 100]))


def test_a_grammar_of_blank_lines_is_read_in_linear_time() -> None:
    """llguidance tells Lark from GBNF with ``(?m)^\\s*(%llguidance\\b|start\\s*:)``, whose ``\\s*``
    crosses lines: quadratic in the blank lines (30,000: 5 s; a megabyte's: hours), in ``re``
    with the GIL held, so a guided_grammar of blank lines froze the whole gateway, its event loop
    and every stream on it (a review of 967490c). Told apart in linear time, as the same."""
    import time

    from llguidance.gbnf_to_lark import is_lark_syntax

    # 300,000 blank lines: the quadratic reading takes about 100 x 5 s, the linear one about a
    # second on a loaded machine; 60 s is far past the one and far short of the other (a bound
    # of 1.5 s over 30,000 lines failed under load).
    blank = 'root ::= "a"' + "\n" * 300_000
    began = time.monotonic()
    check(SamplingParams(grammar=blank))
    check(SamplingParams(grammar="\n" * 300_000 + ' start: "a"'))  # Lark after them, read as Lark
    assert time.monotonic() - began < 60

    from dlora.services.worker.engine.guidance_grammar import _is_lark

    for text in ('root ::= "a"\n', '\n \n\t start : "a"', ' %llguidance {}\nstart: "a"', "x\n start:", "startx:"):
        assert _is_lark(text) == is_lark_syntax(text), text


# Under an address-space limit (``ulimit -v``) the thread a large constraint's compile runs on,
# its stack sized to the text (``on_deep_stack``), may not start: "RuntimeError: can't start new thread",
# a 500 at the gateway. Replayed in a process of its own, its limit a few hundred MB above its use.
LIMITED = """
import resource, threading
from dlora.common.messages import SamplingParams
from dlora.services.worker.engine.structured import GrammarUnavailable, check
vm = int(next(line for line in open("/proc/self/status") if line.startswith("VmSize")).split()[1]) * 1024
resource.setrlimit(resource.RLIMIT_AS, (vm + (400 << 20), resource.RLIM_INFINITY))
try:
    check(SamplingParams(regex="a" * 600_000))  # a 602 MB stack
except GrammarUnavailable as e:
    print("unavailable:", e)
print("stack size", threading.stack_size())
check(SamplingParams(regex="[a-z]+ (kalo|remi)"))
print("small taken")
"""


def test_a_compile_whose_thread_cannot_start_says_so_and_loses_nothing() -> None:
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", LIMITED], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    out = done.stdout
    assert "unavailable: regex cannot be compiled now: " in out and "MiB stack" in out, out
    assert "stack size 0" in out and "small taken" in out, out
