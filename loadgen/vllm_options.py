"""``dlora loadgen``'s options that a ``vllm bench serve`` command line brings: their argparse types
and what they fold into (SLOs, sampling fields, ignore_eos). Apart from ``options`` (which builds the
parser from them) to keep that module under its size."""

from __future__ import annotations

import argparse
import json
import re
from typing import Any

import msgspec

from dlora.common.integers import NotWhole, whole
from dlora.common.sampling import BODY_RANGES, COMPLETION_RANGES, RANGES, Range, best_of_problem
from dlora.loadgen.arg_types import WHOLE, at_least
from dlora.loadgen.options import ENDPOINTS

# vLLM's --goodput keys and the --slo-* option each sets
GOODPUT = {"ttft": "slo_ttft", "tpot": "slo_tpot", "e2el": "slo_e2e"}


def goodput(text: str) -> tuple[str, float]:
    """An argparse type: one of vLLM's ``--goodput`` pairs, ``KEY:MILLISECONDS``, as the --slo-*
    option it sets and its seconds. 0 is taken, as vLLM takes it (its bound is "non-negative"): a
    request meets it only with no wait at all (a one-token output's TPOT, which vLLM counts 0)."""
    key, colon, ms = text.partition(":")
    if not colon or key.strip() not in GOODPUT:
        raise argparse.ArgumentTypeError(f"{text!r}: expected KEY:MILLISECONDS, KEY one of {', '.join(GOODPUT)}")
    return GOODPUT[key.strip()], at_least(float, 0)(ms) / 1000


def slo_seconds(args: argparse.Namespace) -> dict[str, float | None]:
    """The --slo-* options' seconds, each set by --slo-X or by --goodput's key for it.

    Raises:
        ValueError: one given both ways, or twice in --goodput."""
    slo = {name: getattr(args, name) for name in GOODPUT.values()}
    for name, seconds in args.goodput or ():
        if slo[name] is not None:
            raise ValueError(f"--goodput sets --{name.replace('_', '-')} that is given already")
        slo[name] = seconds
    return slo


# vLLM's --percentile-metrics names (its e2el is loadgen's e2e); the last two under --max-concurrency only
PERCENTILE_METRICS = ("ttft", "tpot", "itl", "e2el", "client_queue_time", "e2el_including_client_queue")


def percentile_metrics(text: str) -> tuple[str, ...]:
    """An argparse type: vLLM's ``--percentile-metrics``, comma-separated names of
    ``PERCENTILE_METRICS``, each once."""
    names = tuple(n.strip() for n in text.split(","))
    if unknown := [n for n in names if n not in PERCENTILE_METRICS]:
        raise argparse.ArgumentTypeError(f"{', '.join(map(repr, unknown))}: expected {','.join(PERCENTILE_METRICS)}")
    if len(set(names)) < len(names):
        raise argparse.ArgumentTypeError(f"{text!r} names a metric twice")
    return names


def metric_percentiles(text: str) -> tuple[float, ...]:
    """An argparse type: vLLM's ``--metric-percentiles``, comma-separated percentiles in [0, 100]
    (numpy's range: 99.9 is one, 999 an error at the run's end)."""
    values = tuple(at_least(float, 0)(p.strip()) for p in text.split(","))
    if over := [p for p in values if p > 100]:
        raise argparse.ArgumentTypeError(f"{over[0]:g} is above 100")
    return values


def metadata(text: str) -> tuple[str, str]:
    """An argparse type: one of vLLM's ``--metadata`` items, ``KEY=VALUE`` (the value may hold ``=``)."""
    key, equals, value = text.partition("=")
    if not equals or not key.strip():
        raise argparse.ArgumentTypeError(f"{text!r}: expected KEY=VALUE")
    return key.strip(), value.strip()


# An HTTP field name: RFC 9110's token (a name with a space or a colon is no header a server reads
# as written: every request of the run would carry it wrong)
_FIELD_NAME = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")


def header(text: str) -> tuple[str, str]:
    """An argparse type: one of vLLM's ``--header`` items, ``KEY=VALUE``, sent with every request
    (the value may hold ``=``; a name that is no HTTP token, or a value with a line break, is refused)."""
    key, value = metadata(text)
    if not _FIELD_NAME.fullmatch(key):
        raise argparse.ArgumentTypeError(f"{key!r} is not an HTTP header name")
    if any(c in value for c in "\r\n\0"):
        raise argparse.ArgumentTypeError(f"{text!r}: a header's value is one line")
    return key, value


def result_filename(text: str) -> str:
    """An argparse type: a file name in --out (no folder in it), none of the report's other files."""
    if not text or "/" in text or text in (".", "..") or text in ("result.json", "report.png", "report.html"):
        raise argparse.ArgumentTypeError(
            f"{text!r}: a file name in --out, other than result.json, report.png, report.html"
        )
    return text


def extra_body(text: str) -> dict:
    """An argparse type: vLLM's ``--extra-body``, a JSON object."""
    try:
        value = json.loads(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"{text!r} is not JSON: {e}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"{text!r} is not a JSON object")
    if owned := [field for field in OWNED_FIELDS if field in value]:
        # vLLM's bench sends them over its own; loadgen kept its own and dropped them, silently: a
        # max_tokens the run never asked for, a model it never sent to, measured as if it had
        where = "; ".join(OWNED_FIELDS[field] for field in owned)
        raise argparse.ArgumentTypeError(f"{', '.join(owned)}: the workload's own, not an extra body's ({where})")
    for name, bounds in EXTRA_CHECKED.items():
        if (given := value.get(name)) is not None and (why := _problem(name, given, bounds)) is not None:
            # every request of the run would be refused (a 400 each), found only after it was sent
            raise argparse.ArgumentTypeError(why)
    counts = {name: whole(name, value[name]) for name in ("n", "best_of") if value.get(name) is not None}
    if (why := best_of_problem(counts.get("n"), counts.get("best_of"))) is not None:  # (each inside its range now)
        raise argparse.ArgumentTypeError(why)
    return value


def _problem(name: str, given: object, bounds: Range) -> str | None:
    """Why ``given`` is no value of the body's field ``name`` (top_k 2.5, "hot", out of ``bounds``),
    as the gateway refuses it (an integer field's 16.0 is 16 there: ``common.integers``), or None."""
    try:
        number = whole(name, given) if name in WHOLE else given
    except NotWhole as e:
        return str(e)
    if isinstance(number, bool) or not isinstance(number, int | float):
        return f"{name} must be a number, got {given!r}"
    return bounds.problem(name, number)


def backend_problem(extra: dict[str, Any], chat: bool) -> str | None:
    """Why --extra-body is no body the --backend's API takes (known only once the backend is): a
    field its body has none of (the gateway refuses it, a 400 for every request of the run:
    ``best_of`` or ``suffix`` in a chat, ``tools`` in a completion), or its ``logprobs``
    (``logprobs_problem``); None where it is one."""
    # (here, not at the top: every `dlora` command line builds loadgen's options, and the bodies'
    # module brings numpy, ~1 s of each `dlora serve`)
    from dlora.services.gateway.openai import ChatBody, CompletionBody

    body, path = (ChatBody, ENDPOINTS["openai-chat"]) if chat else (CompletionBody, ENDPOINTS["openai"])
    if unknown := sorted(set(extra) - {f.encode_name for f in msgspec.structs.fields(body)}):
        return f"{', '.join(unknown)}: no field of the --backend's {path} body"
    return logprobs_problem(extra, chat)


def logprobs_problem(extra: dict[str, Any], chat: bool) -> str | None:
    """Why --extra-body's ``logprobs`` is none the --backend's API takes (a chat's is true or false,
    a completion's a count in ``COMPLETION_RANGES``), or None; known only once the backend is."""
    if (given := extra.get("logprobs")) is None or chat and isinstance(given, bool):
        return None
    if chat:
        return f"logprobs must be true or false (--backend openai-chat), got {given!r}"
    return _problem("logprobs", given, COMPLETION_RANGES["logprobs"])


# --extra-body's fields checked before the run, against the tables the gateway reads: the engine's
# that mean the same in a body (max_tokens is the workload's own; logprobs a flag or a count by the
# backend: ``logprobs_problem``) and the bodies' own counts (max_completion_tokens: the workload's)
EXTRA_CHECKED = {
    name: r
    for name, r in (RANGES | BODY_RANGES).items()
    if name not in ("logprobs", "max_tokens", "max_completion_tokens")
}


# The body's fields loadgen writes from the workload, and the option that sets each
OWNED_FIELDS = {
    "model": "--model, --lora-modules or --adapter-names name each request's model",
    "prompt": "the workload's prompts are token ids of its lengths",
    "messages": "--backend openai-chat sends the workload's prompts",
    "max_tokens": "--output-len or --random-output-len set it",
    "max_completion_tokens": "--output-len or --random-output-len set it",
    "stream": "loadgen streams always: its TTFT and ITL are timed by the stream",
    "stream_options": "loadgen asks for usage always",
}


# vLLM's bench's sampling options (its "sampling parameters" group), each the request field of its name
SAMPLING = (
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "frequency_penalty",
    "presence_penalty",
    "repetition_penalty",
)


def sampling_of(args: argparse.Namespace) -> dict[str, Any] | None:
    """The fields each request carries over loadgen's temperature 0: the sampling options given,
    then --extra-body's over them, as vLLM's bench merges them (``--temperature 0.7 --extra-body
    '{"temperature": 0.2}'`` sends 0.2 there; here it sent 0.7). None: none given."""
    given = {name: getattr(args, name) for name in SAMPLING if getattr(args, name, None) is not None}
    return (given | (args.extra_body or {})) or None


def ignore_eos_of(args: argparse.Namespace) -> bool:
    """Whether requests ask for ``ignore_eos``: --extra-body's where it says (vLLM's body takes its
    extra body last; its users turn off the ignore_eos its random dataset sets so), else
    --ignore-eos. (Sent true over an extra body's false, silently: outputs ran past EOS.)"""
    said = (args.extra_body or {}).get("ignore_eos")
    return said if isinstance(said, bool) else args.ignore_eos
