"""The load generator's workload as one value: the CLI's options and the benchmarks build the same
``WorkloadSpec``, the CLI through ``from_args``, each benchmark directly, without argparse."""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import fields, replace

import numpy as np
import pytest

from dlora.loadgen import arrivals, bench_cluster, bench_e2e, bench_policy, bundled, popularity, workload
from dlora.loadgen.spec import WorkloadSpec
from dlora.loadgen.traces import read_azure_functions, read_azure_llm
from dlora.loadgen.vllm_options import SAMPLING
from dlora.services.cli import build_parser

# Options that say where the workload goes and how it is judged, not what it is: plain arguments of
# ``main.run``. Every other loadgen option must be a spec field.
# How the client behaves, not what it sends: not part of the workload.
NOT_WORKLOAD = {
    "command",
    "func",
    "target",
    "base_model",
    "out",
    "slo_ttft",
    "slo_tpot",
    "slo_e2e",
    "max_retries",
    "api_key",
    "max_concurrency",
    "backend",  # how the requests are sent (vLLM's --backend), not what they are
    "endpoint",  # vLLM's spelling of the backend's path
    *SAMPLING,  # sampling fields each request carries, not which requests
    "header",  # HTTP headers each request carries
    "served_model_name",  # the name the base model's requests send
    "append_result",  # how vllm-result.json is written
    "extra_body",
    "num_warmups",  # requests before the workload's, not counted
    "tokenizer",
    "ignore_eos",  # a sampling field the client sends or not (vLLM's --ignore-eos), not which requests
    "percentile_metrics",  # what vllm-result.json writes
    "metric_percentiles",
    "goodput",  # vLLM's spelling of the --slo-* options
    "result_filename",  # vllm-result.json's name, and vLLM's --save-result/--save-detailed: always so
    "save_result",
    "save_detailed",
    "label",  # vllm-result.json's keys
    "metadata",
    "burstiness",  # vLLM's spelling of --arrivals gamma --cv (from_args folds it in)
    "lora_modules",  # vLLM's spelling of --adapter-names (likewise)
    "lora_assignment",  # vLLM's spelling of --popularity uniform or round-robin (likewise)
    "spelled",  # how a length option was spelled (workload_options.Spelled), for its refusal's words
}


def test_spec_defaults_are_the_clis() -> None:
    args = build_parser().parse_args(["loadgen"])
    assert WorkloadSpec.from_args(args) == WorkloadSpec()
    assert set(vars(args)) - NOT_WORKLOAD == {f.name for f in fields(WorkloadSpec)}


def test_from_args_parses_the_cli_spellings_and_options_gives_them_back() -> None:
    args = build_parser().parse_args(
        [
            "loadgen",
            "--requests",
            "7",
            "--duration",
            "9.5",
            "--seed",
            "3",
            "--arrivals",
            "gamma",
            "--rate",
            "1.5",
            "--cv",
            "2",
            "--trace",
            "bundled:azure-conv",
            "--trace",
            "bundled:servegen",
            "--lengths",
            "uniform",
            "--prompt-len",
            "5",
            "--output-len",
            "6",
            "--length-divide",
            "4",
            "--max-prompt",
            "10",
            "--max-output",
            "11",
            "--adapter-names",
            "a,-,b",
            "--popularity",
            "stride",
            "--alpha",
            "1.3",
            "--stride",
            "2",
            "--tenant-window",
            "30",
            "--shift-every",
            "12",
        ]
    )
    spec = WorkloadSpec.from_args(args)
    assert spec.trace == ("bundled:azure-conv", "bundled:servegen") and spec.adapter_names == ("a", None, "b")
    assert workload.adapter_names(spec) == ["a", None, "b"]
    # result.json records the spec as the options that made it
    given = {k: v for k, v in vars(args).items() if k not in NOT_WORKLOAD}
    # as many adapters as the names (--adapters is not given with them); --random-range-ratio is random lengths'
    assert spec.options() == given | {"adapters": 3, "random_range_ratio": 0.0}
    assert WorkloadSpec().options()["trace"] is None and WorkloadSpec().options()["adapter_names"] is None


def test_a_spec_is_a_frozen_value_that_refuses_unknown_choices() -> None:
    spec = WorkloadSpec(rate=3.0)
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.rate = 4.0  # type: ignore[misc]
    assert replace(spec, rate=4.0).rate == 4.0 and hash(spec) == hash(WorkloadSpec(rate=3.0))
    for bad in ({"arrivals": "posson"}, {"lengths": "trace-ish"}, {"popularity": "zip"}, {"trace_format": "csv"}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            WorkloadSpec(**bad)


def refuse_argv(monkeypatch: pytest.MonkeyPatch) -> None:
    """From here on, parsing any argv fails the test: a benchmark's spec must be built directly."""

    def refuse(*_: object, **__: object) -> None:
        pytest.fail("a benchmark parsed argv to build its workload")

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", refuse)
    monkeypatch.setattr(argparse.ArgumentParser, "parse_known_args", refuse)


def test_bench_cluster_builds_the_workload_its_argv_used_to_say(monkeypatch: pytest.MonkeyPatch) -> None:
    args = build_parser().parse_args(
        [
            "bench",
            "cluster",
            "--requests",
            "40",
            "--rate",
            "2.5",
            "--cv",
            "2",
            "--shift-every",
            "7",
            "--max-seconds",
            "30",
            "--seed",
            "5",
        ]
    )
    # the loadgen command line bench cluster used to forge for the same options
    forged = WorkloadSpec.from_args(
        build_parser().parse_args(
            [
                "loadgen",
                "--trace",
                f"{args.traces}/{bundled.AZURE_CONV}",
                "--requests",
                "40",
                "--rate",
                "2.5",
                "--arrivals",
                "gamma",
                "--cv",
                "2",
                "--lengths",
                "trace",
                "--length-divide",
                str(args.length_divide),
                "--max-prompt",
                str(args.max_prompt),
                "--max-output",
                str(args.max_output),
                "--adapters",
                str(args.adapters),
                "--popularity",
                "zipf",
                "--alpha",
                "1.2",
                "--shift-every",
                "7",
                "--duration",
                "30",
                "--seed",
                "5",
            ]
        )
    )
    refuse_argv(monkeypatch)
    spec = bench_cluster.workload_spec(args)
    assert spec == forged
    assert len(workload.build_specs(spec)) == 40


def test_bench_policy_and_e2e_specs_are_their_papers_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    traces = bundled.data_dir()
    functions = read_azure_functions(traces / bundled.AZURE_FUNCTIONS)
    trace = read_azure_llm(traces / bundled.AZURE_CONV).rows
    policy_args = build_parser().parse_args(["bench", "policy", "--requests", "30", "--adapters", "8"])
    e2e_args = build_parser().parse_args(["bench", "e2e", "--adapters", "8", "--stride", "2"])
    refuse_argv(monkeypatch)

    # policy (Fig. 10): Poisson arrivals, lengths drawn from the trace, stride popularity clipped at n
    args = policy_args
    spec = replace(bench_policy.workload_spec(args), rate=1.7, stride=4)
    scaling = workload.LengthScaling(args.length_divide, args.max_prompt, args.max_output)
    rng = np.random.default_rng(args.seed)
    weights = popularity.stride(functions.totals(), 8, 4, cap_rank=8)
    assert workload.adapter_weights(spec, workload.load_traces(spec)[1]) == weights
    assert workload.build_specs(spec) == workload.build(arrivals.gamma(1.7, 1.0, 30, rng), weights, trace, rng, scaling)
    assert spec.duration == args.max_seconds

    # e2e (Fig. 8/9): the trace's own first requests, timestamps rescaled to the rate, lengths in order
    args = e2e_args
    spec = bench_e2e.workload_spec(args, 0.5)
    count = int(min(args.max_requests, max(args.min_requests, 0.5 * args.window)))
    scaling = workload.LengthScaling(args.length_divide, args.max_prompt, args.max_output)
    rng = np.random.default_rng(args.seed)
    weights = popularity.stride(functions.totals(), 8, 2, cap_rank=8)
    expected = workload.build(
        arrivals.replay([r.t for r in trace[:count]], rate=0.5),
        weights,
        trace[:count],
        rng,
        scaling,
        lengths_in_order=True,
    )
    assert spec.requests == count and workload.build_specs(spec) == expected


def test_the_results_never_hold_the_target_s_password() -> None:
    """result.json and report.html get shared and committed: a NATS URL's password is masked."""
    from dlora.loadgen.clients import redacted as _redacted

    assert _redacted("nats://app:s3cret@127.0.0.1:4222") == "nats://app:***@127.0.0.1:4222"
    assert _redacted("http://127.0.0.1:8000") == "http://127.0.0.1:8000"


async def test_an_unreachable_nats_target_is_an_error_not_a_retry_for_ever() -> None:
    """nats-py's defaults retried a refused or missing server for two minutes, a traceback a second."""
    import pytest

    from dlora.loadgen.clients import NatsClient
    from dlora.services.servers import free_port

    with pytest.raises(OSError, match=r"cannot connect to NATS at nats://app:\*\*\*@127\.0\.0\.1:\d+") as e:
        await NatsClient.connect(f"nats://app:secret@127.0.0.1:{free_port()}", clock=lambda: 0.0)
    assert "secret" not in str(e.value)


@pytest.mark.parametrize("option", ["--prompt-len", "--output-len", "--max-prompt", "--max-output"])
def test_a_length_option_below_one_token_is_a_usage_error_naming_it(
    option: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """A new user's trial: -5 became 1 token silently, 0 failed every request at the server."""
    for value in ("0", "-5"):
        with pytest.raises(SystemExit):
            build_parser().parse_args(["loadgen", option, value])
        assert option in capsys.readouterr().err


@pytest.mark.parametrize(
    "option", ["--rate", "--cv", "--duration", "--length-divide", "--alpha", "--tenant-window", "--shift-every"]
)
def test_a_number_option_refuses_nan_and_infinity_by_name(option: str, capsys: pytest.CaptureFixture[str]) -> None:
    """A user's trial: --rate nan, --cv nan and --duration nan ran and wrote NaN into result.json
    (not JSON); --alpha nan failed deep inside, naming no option; --shift-every -5 was taken.
    (--rate inf is taken: vLLM's --request-rate inf, below.)"""
    for value in ("nan", "-inf") if option == "--rate" else ("nan", "inf", "-inf"):
        with pytest.raises(SystemExit):
            build_parser().parse_args(["loadgen", option, value])
        assert option in capsys.readouterr().err
    if option != "--alpha":  # a rate, a spread or a span: above 0
        with pytest.raises(SystemExit):
            build_parser().parse_args(["loadgen", option, "-5"])


@pytest.mark.parametrize("given", ["--arrivals poisson", "--arrivals gamma --cv 3", "--arrivals trace"])
def test_rate_inf_sends_every_request_at_once_and_is_recorded_as_vllm_does(given: str) -> None:
    """vLLM's default --request-rate inf (with --max-concurrency, the usual closed-loop run) was
    refused as "not a finite number"; taken, it must put every arrival at 0 and not write
    JSON's invalid Infinity into result.json: vLLM's record says "inf"."""
    import json

    args = build_parser().parse_args(["loadgen", "--rate", "inf", "--requests", "12", *given.split()])
    spec = WorkloadSpec.from_args(args)
    assert [r.arrival_s for r in workload.build_specs(spec)] == [0.0] * 12
    assert json.loads(json.dumps(spec.options(), allow_nan=False))["rate"] == "inf"


async def test_a_tls_target_is_a_nats_server(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """tls:// was accepted as a NATS URL and then handed to the HTTP client ("NonHttpUrlClientError")."""
    from rich.console import Console

    from dlora.loadgen import main
    from dlora.services.servers import free_port

    url = f"tls://127.0.0.1:{free_port()}"
    args = build_parser().parse_args(["loadgen", "--target", url, "--requests", "1"])
    with pytest.raises(OSError, match=f"cannot connect to NATS at {url}"):
        await main.run(WorkloadSpec.from_args(args), args.target, tmp_path, Console(quiet=True))


def test_a_length_option_given_where_it_does_nothing_is_named() -> None:
    """`--lengths uniform --max-prompt 256` (a BENCHMARKS command) ran with prompts of 1-32 tokens,
    --prompt-len's default: --max-prompt caps trace lengths only. Not given, each takes its default."""
    from dlora.services.cli import build_parser

    def problem(*argv: str) -> str | None:
        return WorkloadSpec.unused_option(build_parser().parse_args(["loadgen", *argv]))

    assert problem("--lengths", "uniform", "--max-prompt", "256") == (
        "--max-prompt applies to --lengths trace only, not uniform"
    )
    assert problem("--lengths", "trace", "--output-len", "8") == (
        "--output-len applies to --lengths fixed, uniform or random only, not trace"
    )
    assert problem("--lengths", "uniform", "--prompt-len", "256") is None and problem("--max-output", "9") is None
    # the same kind beyond lengths (a user's trial: recorded in result.json as if used)
    assert problem("--cv", "3") == "--cv applies to --arrivals gamma only, not poisson"
    assert problem("--alpha", "2") == "--alpha applies to --popularity zipf or power only, not uniform"
    assert problem("--popularity", "zipf", "--stride", "4") == "--stride applies to --popularity stride only, not zipf"
    assert problem("--adapters", "3", "--adapter-names", "a,b") is not None
    assert problem("--arrivals", "gamma", "--cv", "3", "--popularity", "power", "--alpha", "2") is None
    assert "--trace-format applies to the files --trace names" in (problem("--trace-format", "mooncake") or "")
    assert problem("--trace-format", "mooncake", "--trace", "t.jsonl") is None
    # a user's trial: "" meant the default count, and a,a one adapter
    for names, why in (("a,,b", "empty name: write - for the base model"), ("", "empty name"), ("a,b, a", "a more")):
        with pytest.raises(ValueError, match=why):
            WorkloadSpec.from_args(build_parser().parse_args(["loadgen", "--adapter-names", names]))
    spec = WorkloadSpec.from_args(build_parser().parse_args(["loadgen", "--adapter-names", "a, -,b "]))
    assert spec.adapter_names == ("a", None, "b") and spec.adapters == 3
    spec = WorkloadSpec.from_args(build_parser().parse_args(["loadgen", "--lengths", "fixed", "--prompt-len", "7"]))
    assert (spec.prompt_len, spec.max_prompt, spec.length_divide) == (7, WorkloadSpec().max_prompt, 1.0)


def test_bench_cluster_stops_at_a_run_ctrl_c_or_sigterm_interrupted(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """The load generator's run hears Ctrl-C and SIGTERM and returns its partial report; bench
    cluster then started the next configuration's stack and run, so neither stopped it."""
    started: list[str] = []

    class Stack:
        app_nats_url, metrics_urls = "nats://x", {}

        def __init__(self, *_: object, **__: object) -> None:
            started.append("stack")

        def start(self) -> None: ...

        def stop(self) -> None:
            started.append("stopped")

    async def interrupted(*_: object, **__: object) -> dict:
        figures = {"sent": 1, "completed": 0, "lost": 0, "throughput_tok_s": 0.0}
        return figures | {
            "normalized_latency_s": {"mean": 1.0, "p90": 1.0},
            "interrupted": True,
            "stopped_by": "SIGTERM",
        }

    monkeypatch.setattr(bench_cluster, "ensure_model", lambda *_, **__: tmp_path)
    monkeypatch.setattr(bench_cluster, "balancing_bound", lambda *_: {})
    monkeypatch.setattr(bench_cluster, "LocalStack", Stack)
    monkeypatch.setattr(bench_cluster, "run_loadgen", interrupted)
    monkeypatch.setattr(bench_cluster, "step_cycles", lambda *_: {})
    args = build_parser().parse_args(["bench", "cluster", "--out", str(tmp_path)])
    with pytest.raises(SystemExit) as e:
        bench_cluster.run(args)
    assert e.value.code == 143 and started == ["stack", "stopped"]


@pytest.mark.parametrize(
    "refusal", [ValueError("current limit exceeds maximum limit"), ValueError("not allowed to raise maximum limit")]
)
def test_an_open_file_limit_that_cannot_be_raised_does_not_stop_the_run(
    refusal: ValueError, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Raising the soft open-file limit is a help, not the run's condition: where setrlimit refuses
    (macOS refuses a soft limit past OPEN_MAX though `ulimit -Hn` says unlimited; a sandbox's seccomp
    refuses it), the run failed before sending, "dlora loadgen: current limit exceeds maximum limit",
    exit 2. It runs at the limit it has, and says so."""
    import io
    import resource

    from rich.console import Console

    from dlora.loadgen.main import allow_open_files

    def refuse(_: int, __: tuple[int, int]) -> None:
        raise refusal

    monkeypatch.setattr(resource, "getrlimit", lambda _: (256, resource.RLIM_INFINITY))
    monkeypatch.setattr(resource, "setrlimit", refuse)
    console = Console(file=(said := io.StringIO()), width=300)
    allow_open_files(20_000, console)
    assert "256" in said.getvalue() and "--max-concurrency" in said.getvalue()
