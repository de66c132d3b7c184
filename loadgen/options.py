"""``dlora loadgen`` options. Kept apart from the runner so the CLI builds its parser without
importing matplotlib, rich or the clients. The workload's options are ``workload_options``', their
value types ``arg_types``'."""

from __future__ import annotations

import argparse
from typing import Any

from dlora.common.sampling import RANGES
from dlora.loadgen.arg_types import at_least, count, positive, sampling_value
from dlora.loadgen.workload_options import add_workload_arguments

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


def _target(text: str) -> str:
    if not text.startswith(("http://", "https://", *NATS_SCHEMES)):
        raise argparse.ArgumentTypeError(f"{text!r}: a gateway URL (http://, https://) or a NATS URL (nats://, tls://)")
    return text


def add_arguments(p: argparse.ArgumentParser) -> None:
    """``dlora loadgen``'s options: where to send, the workload, SLOs, retries, the report."""
    # (here: vllm_options takes this module's ENDPOINTS)
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
    slo = at_least(float, 0)
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
