"""A structured output llguidance takes hours to compile is refused, saying so, within a bound
(``GRAMMAR_COMPILATION_TIMEOUT_S``, as vLLM's VLLM_GRAMMAR_COMPILATION_TIMEOUT_S), and no process
waits for such a compile to exit. llguidance's own limits (lexer fuel, grammar size) do not count
the work that takes the time: a schema of 250 ``patternProperties`` passes with a tenth of the
default fuel."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from dlora.common.messages import SamplingParams
from dlora.model.make_tiny import TinyOutput
from dlora.services.worker.engine import structured
from dlora.services.worker.engine.structured import GrammarError, check

# 400 keys took 12 s to compile, 1,000 take hours (the cost grows past the fourth power): vLLM #54003.
SLOW = json.dumps({"type": "object", "patternProperties": {f"^k{i}_[a-z]+$": {"type": "integer"} for i in range(1000)}})
ORDINARY = json.dumps(
    {
        "type": "object",
        "properties": {"name": {"type": "string", "pattern": "^[a-z]+$"}, "n": {"type": "integer", "minimum": 0}},
        "patternProperties": {"^x_[a-z]+$": {"type": "boolean"}},
        "required": ["name"],
    }
)
LIVENESS_S = 120  # only that it ends: the bound itself is a second here
# The wall time's bound, per second of the CPU bound, where a test asserts a slow compile's "too
# complex" 400: at compile_bound's 5 a child the loaded test host (2 cores shared by the suite's
# processes and others) gave under a fifth of a core met the wall bound first, a 503 "too busy"
# since a starved compile is one. Its CPU time alone decides at 60, still within LIVENESS_S.
UNSTARVED = 60.0


def _checked(params: SamplingParams) -> list[BaseException | None]:
    """``check(params)``'s outcome (its exception; None: taken), or an empty list if it has not
    ended within the liveness bound (on a daemon thread: left behind then)."""
    outcome: list[BaseException | None] = []

    def run() -> None:
        try:
            check(params)
            outcome.append(None)
        except BaseException as e:  # noqa: BLE001 - the outcome asserted
            outcome.append(e)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(LIVENESS_S)
    return outcome


@pytest.mark.parametrize("field", ["json_schema", "grammar"])
def test_a_constraint_too_slow_to_compile_is_refused_saying_so(monkeypatch: pytest.MonkeyPatch, field: str) -> None:
    from dlora.services.worker.engine import compile_bound

    monkeypatch.setattr(structured, "GRAMMAR_COMPILATION_TIMEOUT_S", 1.0, raising=False)
    monkeypatch.setattr(compile_bound, "_WALL_PER_CPU", UNSTARVED)
    text = SLOW if field == "json_schema" else f"start: %json {SLOW}\n"
    outcome = _checked(SamplingParams(**{field: text}))
    assert outcome, "the compile ran on past the liveness bound"
    assert isinstance(outcome[0], GrammarError), outcome
    label = "json_schema" if field == "json_schema" else "grammar"
    assert str(outcome[0]).startswith(f"{label} cannot be used: too complex to compile within 1 s"), outcome
    # the same bound takes an ordinary schema, patternProperties and all
    assert _checked(SamplingParams(json_schema=ORDINARY)) == [None]


def test_a_compile_that_kills_its_process_is_a_refusal_and_the_next_is_compiled() -> None:
    """The compiler's child process dies on a grammar llguidance crashes on (its bounds screened
    before, by ``check``): that grammar is refused saying so, the next one gets a new child."""
    from llguidance import LLMatcher

    from dlora.services.worker.engine.compile_bound import Validator

    crashing = {"type": "integer", "minimum": -(2**63), "maximum": -(2**63) + 1}  # SIGSEGV in llguidance 1.9
    validator = Validator()
    verdict = validator.validate(LLMatcher.grammar_from_json_schema(json.dumps(crashing)), 10.0)
    assert verdict is not None and "failed on it" in verdict, verdict
    assert validator.validate(LLMatcher.grammar_from_json_schema(ORDINARY), 10.0) == ""


EXITS = """
import asyncio, sys
from dlora.common.messages import SamplingParams
from dlora.services.worker.engine import structured
from dlora.services.worker.engine.structured import Grammars, check

structured.GRAMMAR_COMPILATION_TIMEOUT_S = float(sys.argv[1])  # 0: no bound, as vLLM's 0

async def main() -> None:
    grammars = Grammars(None, 0, set())
    task = asyncio.ensure_future(grammars.off_loop(check, SamplingParams(json_schema=sys.stdin.read())))
    await asyncio.sleep(1)  # compiling
    print("exiting", task.done(), flush=True)

asyncio.run(main())
"""


@pytest.mark.parametrize("bound_s", [0.0, 600.0])
def test_a_process_exits_without_waiting_for_a_compile(bound_s: float) -> None:
    """A compile's thread was joined at exit (a ThreadPoolExecutor's): a gateway or worker told to stop
    while compiling such a schema ran on for hours; bounded, for as long as the bound."""
    done = subprocess.run(
        [sys.executable, "-c", EXITS, str(bound_s)], input=SLOW, capture_output=True, text=True, timeout=LIVENESS_S
    )
    assert done.returncode == 0 and "exiting False" in done.stdout, (done.returncode, done.stderr[-2000:])


def test_where_no_compiler_process_can_start_grammars_are_compiled_as_before(monkeypatch: pytest.MonkeyPatch) -> None:
    """A host out of processes or memory for the child (fork's EAGAIN, ENOMEM): the OSError of its
    start was a 500 for every structured request; compiled in-process, unbounded, as before."""
    from dlora.services.worker.engine.compile_bound import Validator

    monkeypatch.setattr(structured, "_validator", Validator())
    monkeypatch.setattr(sys, "executable", "/nonexistent/python")
    check(SamplingParams(json_schema=ORDINARY.replace("x_", "no-child_")))
    with pytest.raises(GrammarError, match="cannot be used"):
        check(SamplingParams(json_schema=json.dumps({"type": "integer", "minimum": 5, "maximum": 1})))


def test_a_burst_of_compiles_leaves_few_compiler_processes_behind() -> None:
    """Each child holds the engine's tokenizer (70 MB for a 60,000-token vocabulary): a burst on
    a worker's 8 compile threads left 8 of them for good."""
    from concurrent.futures import ThreadPoolExecutor

    from llguidance import LLMatcher

    from dlora.services.worker.engine.compile_bound import KEPT_IDLE, Validator

    validator = Validator()
    grammars = [LLMatcher.grammar_from_json_schema(ORDINARY.replace("x_", f"burst{i}_")) for i in range(6)]
    with ThreadPoolExecutor(6) as pool:
        assert list(pool.map(lambda g: validator.validate(g, 10.0), grammars)) == [""] * 6
    assert 1 <= len(validator._idle) <= KEPT_IDLE


def test_a_child_stopped_in_wall_time_not_cpu_time_says_so(monkeypatch: pytest.MonkeyPatch) -> None:
    """A child a loaded host starves (its CPU time reads as nothing spent) is stopped at the wall
    time's bound, and that is told apart from a grammar that took the CPU bound."""
    from dlora.services.worker.engine import compile_bound
    from dlora.services.worker.engine.compile_bound import Validator

    monkeypatch.setattr(compile_bound, "_cpu_s", lambda pid: 0.0)
    grammar = structured.constraint(SamplingParams(json_schema=SLOW))
    assert grammar is not None
    verdict = Validator().validate(grammar, 0.2)
    assert verdict is not None, "refused as though it had taken the CPU bound"
    assert verdict == compile_bound.STARVED


def test_a_refusal_of_a_starved_compile_is_not_kept(monkeypatch: pytest.MonkeyPatch) -> None:
    """A schema refused at the bound because a load spike starved its child was refused for good
    (until 32 other grammars pushed it out of the cache), however idle the host became. It is a
    503 for now (``test_grammar_starved``)."""
    from dlora.services.worker.engine import compile_bound
    from dlora.services.worker.engine.structured import GrammarUnavailable

    params = SamplingParams(json_schema=ORDINARY.replace("x_", "starved_"))
    with monkeypatch.context() as starved:  # no CPU time spent, the wall time's bound at once
        starved.setattr(compile_bound, "_cpu_s", lambda pid: 0.0)
        starved.setattr(compile_bound, "_WALL_PER_CPU", 0.0)
        with pytest.raises(GrammarUnavailable, match="cannot be compiled now: the server was too busy"):
            check(params)
    check(params)  # the load gone: compiled


def test_a_grammar_that_killed_its_compiler_process_is_not_compiled_in_process(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``Grammars`` (the gateway's and each worker's) read the child's verdict only for the bound:
    a grammar whose compile killed the child (llguidance crashed on it) was compiled again in the
    server's own process, which it would crash as it did the child (SIGSEGV: the gateway, or a
    worker and every request it held)."""
    from dlora.services.worker.engine.compile_bound import Validator
    from dlora.services.worker.engine.structured import Grammars

    class Crashes(Validator):
        def validate(self, grammar: str, bound_s: float, tokenizer: object = None, memory_mb: int = 0) -> str | None:
            return "the grammar engine failed on it (its compiler's process died)"

    compiled: list[str] = []
    monkeypatch.setattr(structured, "_validator", Crashes())
    monkeypatch.setattr(Grammars, "_compile", lambda self, grammar: compiled.append(grammar))
    grammars = Grammars(None, 0, set())
    grammars.__dict__.update(tokenizer=None, tokenizer_spec=None)  # (none here: the validator is a stub)
    params = SamplingParams(json_schema=ORDINARY.replace("x_", "crashes_"))
    with pytest.raises(GrammarError, match="json_schema cannot be used: the grammar engine failed on it"):
        grammars.matcher(params, [])
    assert compiled == [], "compiled in-process after it killed its compiler's process"


def _children() -> set[int]:
    """This process's child processes (any thread's; a thread that ended meanwhile has none)."""
    out: set[int] = set()
    for task in Path(f"/proc/{os.getpid()}/task").iterdir():
        with contextlib.suppress(FileNotFoundError, ProcessLookupError):
            out.update(int(pid) for pid in (task / "children").read_text().split())
    return out


def _compiling(pid: int) -> bool:
    """Whether child ``pid`` runs a compile: its compile thread started (two threads), or it ended."""
    try:
        return len(os.listdir(f"/proc/{pid}/task")) >= 2
    except FileNotFoundError:
        return True


def _verdicts_of_a_compile_whose_child_gets(sig: int, prefix: str) -> tuple[list[str | None], set[int], set[int]]:
    """The verdicts of a new ``Validator`` on a schema of a second's compile (its names under
    ``prefix``: a grammar no other test compiled) whose child gets ``sig`` while it compiles; the
    children signalled, and those it keeps after."""
    from llguidance import LLMatcher

    from dlora.services.worker.engine.compile_bound import Validator

    before = _children()
    # 200 names: 1.2 s of CPU, a signal's wait polls every 0.05 s (300 took 5.7 s, and the kill's
    # test compiles it twice)
    names = {f"^{prefix}{i}_[a-z]+$": {"type": "integer"} for i in range(200)}
    grammar = LLMatcher.grammar_from_json_schema(json.dumps({"type": "object", "patternProperties": names}))
    verdicts: list[str | None] = []
    validator = Validator()  # (no child kept: this compile's is a new one)
    thread = threading.Thread(target=lambda: verdicts.append(validator.validate(grammar, 60.0)), daemon=True)
    thread.start()
    deadline = time.monotonic() + LIVENESS_S
    while not (new := _children() - before) and time.monotonic() < deadline:
        time.sleep(0.05)
    # compiling: a fixed 0.5 s for its start was, on a loaded host, a signal before the child's
    # Python had started, and its compile, run again on a new child, took past the liveness bound
    while not all(_compiling(pid) for pid in new) and time.monotonic() < deadline:
        time.sleep(0.05)
    for pid in new:
        os.kill(pid, sig)
    thread.join(LIVENESS_S)
    return verdicts, new, {child.proc.pid for child in validator._idle}


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["systemctl-stop", "Ctrl-C"])
def test_a_stop_signal_to_the_compilers_process_is_no_crash_of_its_grammar(sig: int) -> None:
    """``systemctl stop`` sends SIGTERM to every process of the unit (KillMode=control-group), and
    Ctrl-C on ``dlora serve`` SIGINT to every process of the terminal's group: a compiler's child
    died of it, and the grammar it was checking was refused as one llguidance crashed on (and kept
    so), a 400 for a request a draining worker was to run. The child ends with its parent's pipe."""
    verdicts, signalled, kept = _verdicts_of_a_compile_whose_child_gets(sig, "s")
    assert verdicts == [""] and signalled == kept, (verdicts, signalled, kept)  # compiled on, not again


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["systemctl-stop", "Ctrl-C"])
def test_a_stop_signal_as_the_child_starts_is_held_until_it_is_ignored(sig: int) -> None:
    """A stop's signal before the child's ``_serve`` ignored it (a loaded host: Python's start and
    its imports take seconds) killed it, or, a SIGINT during Python's site import, ended it with
    code 1: its grammar refused as one llguidance crashed on (a run under load). Now held back."""
    from llguidance import LLMatcher

    from dlora.services.worker.engine.compile_bound import _Child

    child = _Child()
    try:
        os.kill(child.proc.pid, sig)  # (at once: Python has not started)
        assert child.ask(LLMatcher.grammar_from_json_schema(ORDINARY), 60.0, None) == ""
    finally:
        child.kill()


_DEFAULT_ACTIONS_THEN_WAIT = """
import signal, sys, time
for sig in (signal.SIGINT, signal.SIGTERM):
    signal.signal(sig, signal.SIG_DFL)
print("ready", flush=True)
time.sleep(60)
"""


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["systemctl-stop", "Ctrl-C"])
def test_a_stop_signal_that_comes_while_the_child_starts_is_no_crash_either(sig: int) -> None:
    """The child ignores a stop's signal from its first line of ``_serve``, after Python's start
    and its imports: a signal before then (a loaded host: a CI run caught it) killed it, and its
    grammar was refused as one llguidance crashed on. Read as a kill from outside: tried again."""
    from dlora.services.worker.engine.compile_bound import KILLED, _Child

    child = _Child()
    child.proc.kill()
    child.proc.wait()
    # Both signals' default action set, then said (a pytest-xdist worker ignores SIGINT, and its
    # children inherit that), so that it dies of the signal as a child not yet ignoring it would
    child.proc = subprocess.Popen(
        [sys.executable, "-c", _DEFAULT_ACTIONS_THEN_WAIT], stdout=subprocess.PIPE, stdin=subprocess.DEVNULL
    )
    assert child.proc.stdout is not None and child.proc.stdout.readline() == b"ready\n"
    os.kill(child.proc.pid, sig)
    assert child.death() == KILLED


def test_a_kept_child_that_died_idle_is_replaced_for_the_next_grammar() -> None:
    """A kept child killed while idle (the OOM killer's SIGKILL) is to be replaced by a new one for
    the next grammar; the grammar's write to its closed pipe failed, and so did the close of that
    pipe once the child was reaped: BrokenPipeError out of ``validate``, the request an error."""
    from llguidance import LLMatcher

    from dlora.services.worker.engine.compile_bound import Validator

    validator = Validator()
    assert validator.validate(LLMatcher.grammar_from_json_schema(ORDINARY), 10.0) == ""  # a child kept
    kept = validator._idle[0].proc
    kept.kill()
    kept.wait()
    grammar = LLMatcher.grammar_from_json_schema(ORDINARY.replace("x_", "oom_"))
    assert validator.validate(grammar, 10.0) == ""


def test_a_compilers_process_killed_from_outside_is_no_crash_of_its_grammar() -> None:
    """A child SIGKILLed while it compiled (the host's OOM killer, which takes the largest process,
    or an operator) read as llguidance crashing on the grammar: refused for good, as "failed on
    it", a schema that compiles. It is compiled again on a new child."""
    verdicts, signalled, kept = _verdicts_of_a_compile_whose_child_gets(signal.SIGKILL, "o")
    assert verdicts == [""] and not signalled & kept, (verdicts, signalled, kept)


def test_a_child_that_takes_no_tokenizer_holds_no_compile_for_good(
    tiny_llama: TinyOutput, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The tokenizer's upload to a child (megabytes) was neither timed nor bounded: a kept child
    that stopped reading (stopped, or starved) held the compile's thread, and every request waiting
    on the same grammar, for good. Past ``TOKENIZER_S`` it is killed and the grammar refused for
    now (not kept)."""
    from llguidance import LLMatcher
    from transformers import AutoTokenizer

    from dlora.model.token_bytes import llg_tokenizer_args
    from dlora.services.worker.engine import compile_bound
    from dlora.services.worker.engine.compile_bound import TokenizerSpec, Validator

    hf = AutoTokenizer.from_pretrained(tiny_llama.model)
    spec = TokenizerSpec(*llg_tokenizer_args(hf, len(hf), {hf.eos_token_id}))
    validator = Validator()
    assert validator.validate(LLMatcher.grammar_from_json_schema(ORDINARY), 10.0) == ""  # a child kept
    kept = validator._idle[0].proc
    monkeypatch.setattr(compile_bound, "TOKENIZER_S", 1.0, raising=False)
    os.kill(kept.pid, signal.SIGSTOP)
    try:
        verdicts: list[str | None] = []
        grammar = LLMatcher.grammar_from_json_schema(ORDINARY.replace("x_", "stopped_"))
        thread = threading.Thread(target=lambda: verdicts.append(validator.validate(grammar, 10.0, spec)), daemon=True)
        thread.start()
        thread.join(30)
        assert verdicts == [compile_bound.STARVED], verdicts
        assert kept.poll() is not None, "the child left behind"
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(kept.pid, signal.SIGCONT)


def test_a_kept_child_that_reads_nothing_holds_no_large_constraint_for_good() -> None:
    """A constraint larger than a pipe's room (64 KiB: a 400 KB schema) was written to a kept child
    without a bound, the time bound starting only once it was taken: a child that stopped reading
    (stopped, or starved) held the compile's thread, and every request waiting on the same grammar,
    for good, where a smaller one was refused for now at the bound in wall time. Now both are."""
    from llguidance import LLMatcher

    from dlora.services.worker.engine.compile_bound import STARVED, Validator

    validator = Validator()
    grammar = LLMatcher.grammar_from_json_schema(ORDINARY)
    assert validator.validate(grammar, 10.0) == ""  # a child kept
    kept = validator._idle[0].proc
    os.kill(kept.pid, signal.SIGSTOP)
    try:
        verdicts: list[str | None] = []
        large = grammar + " " * 300_000  # (whitespace after the JSON)
        thread = threading.Thread(target=lambda: verdicts.append(validator.validate(large, 0.2)), daemon=True)
        thread.start()
        thread.join(30)  # (the bound in wall time: 1 s)
        assert verdicts == [STARVED], verdicts
        assert kept.poll() is not None, "the child left behind"
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(kept.pid, signal.SIGKILL)


def test_a_capped_child_compiles_after_a_larger_constraint() -> None:
    """The memory cap counts the compile thread's stack (sized to the constraint): glibc unmaps a
    finished thread's stack only as the next thread is made, after the cap is checked, so a kept
    child's next compile failed to start its thread, read as a refusal (too large), when its stack
    was not the size of the last one. Then the cap, set before the thread started, made its start
    fail at random (its frame, its arena), and Thread.start waited for it for ever (half the runs
    hung): the cap is now set once the thread runs, above what the process holds then."""
    from llguidance import LLMatcher

    from dlora.services.worker.engine.compile_bound import Validator

    validator = Validator()
    grammar = LLMatcher.grammar_from_json_schema(ORDINARY)
    for padding in (300_000, 600_000, 100_000):  # (whitespace after the JSON: stacks of 310, 600, 115 MiB)
        assert validator.validate(grammar + " " * padding, 30.0, None, 100) == "", padding
        assert validator._idle, "no child kept"


# Under an address-space limit (``ulimit -v``) a child whose compile thread, its stack sized to the
# constraint, cannot start; the limit a few hundred MB above the parent's use, the child inheriting it.
UNDER_ULIMIT_V = """
import json
import resource
from llguidance import LLMatcher
from dlora.services.worker.engine.compile_bound import MEMORY, Validator
vm = int(next(line for line in open("/proc/self/status") if line.startswith("VmSize")).split()[1]) * 1024
resource.setrlimit(resource.RLIMIT_AS, (vm + (400 << 20), resource.RLIM_INFINITY))
# a few seconds' compile takes more than 1 MiB above what the child holds
names = {f"^q{i}_[a-z]+$": {"type": "integer"} for i in range(300)}
hungry = LLMatcher.grammar_from_json_schema(json.dumps({"type": "object", "patternProperties": names}))
print("capped", Validator().validate(hungry, 10.0, None, 1) == MEMORY)
grammar = LLMatcher.grammar_from_json_schema('{"type": "string"}')
validator = Validator()
print("large", repr(validator.validate(grammar + " " * 1_000_000, 10.0, None, 4096)))  # a 993 MiB stack
print("after", repr(validator.validate(grammar, 10.0, None, 4096)))
"""


def test_a_compile_thread_refused_by_ulimit_v_is_not_refused_as_past_the_memory_cap() -> None:
    """A compile thread that could not start in the capped child was answered ``MEMORY``, whatever
    refused it: under ``ulimit -v`` a large constraint was a 400 "too large to compile within 4096
    MiB of memory (the server's grammar_compilation_memory_mb)", kept for good, where the cap had
    nothing to do with it (README: such a compile is a 503, to retry). Unchecked now: the
    in-process compile finds its thread refused, a 503 saying so; the cap's own refusal stays."""
    import subprocess

    done = subprocess.run([sys.executable, "-c", UNDER_ULIMIT_V], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.splitlines() == ["capped True", "large '\\x00unchecked'", "after ''"], done.stdout


def test_a_compiler_killed_from_outside_twice_is_a_503_not_kept(monkeypatch: pytest.MonkeyPatch) -> None:
    """Killed from outside on a new child too (the host short of memory), the grammar has no
    verdict: a 503 to retry, and not kept as a refusal (it was kept as "failed on it", a 400 for
    good); the next request compiles it."""
    from dlora.services.worker.engine.compile_bound import KILLED, Validator
    from dlora.services.worker.engine.structured import Grammars, GrammarUnavailable

    verdicts = [KILLED, ""]

    class Killed(Validator):
        def validate(self, grammar: str, bound_s: float, tokenizer: object = None, memory_mb: int = 0) -> str | None:
            return verdicts.pop(0)

    monkeypatch.setattr(structured, "_validator", Killed())
    grammars = Grammars(None, 0, set())
    grammars.__dict__.update(tokenizer=None, tokenizer_spec=None)  # (none here: the validator is a stub)
    params = SamplingParams(json_schema=ORDINARY.replace("x_", "killed_"))
    with pytest.raises(GrammarUnavailable, match="json_schema cannot be compiled now: .* killed"):
        grammars.check(params)
    grammars.check(params)
    assert verdicts == []
