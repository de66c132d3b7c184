"""``dlora loadgen`` options. Kept apart from the runner so the CLI builds its parser without
importing matplotlib, rich or the clients. The workload's defaults are ``WorkloadSpec``'s, declared
there once."""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Callable
from typing import Any, get_args

from dlora.common.integers import integer_fields
from dlora.common.sampling import BODY_RANGES, RANGES, SamplingParams
from dlora.loadgen.spec import LORA_ASSIGNMENTS, Arrivals, Lengths, Popularity, RampUp, WorkloadSpec
from dlora.loadgen.traces import FORMATS

_SPEC = WorkloadSpec()


def _at_least(convert: Callable[[str], Any], low: float, strict: bool = False) -> Callable[[str], Any]:
    """An argparse type: ``convert(text)``, finite and at least ``low`` (above it when
    ``strict``); a usage error naming the option otherwise, not a traceback from deep inside (or a
    NaN that every comparison lets through, into the results as JSON's invalid ``NaN``)."""

    def parse(text: str) -> Any:
        try:
            value = convert(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"{text!r} is not {'an integer' if convert is int else 'a number'}"
            ) from None
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
        if value < low or (strict and value == low):
            raise argparse.ArgumentTypeError(f"{value} is {'not above' if strict else 'below'} {low:g}")
        return value

    return parse


count = _at_least(int, 0)  # also make-tiny's
positive = _at_least(int, 1)  # also the simulator's and make-tiny's
above_zero = _at_least(float, 0, strict=True)
_finite = _at_least(float, -math.inf)


# The tables' integer fields (``SamplingParams``' types, and the bodies' counts): top_k 2.5 is a 400
# at dlora's gateway and vLLM's
WHOLE = integer_fields(SamplingParams) & RANGES.keys() | BODY_RANGES.keys()


def sampling_value(name: str) -> Callable[[str], float]:
    """An argparse type: a value of the sampling field ``name`` (an integer where it is one, top_k)
    inside its range in ``common.sampling.RANGES``, refused in the words the gateway's 400 and the
    engine say it (out of it, every request of the run would be refused)."""
    finite = _at_least(int if name in WHOLE else float, -math.inf)

    def parse(text: str) -> float:
        value = finite(text)
        if (why := RANGES[name].problem(name, value)) is not None:
            raise argparse.ArgumentTypeError(why)
        return value  # type: ignore[no-any-return]

    return parse


def rate(text: str) -> float:
    """An argparse type: a rate above 0, or ``inf`` (every request at once, vLLM's default
    ``--request-rate inf``, which vLLM users pair with ``--max-concurrency``: it was refused as
    "not a finite number"). NaN and -inf stay refused."""
    if text.strip().lower() in ("inf", "infinity", "+inf", "+infinity"):
        return math.inf
    return above_zero(text)


def gamma_cv(text: str) -> float:
    """An argparse type: a gamma arrivals' CV above 0 whose shape, 1 / CV², is above 0 (a CV past
    ~1e154 overflowed its square into a traceback)."""
    cv = above_zero(text)
    if not math.isfinite(cv * cv):
        raise argparse.ArgumentTypeError(f"{cv:g} is too large: the gamma's shape 1/cv² would be 0")
    # (below ~1e-154 its square is 0 or subnormal: a shape of 1/0, or inf and every arrival nan)
    if cv * cv < sys.float_info.min or not math.isfinite(1 / (cv * cv)):
        raise argparse.ArgumentTypeError(f"{cv:g} is too small: the gamma's shape 1/cv² would overflow")
    return cv


def burstiness(text: str) -> float:
    """An argparse type: vLLM's gamma shape, above 0 or ``inf`` (``rate``), and not so small that
    its CV, 1/sqrt(shape), squares past a float (``gamma_cv``): ``--burstiness 1e-320`` was a
    traceback."""
    shape = rate(text)
    if not math.isfinite(1 / shape) and shape != math.inf:
        raise argparse.ArgumentTypeError(f"{shape:g} is too small: the gamma's CV 1/sqrt(it) would overflow")
    return shape


# vLLM's benchmark's names for the completions and the chat completions APIs (its --backend; its
# "vllm" is its "openai", the spelling of vLLM's docs' examples)
ENDPOINTS = {"openai": "/v1/completions", "vllm": "/v1/completions", "openai-chat": "/v1/chat/completions"}
BACKENDS = tuple(ENDPOINTS)  # the path each posts to

# A target with one of these schemes is a NATS server (nats-py's: tls:// is NATS over TLS).
NATS_SCHEMES = ("nats://", "tls://")


class _VllmModel(argparse.Action):
    """``--model NAME`` as ``vllm bench serve`` reads it: the base model's name, noted as given in
    vLLM's spelling (``model_is_vllms``) so that with no adapters named every request names it, as
    vLLM's bench sends each to ``--model`` (``--model lora-0`` sent to lora-0 .. lora-3, loadgen's
    default adapters: most requests a 404 against a server of fewer)."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any, *_: Any) -> None:
        setattr(namespace, self.dest, values)
        namespace.model_is_vllms = True


class Spelled(argparse.Action):
    """Stores the value, and the option's spelling as given in ``namespace.spelled`` (dest ->
    option), so that a refusal names the option the user wrote: ``--random-input-len`` without
    ``--dataset-name random`` was refused as "--prompt-len applies to ...", an option never typed."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any, *rest: Any) -> None:
        setattr(namespace, self.dest, values)
        namespace.spelled = {**(getattr(namespace, "spelled", None) or {}), self.dest: rest[0] if rest else None}


def _target(text: str) -> str:
    if not text.startswith(("http://", "https://", *NATS_SCHEMES)):
        raise argparse.ArgumentTypeError(f"{text!r}: a gateway URL (http://, https://) or a NATS URL (nats://, tls://)")
    return text


def ranks(text: str) -> list[int]:
    """An argparse type: LoRA ranks, comma-separated, each >= 1 (an empty item is refused, not
    dropped: "8,,16" would cycle other ranks over the adapters than the user wrote)."""
    items = [r.strip() for r in text.split(",")]
    if not any(items):
        raise argparse.ArgumentTypeError("no ranks given")
    if not all(items):
        raise argparse.ArgumentTypeError(f"{text!r} has an empty item")
    return [positive(r) for r in items]


def range_ratio(text: str) -> float:
    """An argparse type: vLLM's ``--random-range-ratio``, in [0, 1)."""
    value = float(_at_least(float, 0)(text))
    if value >= 1:
        raise argparse.ArgumentTypeError(f"{value:g} is not below 1 (a length could be drawn as 0)")
    return value


def add_arguments(p: argparse.ArgumentParser) -> None:
    """``dlora loadgen``'s options: where to send, the workload, SLOs, retries, the report."""
    # (here: vllm_options takes this module's number types)
    from dlora.loadgen.vllm_options import (
        PERCENTILE_METRICS,
        extra_body,
        goodput,
        header,
        metadata,
        metric_percentiles,
        percentile_metrics,
        result_filename,
    )

    p.add_argument(
        "--target",
        "--base-url",
        type=_target,
        default="http://127.0.0.1:8000",
        help="gateway URL (http://...) or NATS URL (nats://..., tls://...) (default %(default)s)",
    )
    p.add_argument("--base-model", default="model", help="the base model's name at the gateway (default %(default)s)")
    p.add_argument(
        "--model",
        dest="base_model",
        action=_VllmModel,
        default=argparse.SUPPRESS,
        help="vLLM's --model: the base model's name, and the model every request names unless --lora-modules, "
        "--adapter-names or --adapters name adapters",
    )
    p.add_argument("--api-key", help='bearer token for the gateway (default: $OPENAI_API_KEY; auth = "keys" wants one)')
    p.add_argument(
        "--header",
        nargs="*",
        type=header,
        metavar="KEY=VALUE",
        help="vLLM's --header: HTTP headers sent with every request (over --api-key's Authorization, as vLLM's); "
        "result.json records their names only; HTTP targets only",
    )
    p.add_argument(
        "--served-model-name",
        metavar="NAME",
        help="vLLM's --served-model-name: the name requests to the base model send, where --model is its folder "
        "(whose tokenizer the prompts are drawn from); HTTP targets only (default: --model/--base-model)",
    )
    p.add_argument(
        "--backend",
        choices=BACKENDS,
        default="openai",
        help="openai (or vllm): the prompt as token ids to /v1/completions; openai-chat: as text, in one user "
        "message, to /v1/chat/completions (vLLM's --backend openai-chat --endpoint /v1/chat/completions), through the "
        "server's chat template; HTTP targets only (default %(default)s)",
    )
    p.add_argument(
        "--endpoint",
        choices=tuple(dict.fromkeys(ENDPOINTS.values())),
        help="vLLM's --endpoint: the path --backend posts to, given with it (default: the backend's)",
    )
    p.add_argument(
        "--temperature",
        type=sampling_value("temperature"),
        help=f"each request's temperature, {RANGES['temperature'].span()} (vLLM's --temperature; default 0, greedy: "
        "vLLM's sends none, the server's default)",
    )
    p.add_argument(
        "--top-p",
        type=sampling_value("top_p"),
        help=f"each request's top_p, {RANGES['top_p'].span()} (vLLM's --top-p; default: none)",
    )
    p.add_argument(
        "--top-k",
        type=sampling_value("top_k"),
        help="each request's top_k, -1 or 0 all (vLLM's --top-k; default: none)",
    )
    p.add_argument(
        "--min-p",
        type=sampling_value("min_p"),
        help=f"each request's min_p, {RANGES['min_p'].span()} (vLLM's --min-p; default: none)",
    )
    for name in ("frequency", "presence"):
        p.add_argument(
            f"--{name}-penalty",
            type=sampling_value(f"{name}_penalty"),
            help=f"each request's {name}_penalty, {RANGES[f'{name}_penalty'].span()} (vLLM's --{name}-penalty; "
            "default: none)",
        )
    p.add_argument(
        "--repetition-penalty",
        type=sampling_value("repetition_penalty"),
        help=f"each request's repetition_penalty, {RANGES['repetition_penalty'].span()} (vLLM's "
        "--repetition-penalty; default: none)",
    )
    p.add_argument(
        "--extra-body",
        type=extra_body,
        metavar="JSON",
        help="vLLM's --extra-body: fields added to each request's body, e.g. "
        '\'{"chat_template_kwargs": {"enable_thinking": false}}\'; loadgen\'s own (model, prompt, messages, '
        "max_tokens, max_completion_tokens, stream, stream_options) refused, sampling values out of their ranges "
        "too (as the options'); HTTP targets only",
    )
    p.add_argument(
        "--tokenizer",
        metavar="FOLDER",
        help="the model folder whose tokenizer's whole vocabulary the prompts are drawn from (its special ids left "
        "out, as vLLM's random dataset), which (HTTP) counts an output the server's usage does not, and "
        "(openai-chat) turns the prompts' token ids into text (vLLM's --tokenizer; default, as vLLM's: the "
        "--model/--base-model folder, where it holds a tokenizer; openai-chat's wherever it is a folder; without "
        "one, ids 3-255)",
    )
    add_workload_arguments(p)
    # 0 taken, as --goodput's KEY:0 is (vLLM's bound is "non-negative"): only a request with no wait meets it
    slo = _at_least(float, 0)
    p.add_argument("--slo-ttft", type=slo, help="SLO on time to first token (s; 0 or more)")
    p.add_argument("--slo-tpot", type=slo, help="SLO on time per output token (s; 0 or more)")
    p.add_argument(
        "--slo-e2e", type=slo, help="SLO on end-to-end latency (s, 0 or more; vLLM's --goodput e2el, there in ms)"
    )
    p.add_argument(
        "--goodput",
        nargs="+",
        type=goodput,
        metavar="KEY:MS",
        help="vLLM's --goodput: SLOs in milliseconds, ttft:MS tpot:MS e2el:MS (the --slo-* options in seconds)",
    )
    p.add_argument(
        "--max-retries",
        type=count,
        default=0,
        help="retry a 429 or 503 answer or a refused connection, after Retry-After (the openai "
        "package retries these, and 408, 409, 5xx and timeouts, twice by default; default here 0: none), "
        "the first /v1/models too; HTTP targets only",
    )
    p.add_argument(
        "--num-warmups",
        type=count,
        default=0,
        help="send this many requests first, not counted: shaped as the workload's first, to its adapters in "
        "turn, with prompts of their own (vLLM's --num-warmups; default 0)",
    )
    p.add_argument(
        "--max-concurrency",
        type=positive,
        help="at most this many requests in flight: an arrival waits for one to end, and its times count "
        "from when it is sent (vLLM's benchmark_serving --max-concurrency; default: no cap, open loop)",
    )
    p.add_argument(
        "--ignore-eos",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="send ignore_eos, so that outputs run to the workload's lengths (vLLM's --ignore-eos, which its "
        "random dataset turns on); --no-ignore-eos sends none, for a server that refuses the field "
        "(default: on)",
    )
    p.add_argument(
        "--percentile-metrics",
        type=percentile_metrics,
        help="vllm-result.json: the metrics whose mean, median, std and percentiles it writes, of "
        f"{','.join(PERCENTILE_METRICS)} (the queue's with --max-concurrency, the last at a finite rate, as vLLM's "
        "--percentile-metrics; default: the first four)",
    )
    p.add_argument(
        "--metric-percentiles",
        type=metric_percentiles,
        help="vllm-result.json: the percentiles it writes, comma-separated, e.g. 50,99,99.9 as p50_ttft_ms, "
        "p99_ttft_ms, p99.9_ttft_ms (vLLM's --metric-percentiles; default 50,90,99)",
    )
    p.add_argument("--label", help="vllm-result.json's label, as vLLM's --label (default: none)")
    p.add_argument(
        "--metadata",
        nargs="+",
        type=metadata,
        metavar="KEY=VALUE",
        help="vllm-result.json: these keys and their string values beside its own (vLLM's --metadata, e.g. "
        "version=0.3.3 tp=1); a key the record has already is refused",
    )
    p.add_argument(
        "--out",
        "--result-dir",
        default="loadgen-results",
        help="folder for result.json, vllm-result.json, report.png, report.html (vLLM's --result-dir; default "
        "%(default)s)",
    )
    p.add_argument(
        "--result-filename",
        type=result_filename,
        metavar="NAME",
        help="the vLLM-shaped record's file name in --out (vLLM's --result-filename; default vllm-result.json)",
    )
    p.add_argument(
        "--append-result",
        action="store_true",
        help="vLLM's --append-result: add the vLLM-shaped record to its file's end, one line of JSON a run "
        "(JSON Lines), where it is written over otherwise (result.json and the report are this run's)",
    )
    for option in ("--save-result", "--save-detailed"):  # a vLLM command line's: what loadgen always does
        p.add_argument(
            option,
            action="store_true",
            help="taken from vLLM's command lines: the record is always saved, its per-request lists with it",
        )


def add_workload_arguments(p: argparse.ArgumentParser) -> None:
    """The workload's options (``WorkloadSpec.from_args``), shared by ``dlora loadgen`` and
    ``dlora simulate``."""
    # Options that apply to some choices of another only (spec.SCOPED_OPTIONS) default to None, not
    # given, so that one given where it does nothing is refused (WorkloadSpec.from_args fills in
    # the defaults).
    p.add_argument(
        "--requests",
        "--num-prompts",
        type=positive,
        default=_SPEC.requests,
        help=f"cap on requests (vLLM's --num-prompts; default {_SPEC.requests})",
    )
    p.add_argument(
        "--duration",
        type=above_zero,
        default=_SPEC.duration,
        help=f"cap on seconds of sending: requests arriving later are not sent (default {_SPEC.duration:g})",
    )
    p.add_argument("--seed", type=count, default=_SPEC.seed, help=f"(default {_SPEC.seed})")
    p.add_argument("--arrivals", choices=get_args(Arrivals), default=_SPEC.arrivals)
    p.add_argument(
        "--rate",
        "--request-rate",
        type=rate,
        # None: not given (WorkloadSpec.from_args fills in the default), so that it is refused beside a ramp
        help="mean requests/s (trace replay is rescaled to it); inf sends every request at once, as vLLM's "
        f"--request-rate inf (default {_SPEC.rate:g}; with --ramp-up-strategy inf)",
    )
    p.add_argument(
        "--ramp-up-strategy",
        choices=get_args(RampUp),
        help="vLLM's --ramp-up-strategy: the rate goes from --ramp-up-start-rps at the first request to "
        "--ramp-up-end-rps at the last, linearly or exponentially in the request's index (poisson or gamma "
        "gaps at each one's rate); not with --rate (default: a fixed --rate)",
    )
    p.add_argument("--ramp-up-start-rps", type=above_zero, help="the first request's rate, req/s (vLLM's)")
    p.add_argument("--ramp-up-end-rps", type=above_zero, help="the last request's rate, req/s (vLLM's)")
    p.add_argument(
        "--cv", type=gamma_cv, help=f"gamma: coefficient of variation of inter-arrivals (default {_SPEC.cv:g})"
    )
    p.add_argument(
        "--burstiness",
        type=burstiness,
        help="vLLM's --burstiness, the gamma shape: gamma arrivals with --cv 1/sqrt(BURSTINESS) (1: Poisson's "
        "gaps; below 1 burstier; inf: every gap 1/rate)",
    )
    p.add_argument(
        "--trace",
        action="append",
        metavar="PATH",
        help="a request trace for --arrivals/--lengths trace (Azure LLM 2023/2024 CSV, BurstGPT CSV, "
        "Mooncake JSONL) and/or a popularity source for --popularity stride (ServeGen client "
        "file or folder, Azure Functions CSV); give it twice for one of each. bundled:NAME "
        "names a shipped one (azure-conv, azure-functions, burstgpt, servegen); the defaults "
        "are bundled:azure-conv and bundled:azure-functions",
    )
    p.add_argument(
        "--trace-format",
        choices=FORMATS,
        default=_SPEC.trace_format,
        help="format of every --trace (auto: sniffed from each file's first row)",
    )
    p.add_argument(
        "--lengths",
        choices=get_args(Lengths),
        default=_SPEC.lengths,
        help="random: vLLM's random dataset's lengths (--random-range-ratio around --prompt-len and --output-len)",
    )
    p.add_argument(
        "--dataset-name",
        dest="lengths",
        choices=("random",),
        default=argparse.SUPPRESS,
        help="vLLM's --dataset-name random: --lengths random (its other datasets are texts loadgen does not send)",
    )
    p.add_argument(
        "--prompt-len",
        "--random-input-len",
        "--input-len",
        type=positive,
        action=Spelled,
        help=f"fixed, random: the prompt's tokens; uniform: the most (vLLM's --input-len; default {_SPEC.prompt_len})",
    )
    p.add_argument(
        "--output-len",
        "--random-output-len",
        type=positive,
        action=Spelled,
        help=f"the same for outputs (default {_SPEC.output_len})",
    )
    p.add_argument(
        "--random-range-ratio",
        type=range_ratio,
        help="random: each length drawn uniformly within this fraction of --prompt-len/--output-len, in [0, 1) "
        f"(vLLM's; default {_SPEC.random_range_ratio:g})",
    )
    p.add_argument(
        "--length-divide",
        type=above_zero,
        help=f"trace lengths are divided by this ... (default {_SPEC.length_divide:g})",
    )
    p.add_argument("--max-prompt", type=positive, help=f"... and capped (default {_SPEC.max_prompt})")
    p.add_argument("--max-output", type=positive, help=f"(default {_SPEC.max_output})")
    p.add_argument("--adapters", type=positive, help=f"adapters lora-0..N-1 (default {_SPEC.adapters})")
    p.add_argument("--adapter-names", help="comma-separated names instead (- is the base model)")
    p.add_argument(
        "--lora-modules",
        nargs="+",
        metavar="NAME",
        help="vLLM's --lora-modules: the adapters by name, space-separated (--adapter-names a,b); each request's "
        "drawn by --popularity (uniform: vLLM's random assignment)",
    )
    p.add_argument(
        "--lora-assignment",
        choices=tuple(LORA_ASSIGNMENTS),
        help="vLLM's --lora-assignment: random (--popularity uniform) or round-robin (each adapter in turn, in "
        "arrival order; --popularity round-robin)",
    )
    p.add_argument(
        "--popularity",
        choices=get_args(Popularity),
        # None: not given (WorkloadSpec.from_args fills in the default), so that --lora-assignment,
        # vLLM's spelling of it, is refused beside it even where it names the default
        help=f"how requests are spread over the adapters (default {_SPEC.popularity})",
    )
    p.add_argument("--alpha", type=_finite, help=f"zipf exponent / power-law alpha (default {_SPEC.alpha:g})")
    p.add_argument(
        "--stride",
        type=positive,
        help="dLoRA's stride mapping of the popularity source's tenants (functions, clients) onto adapters "
        f"(default {_SPEC.stride})",
    )
    p.add_argument(
        "--tenant-window",
        type=above_zero,
        metavar="SECONDS",
        help="stride: replay the source's time windows (ServeGen 10 min, Azure Functions 1 min), each "
        "lasting this many seconds of the run (default: the whole trace's shares)",
    )
    p.add_argument("--shift-every", type=above_zero, help="rotate adapter popularity every this many seconds")
