"""A workload as one value: everything that decides which requests the load generator sends and
when, and nothing about where they go or where the report is written.

The CLI builds it from its options (``WorkloadSpec.from_args``, the only place that reads an
``argparse.Namespace``); every benchmark builds it directly. ``workload.build_specs`` turns it into
requests. Field names are the ``dlora loadgen`` option names (``--length-divide`` is
``length_divide``), so a spec reads like the command line that would make it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Literal, get_args

from dlora.loadgen.traces import FORMATS

if TYPE_CHECKING:
    import argparse

Arrivals = Literal["poisson", "gamma", "trace"]
Lengths = Literal["trace", "fixed", "uniform", "random"]
Popularity = Literal["uniform", "zipf", "power", "stride", "round-robin"]
RampUp = Literal["linear", "exponential"]
# vLLM's --lora-assignment choices and the popularity each is
LORA_ASSIGNMENTS: dict[str, Popularity] = {"random": "uniform", "round-robin": "round-robin"}


@dataclass(frozen=True, kw_only=True)
class WorkloadSpec:
    """Who asks what when, deterministic per ``seed``. The defaults are ``dlora loadgen``'s.

    Raises:
        ValueError: (on construction) an arrival process, length source, popularity or trace
            format that does not exist.
    """

    requests: int = 100
    """Cap on requests: at most this many are built and sent."""
    duration: float = 60.0
    """Cap on sending, seconds from the run's start (arrivals count from 0, the first a gap after it);
    requests still running then get 30 s more, then are cut."""
    seed: int = 0
    """Seeds every random draw (arrivals, lengths, adapters): one seed, one workload."""
    arrivals: Arrivals = "poisson"
    """Arrival process: Poisson, Gamma with ``cv``, or the request trace's own timestamps."""
    rate: float = 2.0
    """Mean arrival rate, requests/s; a trace's timestamps are rescaled to it. ``math.inf``: every
    request at once (vLLM's ``--request-rate inf``)."""
    cv: float = 1.0
    """Gamma arrivals: coefficient of variation of the gaps (1 = Poisson, larger = burstier; 0 =
    even gaps, vLLM's ``--burstiness inf``)."""
    ramp_up_strategy: RampUp | None = None
    """vLLM's --ramp-up-strategy: the rate goes from ``ramp_up_start_rps`` at the first request to
    ``ramp_up_end_rps`` at the last, linearly or geometrically in the request's index, Poisson or
    gamma gaps at each request's rate (``arrivals.ramp_up``); ``rate`` is then ``math.inf``, as
    vLLM's --request-rate must be beside it. None: the fixed ``rate``."""
    ramp_up_start_rps: float | None = None
    """Ramp-up: the first request's rate, req/s (above 0)."""
    ramp_up_end_rps: float | None = None
    """Ramp-up: the last request's rate, req/s (at least the start's)."""
    trace: tuple[str, ...] = ()
    """Trace paths or ``bundled:NAME``: at most one request trace (for ``arrivals``/``lengths``
    ``trace``) and one popularity source (for ``popularity`` ``stride``). Empty: the bundled Azure
    conversation trace and Azure Functions sample, where an option needs them."""
    trace_format: str = "auto"
    """Format of every trace (``traces.FORMATS``); ``auto`` sniffs each from its first row."""
    lengths: Lengths = "trace"
    """Prompt/output lengths: from the request trace (scaled), fixed, uniform in [1, len], or vLLM's
    random dataset's, uniform within ``random_range_ratio`` of each length."""
    prompt_len: int = 32
    """Fixed lengths: prompt tokens; uniform: the largest prompt drawn."""
    output_len: int = 32
    """Fixed lengths: output tokens; uniform: the largest output drawn."""
    random_range_ratio: float = 0.0
    """Random lengths: each in [floor(len (1 - r)), ceil(len (1 + r))], an output at least 1 token
    (vLLM's --random-range-ratio, in [0, 1)); 0: the lengths themselves."""
    length_divide: float = 1.0
    """Trace lengths (and Mooncake prompt blocks) are divided by this, then capped."""
    max_prompt: int = 256
    """Trace lengths: cap on prompt tokens, after dividing."""
    max_output: int = 128
    """Trace lengths: cap on output tokens, after dividing."""
    adapters: int = 4
    """Number of adapters, named ``lora-0`` .. ``lora-<adapters-1>`` (unless ``adapter_names``)."""
    adapter_names: tuple[str | None, ...] | None = None
    """The adapters by name instead of ``adapters``; None in it is the base model."""
    popularity: Popularity = "uniform"
    """How requests are spread over the adapters: uniform, Zipf, power law, dLoRA's stride
    mapping of the popularity source's tenants, or each in turn in arrival order (vLLM's
    ``--lora-assignment round-robin``)."""
    alpha: float = 1.0
    """Zipf exponent / power-law alpha."""
    stride: int = 1
    """Stride mapping: tenant k (ranked by requests) goes to adapter (k // stride) mod adapters."""
    tenant_window: float | None = None
    """Stride: replay the source's time windows, each lasting this many seconds of the run and
    looping; None: the whole trace's shares throughout."""
    shift_every: float | None = None
    """Rotate adapter popularity by one adapter every this many seconds; None: no rotation."""

    def __post_init__(self) -> None:
        # A benchmark builds a spec without argparse's choices: a misspelt choice is refused here,
        # not found as a KeyError (or a silently different branch) halfway through building.
        for name, allowed in (
            ("arrivals", get_args(Arrivals)),
            ("lengths", get_args(Lengths)),
            ("popularity", get_args(Popularity)),
            ("trace_format", FORMATS),
        ):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} {getattr(self, name)!r}: expected one of {', '.join(allowed)}")
        if not 0 <= self.random_range_ratio < 1:  # vLLM's bound: at 1 an input could be empty
            raise ValueError(f"random_range_ratio {self.random_range_ratio}: expected at least 0 and below 1")
        self._check_ramp_up()

    def _check_ramp_up(self) -> None:
        """vLLM's checks of its ramp-up options, and its start of 0 (its bench stopped at the first
        request on an assertion), and arrivals it draws (a trace's are its own)."""
        start, end = self.ramp_up_start_rps, self.ramp_up_end_rps
        if self.ramp_up_strategy is None:
            if start is not None or end is not None:
                raise ValueError("--ramp-up-start-rps and --ramp-up-end-rps apply to --ramp-up-strategy only")
            return
        if self.ramp_up_strategy not in get_args(RampUp):
            raise ValueError(
                f"ramp_up_strategy {self.ramp_up_strategy!r}: expected one of {', '.join(get_args(RampUp))}"
            )
        if start is None or end is None:
            raise ValueError("--ramp-up-strategy needs both --ramp-up-start-rps and --ramp-up-end-rps")
        if not 0 < start <= end or math.isinf(end):
            raise ValueError(
                f"--ramp-up-start-rps {start:g}, --ramp-up-end-rps {end:g}: expected 0 < start <= end < inf"
            )
        if self.arrivals == "trace":
            raise ValueError("--ramp-up-strategy draws the arrivals: not with --arrivals trace")
        if not math.isinf(self.rate):
            raise ValueError("--ramp-up-strategy sets the rate: give it or --rate (--request-rate), not both")

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> WorkloadSpec:
        """The spec ``dlora loadgen``'s options describe (``options.add_arguments``); options that
        are not about the workload (target, output folder, SLOs) are left to the caller. A field
        ``args`` lacks is its default: a benchmark's record (``options``) written before the field
        was (`dlora bench simulate --experiment validate --measured OLD.json`) still reads."""
        values = {f.name: getattr(args, f.name, getattr(_DEFAULTS, f.name)) for f in fields(cls)}
        for name in (*SCOPED_OPTIONS, "adapters", "popularity"):  # not given: the default
            if values[name] is None:
                values[name] = getattr(_DEFAULTS, name)
        if values["rate"] is None:  # a ramp sets the rates (vLLM's --request-rate is inf beside it)
            values["rate"] = _DEFAULTS.rate if values["ramp_up_strategy"] is None else math.inf
        if (burstiness := getattr(args, "burstiness", None)) is not None:  # vLLM's gamma shape: 1 / CV²
            values["arrivals"], values["cv"] = "gamma", 1 / math.sqrt(burstiness)  # inf: CV 0
        values["trace"] = tuple(args.trace or ())
        if (assignment := getattr(args, "lora_assignment", None)) is not None:
            values["popularity"] = LORA_ASSIGNMENTS[assignment]
        if (modules := getattr(args, "lora_modules", None)) is not None:  # vLLM's spelling, names apart
            values["adapter_names"] = adapter_names(",".join(modules))
            values["adapters"] = len(values["adapter_names"])
        named = modules is not None or args.adapter_names is not None or args.adapters is not None
        if getattr(args, "model_is_vllms", False) and not named:  # vLLM's bench: every request to --model
            values["adapter_names"], values["adapters"] = (None,), 1
        if args.adapter_names is not None:  # "" too: refused, not the default count
            values["adapter_names"] = adapter_names(args.adapter_names)
            values["adapters"] = len(values["adapter_names"])  # as result.json records it
        return cls(**values)

    @staticmethod
    def unused_option(args: argparse.Namespace) -> str | None:
        """Why an option given (not None) does nothing with the rest of ``args``, or None: a user's
        trial ran `--lengths uniform --max-prompt 256`, took the lengths for 1-256 tokens and had
        1-32 (``--prompt-len``'s default); `--cv 3` with Poisson arrivals and `--alpha` with uniform
        popularity were recorded as if used."""
        for name, (selector, where) in SCOPED_OPTIONS.items():
            value = _chosen(args, selector)
            if getattr(args, name) is not None and value not in where:
                # as typed (workload_options.Spelled): the user's vLLM spelling, not loadgen's
                option = (getattr(args, "spelled", None) or {}).get(name) or "--" + name.replace("_", "-")
                chosen = "--" + selector.replace("_", "-")
                listed = ", ".join(where[:-1]) + " or " + where[-1] if len(where) > 1 else where[0]
                hint = " (vLLM's random dataset: give --dataset-name random)" if option.startswith("--random-") else ""
                return f"{option} applies to {chosen} {listed} only, not {value}{hint}"
        if getattr(args, "burstiness", None) is not None and (args.cv is not None or args.arrivals == "trace"):
            return "--burstiness is the gamma shape of arrivals it draws: give it or --cv, not with --arrivals trace"
        if getattr(args, "lora_assignment", None) is not None and args.popularity is not None:
            return "--lora-assignment is how requests are spread over the adapters: give it or --popularity, not both"
        if getattr(args, "lora_modules", None) and (args.adapter_names is not None or args.adapters is not None):
            return "--lora-modules names the adapters: give it, --adapter-names or --adapters, one of them"
        if args.adapter_names and args.adapters is not None:
            return "give --adapters or --adapter-names, not both (the names say how many)"
        if args.trace_format != "auto" and not args.trace:  # recorded as if it had read the bundled ones
            return (
                "--trace-format applies to the files --trace names; none given (the bundled traces' formats are known)"
            )
        return None

    def options(self) -> dict[str, object]:
        """The spec under the CLI's option names and spellings (``adapter_names`` comma-joined, ``-``
        for the base model; no trace: None), as result.json records it, so a run's record reads
        the same whether the CLI or a benchmark made it."""
        out: dict[str, object] = {f.name: getattr(self, f.name) for f in fields(self)}
        out["trace"] = list(self.trace) or None
        if math.isinf(self.rate):  # JSON has no infinity (json.dumps wrote Infinity); vLLM's record says "inf"
            out["rate"] = "inf"
        out["adapter_names"] = (
            None if self.adapter_names is None else ",".join("-" if a is None else a for a in self.adapter_names)
        )
        return out


_DEFAULTS = WorkloadSpec()
# The options that apply to some choices of another only: name -> (that option, its choices).
SCOPED_OPTIONS: dict[str, tuple[str, tuple[str, ...]]] = {
    "prompt_len": ("lengths", ("fixed", "uniform", "random")),
    "output_len": ("lengths", ("fixed", "uniform", "random")),
    "random_range_ratio": ("lengths", ("random",)),
    "length_divide": ("lengths", ("trace",)),
    "max_prompt": ("lengths", ("trace",)),
    "max_output": ("lengths", ("trace",)),
    "cv": ("arrivals", ("gamma",)),
    "alpha": ("popularity", ("zipf", "power")),
    "stride": ("popularity", ("stride",)),
    "tenant_window": ("popularity", ("stride",)),
    # round-robin's equal shares rotate to themselves (the turn, rotated, skipped adapters)
    "shift_every": ("popularity", ("uniform", "zipf", "power", "stride")),
}


def _chosen(args: argparse.Namespace, selector: str) -> object:
    """The choice in force of ``selector`` (``arrivals``, ``lengths``, ``popularity``), as
    ``WorkloadSpec.from_args`` makes it: --lora-assignment's popularity, a --popularity not given
    the default."""
    if selector == "popularity" and (assignment := getattr(args, "lora_assignment", None)) is not None:
        return LORA_ASSIGNMENTS[assignment]
    return getattr(args, selector) or getattr(_DEFAULTS, selector)


def adapter_names(text: str) -> tuple[str | None, ...]:
    """``--adapter-names``: comma-separated names, ``-`` the base model, spaces around a name
    dropped. Raises ValueError for an empty one (it silently meant the base model) or one named
    twice (it was dropped silently; a user's trial)."""
    names = [n.strip() for n in text.split(",")]
    if "" in names:
        raise ValueError(f"--adapter-names {text!r} has an empty name: write - for the base model")
    if twice := sorted({n for n in names if names.count(n) > 1}):
        raise ValueError(f"--adapter-names {text!r} names {', '.join(twice)} more than once")
    return tuple(None if n == "-" else n for n in names)
