"""The workload's options (``WorkloadSpec.from_args``), shared by ``dlora loadgen`` and ``dlora
simulate``. The defaults are ``WorkloadSpec``'s, declared there once."""

from __future__ import annotations

import argparse
from typing import Any, get_args

from dlora.loadgen.arg_types import above_zero, burstiness, count, finite_float, gamma_cv, positive, range_ratio, rate
from dlora.loadgen.spec import LORA_ASSIGNMENTS, Arrivals, Lengths, Popularity, RampUp, WorkloadSpec
from dlora.loadgen.traces import FORMATS

_SPEC = WorkloadSpec()


class Spelled(argparse.Action):
    """Stores the value, and the option's spelling as given in ``namespace.spelled`` (dest ->
    option), so that a refusal names the option the user wrote: ``--random-input-len`` without
    ``--dataset-name random`` was refused as "--prompt-len applies to ...", an option never typed."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any, *rest: Any) -> None:
        setattr(namespace, self.dest, values)
        namespace.spelled = {**(getattr(namespace, "spelled", None) or {}), self.dest: rest[0] if rest else None}


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
    p.add_argument("--alpha", type=finite_float, help=f"zipf exponent / power-law alpha (default {_SPEC.alpha:g})")
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
