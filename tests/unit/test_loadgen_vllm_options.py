"""``dlora loadgen`` takes the options a ``vllm bench serve`` user types first, with vLLM's meanings."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import pytest

from dlora.loadgen import vllm_record
from dlora.loadgen.metrics import SLO, RequestResult, summarize
from dlora.loadgen.spec import WorkloadSpec
from dlora.loadgen.vllm_options import slo_seconds
from dlora.loadgen.vllm_record import _burstiness
from dlora.loadgen.workload import build_specs
from dlora.services.cli import build_parser


def test_vllms_spellings_of_the_workload_and_slo_options_are_taken() -> None:
    """``--num-prompts 7 --request-rate 4 --burstiness 0.25 --goodput ttft:500 e2el:2000`` was refused
    (unrecognized arguments): the user had to find loadgen's names (--requests, --rate, --arrivals
    gamma --cv, --slo-* in seconds) for each. Each is taken with vLLM's meaning: burstiness the gamma
    shape (CV 1/sqrt(B), recorded back as vLLM's burstiness), goodput's SLOs in milliseconds."""
    argv = ["loadgen", "--num-prompts", "7", "--request-rate", "4", "--burstiness", "0.25"]
    args = build_parser().parse_args([*argv, "--goodput", "ttft:500", "e2el:2000"])
    assert WorkloadSpec.unused_option(args) is None
    spec = WorkloadSpec.from_args(args)
    assert (spec.requests, spec.rate, spec.arrivals, spec.cv) == (7, 4.0, "gamma", 2.0)
    assert _burstiness(spec.options()) == pytest.approx(0.25)
    assert slo_seconds(args) == {"slo_ttft": 0.5, "slo_tpot": None, "slo_e2e": 2.0}
    plain = build_parser().parse_args(["loadgen", "--request-rate", "inf", "--slo-tpot", "0.05"])
    assert math.isinf(WorkloadSpec.from_args(plain).rate) and WorkloadSpec.from_args(plain).arrivals == "poisson"
    assert slo_seconds(plain) == {"slo_ttft": None, "slo_tpot": 0.05, "slo_e2e": None}


def test_burstiness_inf_sends_at_even_gaps_as_vllms_does() -> None:
    """``--burstiness inf`` was a usage error ("not a finite number"); vLLM's bench takes it as the
    gamma's limit, every gap 1/rate (a steady load). Arrivals are so drawn, and the record says
    "inf", as it writes an infinite request_rate (JSON has no infinity)."""
    args = build_parser().parse_args(["loadgen", "--num-prompts", "4", "--request-rate", "8", "--burstiness", "inf"])
    assert WorkloadSpec.unused_option(args) is None
    spec = WorkloadSpec.from_args(args)
    assert (spec.arrivals, spec.cv) == ("gamma", 0.0)
    assert [r.arrival_s for r in build_specs(spec)] == [0.125, 0.25, 0.375, 0.5]
    assert _burstiness(spec.options()) == "inf"


@pytest.mark.parametrize(
    ("argv", "said"),
    [
        (["--burstiness", "1e-320"], "--burstiness: 9.99989e-321 is too small"),
        (["--cv", "1e200"], "--cv: 1e+200 is too large"),
        # (its square 0 or subnormal: a shape of 1/0, ZeroDivisionError, or inf, arrivals all nan)
        (["--cv", "1e-170"], "--cv: 1e-170 is too small"),
        (["--cv", "1e-155"], "--cv: 1e-155 is too small"),
    ],
)
def test_a_gamma_shape_no_float_holds_is_a_usage_error(
    argv: list[str], said: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """A CV whose square overflows (``--cv 1e200``, or ``--burstiness 1e-320``'s 1/sqrt) ended the
    run in an OverflowError traceback from the arrivals' draw."""
    with pytest.raises(SystemExit):
        build_parser().parse_args(["loadgen", "--arrivals", "gamma", *argv])
    assert said in capsys.readouterr().err


def test_vllms_names_of_the_target_the_model_and_the_endpoint_are_taken() -> None:
    """``--base-url URL --model NAME --backend openai-chat --endpoint /v1/chat/completions``, how a
    vLLM bench command line names where it sends: each refused by dlora loadgen (its --target,
    --base-model, and no --endpoint at all)."""
    argv = ["--base-url", "http://10.0.0.2:8000", "--model", "llama", "--backend", "openai-chat"]
    args = build_parser().parse_args(["loadgen", *argv, "--endpoint", "/v1/chat/completions"])
    assert (args.target, args.base_model, args.endpoint) == ("http://10.0.0.2:8000", "llama", "/v1/chat/completions")


def test_vllms_lora_modules_are_the_adapters_requests_go_to() -> None:
    """``--lora-modules sql-lora chat-lora``, vLLM's bench's multi-LoRA option (each request to one
    of them at random) was refused; it names the adapters, drawn by the popularity (uniform: vLLM's
    random assignment), recorded as --adapter-names."""
    args = build_parser().parse_args(["loadgen", "--lora-modules", "sql-lora", "chat-lora", "--num-prompts", "50"])
    assert WorkloadSpec.unused_option(args) is None
    spec = WorkloadSpec.from_args(args)
    assert (spec.adapter_names, spec.adapters) == (("sql-lora", "chat-lora"), 2)
    assert spec.options()["adapter_names"] == "sql-lora,chat-lora"
    assert {r.adapter for r in build_specs(spec)} == {"sql-lora", "chat-lora"}


def test_vllms_lora_assignment_round_robin_takes_the_adapters_in_turn() -> None:
    """``--lora-modules a b c --lora-assignment round-robin`` (vLLM's bench since its multi-LoRA
    assignment option: each request to the next adapter, deterministically) was refused
    (unrecognized arguments). The adapters now go in turn in arrival order; ``random`` is
    --popularity uniform, vLLM's default; given with --popularity it is a usage error."""
    argv = ["loadgen", "--lora-modules", "a", "b", "c", "--num-prompts", "7", "--lora-assignment"]
    args = build_parser().parse_args([*argv, "round-robin"])
    assert WorkloadSpec.unused_option(args) is None
    spec = WorkloadSpec.from_args(args)
    assert spec.popularity == "round-robin" and spec.options()["popularity"] == "round-robin"
    assert [r.adapter for r in build_specs(spec)] == ["a", "b", "c", "a", "b", "c", "a"]
    random = WorkloadSpec.from_args(build_parser().parse_args([*argv, "random"]))
    assert random == dataclasses.replace(spec, popularity="uniform")
    both = build_parser().parse_args([*argv, "random", "--popularity", "zipf"])
    assert "give it or --popularity, not both" in str(WorkloadSpec.unused_option(both))


@pytest.mark.parametrize("popularity", ["uniform", "zipf"])
def test_lora_assignment_beside_popularity_is_refused_even_where_it_names_the_default(popularity: str) -> None:
    """``--popularity uniform --lora-assignment round-robin`` says two things: it ran round-robin
    silently, the --popularity typed dropped, because only a --popularity other than the default
    was seen as given (a reviewer's trial against a fake server). Refused, as beside zipf; the
    default with neither is still uniform, and --alpha is still judged by the popularity in force."""
    argv = ["loadgen", "--lora-modules", "a", "b", "--lora-assignment", "round-robin", "--popularity", popularity]
    assert "not both" in str(WorkloadSpec.unused_option(build_parser().parse_args(argv)))
    assert WorkloadSpec.from_args(build_parser().parse_args(["loadgen"])).popularity == "uniform"
    alpha = build_parser().parse_args(["loadgen", "--alpha", "1.2"])
    assert "--alpha applies to --popularity zipf or power only, not uniform" == WorkloadSpec.unused_option(alpha)


def test_round_robin_with_shift_every_still_takes_every_adapter_in_turn() -> None:
    """--shift-every rotated each request's adapter by one every that many seconds, over the turn
    round-robin had already taken: at 2 req/s, 3 adapters, every 1 s, the turn read lora-0, lora-2,
    lora-0, lora-2, ..., lora-1 never sent to (a reviewer's trial). Equal shares rotate to
    themselves: a spec (a benchmark's) keeps the turn, and the command line refuses the pair."""
    spec = WorkloadSpec(
        requests=6, rate=2.0, arrivals="gamma", cv=0.0, adapters=3, popularity="round-robin", shift_every=1.0
    )
    assert [r.adapter for r in build_specs(spec)] == ["lora-0", "lora-1", "lora-2"] * 2
    for given in (["--popularity", "round-robin"], ["--lora-modules", "a", "b", "--lora-assignment", "round-robin"]):
        args = build_parser().parse_args(["loadgen", *given, "--shift-every", "10"])
        assert "--shift-every applies to --popularity" in str(WorkloadSpec.unused_option(args))
        assert "not round-robin" in str(WorkloadSpec.unused_option(args))


def test_vllms_model_with_no_adapters_named_is_where_every_request_goes() -> None:
    """``vllm bench serve --model lora-0 ...`` (no --lora-modules) sends every request to lora-0; dlora
    loadgen sent them to its default adapters lora-0 .. lora-3, and against a stack serving two
    adapters 12 of 20 failed with a 404 (a new user's run of the README's vLLM command line). Named
    adapters, or loadgen's own --base-model, keep loadgen's meaning."""
    args = build_parser().parse_args(["loadgen", "--model", "lora-0", "--num-prompts", "20"])
    assert WorkloadSpec.unused_option(args) is None and args.base_model == "lora-0"
    spec = WorkloadSpec.from_args(args)
    assert (spec.adapter_names, spec.adapters) == ((None,), 1)
    assert {r.adapter for r in build_specs(spec)} == {None}  # None: the request names the base model
    lora = build_parser().parse_args(["loadgen", "--model", "llama", "--lora-modules", "a", "b"])
    assert WorkloadSpec.from_args(lora).adapter_names == ("a", "b") and lora.base_model == "llama"
    own = build_parser().parse_args(["loadgen", "--base-model", "llama"])
    assert WorkloadSpec.from_args(own).adapters == 4 and WorkloadSpec.from_args(own).adapter_names is None


@pytest.mark.parametrize(
    "argv, refusal",
    [
        (["--goodput", "ttft:500", "--slo-ttft", "1"], "--goodput sets --slo-ttft that is given already"),
        (["--burstiness", "2", "--arrivals", "gamma", "--cv", "3"], "give it or --cv"),
        (["--burstiness", "2", "--arrivals", "trace"], "not with --arrivals trace"),
        (["--lora-modules", "a", "b", "--adapters", "3"], "give it, --adapter-names or --adapters, one of them"),
        (["--lora-modules", "a", "a"], "names a more than once"),
        # vLLM's bench posted the completions body to the chat path (every request failed)
        (["--endpoint", "/v1/chat/completions"], "--endpoint /v1/chat/completions is not --backend openai's"),
        # a key of the record's own: one of the two lost after the run
        (["--metadata", "tp=1", "date=today"], "--metadata date: vllm-result.json has that key"),
        (["--metric-percentiles", "99.9", "--metadata", "p99.9_ttft_ms=1"], "p99.9_ttft_ms: vllm-result.json"),
        # a logprobs the --backend's API refuses: every request of the run was a 400
        (["--extra-body", '{"logprobs": 6}'], "--extra-body: logprobs must be in [0, 5], got 6."),
    ],
)
def test_vllms_options_given_with_loadgens_own_for_the_same_thing_are_refused(
    argv: list[str], refusal: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = build_parser().parse_args(["loadgen", "--requests", "1", "--out", str(tmp_path), *argv])
    assert args.func(args) == 2
    assert refusal in capsys.readouterr().err


@pytest.mark.parametrize(
    "extra, named",
    [
        ('{"max_tokens": 999, "seed": 7}', "max_tokens: the workload's own"),
        ('{"model": "lora-1"}', "--model, --lora-modules or --adapter-names"),
        ('{"stream": false, "max_completion_tokens": 5}', "max_completion_tokens, stream: the workload's own"),
    ],
)
def test_an_extra_body_field_loadgen_sends_of_its_own_is_a_usage_error_naming_it(
    extra: str, named: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """vLLM's bench sends --extra-body over its own body (``{"max_tokens": 999}`` is sent); dlora
    loadgen dropped such fields silently, so the run measured lengths, a model or a stream other
    than the command asked for. Refused, naming the field and the option that sets it; the
    other fields are taken."""
    with pytest.raises(SystemExit):
        build_parser().parse_args(["loadgen", "--extra-body", extra])
    err = capsys.readouterr().err
    assert "--extra-body" in err and named in err
    fine = build_parser().parse_args(["loadgen", "--extra-body", '{"seed": 7, "ignore_eos": false}'])
    assert fine.extra_body == {"seed": 7, "ignore_eos": False}


@pytest.mark.parametrize("pair", ["ttft=500", "queue:5", "ttft:-1", "tpot:x"])
def test_a_goodput_pair_not_vllms_is_a_usage_error(pair: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        build_parser().parse_args(["loadgen", "--goodput", pair])
    assert "--goodput" in capsys.readouterr().err


def test_a_goodput_of_zero_ms_is_taken_as_vllm_takes_it() -> None:
    """``--goodput ttft:0`` was a usage error ("0.0 is not above 0"); vLLM's bench takes any bound
    that is not negative, so a sweep of SLOs from 0 stopped at its first value. It is a bound only a
    request with no wait meets: none by TTFT; by TPOT a one-token output (vLLM's TPOT 0 there)."""
    args = build_parser().parse_args(["loadgen", "--goodput", "ttft:0", "tpot:0"])
    assert slo_seconds(args) == {"slo_ttft": 0.0, "slo_tpot": 0.0, "slo_e2e": None}
    # loadgen's own spelling takes it too (it was refused, "0.0 is not above 0", where --goodput took it)
    own = build_parser().parse_args(["loadgen", "--slo-ttft", "0", "--slo-tpot", "0", "--slo-e2e", "0"])
    assert slo_seconds(own) == {"slo_ttft": 0.0, "slo_tpot": 0.0, "slo_e2e": 0.0}
    one, two = (
        RequestResult(0.0, None, n, sent=True, first_token_s=0.1, finish_s=0.1 * n, tokens=n, token_times=[0.1 * n])
        for n in (1, 2)
    )
    assert not SLO(ttft_s=0.0).met(one) and SLO(tpot_s=0.0).met(one) and not SLO(tpot_s=0.0).met(two)
    summary = summarize([one, two], 1.0, SLO(tpot_s=0.0))
    assert vllm_record.record({"slo_tpot": 0.0}, summary, [one, two])["request_goodput"] == 1.0


def test_vllms_random_dataset_lengths_are_drawn_as_vllm_draws_them() -> None:
    """``--dataset-name random --random-input-len 100 --random-output-len 10 --random-range-ratio 0.5``,
    vLLM's most common workload, was refused: loadgen's nearest (--lengths uniform) draws in [1, len].
    vLLM draws each length uniformly in [floor(len (1 - r)), ceil(len (1 + r))], an output at least
    one token; ratio 0 is the lengths themselves; 1 and above refused (an input could be empty)."""
    argv = ["loadgen", "--dataset-name", "random", "--random-input-len", "100", "--random-output-len", "3"]
    args = build_parser().parse_args([*argv, "--random-range-ratio", "0.5", "--num-prompts", "400"])
    assert WorkloadSpec.unused_option(args) is None
    spec = WorkloadSpec.from_args(args)
    assert (spec.lengths, spec.prompt_len, spec.output_len, spec.random_range_ratio) == ("random", 100, 3, 0.5)
    requests = build_specs(spec)
    assert {r.prompt_len for r in requests} <= set(range(50, 151)) and {r.output_len for r in requests} == {
        1,
        2,
        3,
        4,
        5,
    }
    assert min(r.prompt_len for r in requests) < 60 and max(r.prompt_len for r in requests) > 140
    exact = build_specs(WorkloadSpec.from_args(build_parser().parse_args(argv)))
    assert {(r.prompt_len, r.output_len) for r in exact} == {(100, 3)}
    for bad in ("1", "-0.1"):
        with pytest.raises(SystemExit):
            build_parser().parse_args([*argv, "--random-range-ratio", bad])
    with pytest.raises(ValueError, match="random_range_ratio"):
        WorkloadSpec(lengths="random", random_range_ratio=1.0)
    given = build_parser().parse_args(["loadgen", "--lengths", "fixed", "--random-range-ratio", "0.2"])
    said = "--random-range-ratio applies to --lengths random only, not fixed (vLLM's random dataset: give "
    said += "--dataset-name random)"
    assert WorkloadSpec.unused_option(given) == said


def test_vllms_general_input_length_is_the_prompts() -> None:
    """``vllm bench serve ... --dataset-name random --input-len 100 --output-len 10``, the lengths as
    vLLM's own usage line spells them, was refused: --input-len (which vLLM maps to
    --random-input-len) was unknown, though its --output-len was taken."""
    argv = ["loadgen", "--dataset-name", "random", "--input-len", "100", "--output-len", "10"]
    spec = WorkloadSpec.from_args(build_parser().parse_args(argv))
    assert (spec.lengths, spec.prompt_len, spec.output_len) == ("random", 100, 10)


def test_vllms_backend_vllm_is_its_openai(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``vllm bench serve --backend vllm --endpoint /v1/completions``, as vLLM's docs' examples
    spell it (its bench sends the completions body for both names), was refused: loadgen knew
    openai and openai-chat only."""
    args = build_parser().parse_args(["loadgen", "--backend", "vllm", "--endpoint", "/v1/completions"])
    assert (args.backend, args.endpoint) == ("vllm", "/v1/completions")
    assert WorkloadSpec.unused_option(args) is None
    chat = build_parser().parse_args(["loadgen", "--backend", "vllm", "--endpoint", "/v1/chat/completions"])
    chat.out = str(tmp_path)
    assert chat.func(chat) == 2 and "is not --backend vllm's (/v1/completions)" in capsys.readouterr().err


def test_vllms_top_k_minus_one_is_all_tokens() -> None:
    """``--top-k -1``, vLLM's spelling of "every token" (its bench passes any integer; dlora's
    servers take -1 as vLLM's do), was refused by loadgen as below 0."""
    from dlora.loadgen.vllm_options import sampling_of

    assert sampling_of(build_parser().parse_args(["loadgen", "--top-k", "-1"])) == {"top_k": -1}
    with pytest.raises(SystemExit):
        build_parser().parse_args(["loadgen", "--top-k", "-2"])


@pytest.mark.parametrize(
    "option, value", [("--min-p", "1.5"), ("--presence-penalty", "-3"), ("--frequency-penalty", "2.5")]
)
def test_a_sampling_option_out_of_the_servers_range_is_a_usage_error(
    option: str, value: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """Sent, every request of the run would be answered 400: refused before the run, naming it."""
    with pytest.raises(SystemExit):
        build_parser().parse_args(["loadgen", option, value])
    assert option in capsys.readouterr().err


@pytest.mark.parametrize("item", ["X Tenant=blue", "X-Tenant", "=blue", "X:Tenant=blue"])
def test_a_header_that_is_no_http_field_is_a_usage_error(item: str, capsys: pytest.CaptureFixture[str]) -> None:
    """A name that is no HTTP token (a space, a colon) is no header a server reads as written, and
    KEY without =VALUE none at all: refused before the run, naming the option."""
    with pytest.raises(SystemExit):
        build_parser().parse_args(["loadgen", "--header", item])
    assert "--header" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [["--header", "X-Tenant=blue"], ["--served-model-name", "m"]])
def test_http_request_options_are_refused_with_a_nats_target(
    argv: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A NATS request has no HTTP headers and names no model: dropped silently, the run would not
    be the one asked for."""
    args = build_parser().parse_args(["loadgen", "--target", "nats://127.0.0.1:1", "--out", str(tmp_path), *argv])
    assert args.func(args) == 2 and "is for HTTP targets, not a NATS one" in capsys.readouterr().err


@pytest.mark.parametrize(
    "option, named",
    [
        ("--random-input-len", "--random-input-len applies to --lengths"),
        ("--random-output-len", "--random-output-len applies to --lengths"),
        ("--input-len", "--input-len applies to --lengths"),
        ("--prompt-len", "--prompt-len applies to --lengths"),
    ],
)
def test_a_length_option_that_does_nothing_is_refused_by_the_name_typed(option: str, named: str) -> None:
    """``--random-input-len 1024`` without ``--dataset-name random`` (the lengths are the trace's)
    was refused as "--prompt-len applies to ...": an option the vLLM user never wrote."""
    problem = WorkloadSpec.unused_option(build_parser().parse_args(["loadgen", option, "8"]))
    assert problem is not None and problem.startswith(named)
    assert ("give --dataset-name random" in problem) == option.startswith("--random-")
    taken = build_parser().parse_args(["loadgen", "--dataset-name", "random", option, "8"])
    assert WorkloadSpec.unused_option(taken) is None


def test_the_cli_builds_one_run_options_object_whose_defaults_are_the_dataclasss() -> None:
    """``run`` took 13 keyword arguments, each copied from the command line by hand: the CLI, the
    benchmarks and the tests build one ``RunOptions`` now, and the CLI's defaults are its own."""
    from dlora.loadgen.main import RunOptions

    assert RunOptions.from_args(build_parser().parse_args(["loadgen"])) == RunOptions()
    argv = ["loadgen", "--max-concurrency", "3", "--temperature", "0.5", "--header", "X-A=1", "--goodput", "ttft:200"]
    given = RunOptions.from_args(build_parser().parse_args([*argv, "--no-ignore-eos", "--backend", "openai-chat"]))
    assert (given.max_concurrency, given.sampling, given.headers) == (3, {"temperature": 0.5}, {"X-A": "1"})
    assert (given.slo, given.ignore_eos, given.backend) == (SLO(ttft_s=0.2), False, "openai-chat")
