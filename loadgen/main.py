"""``dlora loadgen``: build a workload from the options, replay it open loop against the gateway or
NATS with a live progress bar, and write the report.

The shell around ``workload.build_specs``: ``run`` takes the workload as a ``WorkloadSpec`` and the
target and output folder as plain arguments, so a benchmark calls it exactly as the CLI does."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import datetime
import functools
import resource
import signal
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from dlora.loadgen import report, vllm_record
from dlora.loadgen.clients import HttpClient, NatsClient, redacted
from dlora.loadgen.metrics import SLO, RequestResult, summarize, summarize_by_adapter
from dlora.loadgen.options import ENDPOINTS, NATS_SCHEMES
from dlora.loadgen.prompt_text import chat_texts, ordinary_ids
from dlora.loadgen.runner import Clock, replay, warm_up
from dlora.loadgen.spec import WorkloadSpec
from dlora.loadgen.traces import TraceError
from dlora.loadgen.vllm_options import backend_problem, ignore_eos_of, sampling_of, slo_seconds
from dlora.loadgen.vllm_record import RecordOptions
from dlora.loadgen.workload import build_specs, load_traces, prompt_ids
from dlora.model.tokenizer import load_tokenizer

# Descriptors the process holds besides its requests' sockets (stdio, the report's files, the event
# loop's own, NATS's connection), with room.
OTHER_FILES = 64


def allow_open_files(in_flight: int, console: Console) -> None:
    """Raise the soft open-file limit to what ``in_flight`` requests need, up to the hard limit
    (vLLM's and SGLang's servers do as much at their start): at the common soft limit of 1,024,
    ``--rate inf --requests 2000`` failed half its requests with "Too many open files" on this side,
    counted as the target's failures. Says so where the hard limit is short too."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = in_flight + OTHER_FILES
    if soft == resource.RLIM_INFINITY or soft >= wanted:
        return
    raised = wanted if hard == resource.RLIM_INFINITY else min(hard, wanted)
    limit = f"{hard}, ulimit -Hn"
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (raised, hard))
    except (ValueError, OSError):  # macOS past OPEN_MAX under an unlimited hard limit, a sandbox's seccomp:
        raised, limit = soft, f"{soft}, ulimit -Sn, which could not be raised"  # (it failed the run, exit 2)
    if raised < wanted:
        console.print(
            f"the open-file limit ({limit}) lets about {raised - OTHER_FILES} of {in_flight} requests be "
            "in flight: those past it fail here (Too many open files), not at the target; raise it or give "
            "--max-concurrency"
        )


def _tokens_in(tokenizer: Any, text: str) -> int:
    """The output tokens in ``text`` where the server's usage gives none: as vLLM's bench counts
    them, its tokenizer's ids with no special tokens added."""
    return len(tokenizer.encode(text, add_special_tokens=False))


def holds_tokenizer(folder: str) -> bool:
    """Whether ``folder`` is a model folder with a tokenizer's files: --model is a served name as
    often as a path, and one that happens to name a folder without them is no usage error."""
    return any((Path(folder) / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json"))


# Seconds between progress lines where stderr is no terminal (a log, a CI step): a bar there is one
# line at its end, and a large chat run's texts take minutes
PROGRESS_EVERY_S = 10.0


def progress_bar(console: Console) -> Progress:
    """A bar of done/total with the time taken, on ``console`` where it is a terminal (else none)."""
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}"),
        TimeElapsedColumn(),
        console=console,
        disable=not console.is_terminal,
    )


def made_chat_texts(
    tokenizer: Any, prompts: Iterable[list[int]], total: int, console: Console
) -> Callable[[int, list[int]], str]:
    """``prompt_text.chat_texts`` of the run's ``total`` prompts, showing how far it is on
    ``console`` (stderr), as vLLM's bench shows its dataset's and its requests' progress: a bar on
    a terminal, else a line every ``PROGRESS_EVERY_S`` seconds and one at the end if any was
    written (10,000 prompts of 32k tokens took minutes that printed nothing)."""
    bar = progress_bar(console)
    task = bar.add_task("prompts' chat text", total=total)
    said = [time.monotonic(), 0]  # the last line's time, lines written

    def made(k: int) -> None:
        bar.update(task, completed=k)
        if not console.is_terminal and (time.monotonic() - said[0] >= PROGRESS_EVERY_S or (k == total and said[1])):
            console.print(f"prompts' chat text: {k} of {total} made")
            said[:] = [time.monotonic(), said[1] + 1]

    with bar:
        return chat_texts(tokenizer, prompts, made)


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
# The exit status after each, the shell's 128 + the signal's number
EXIT_AFTER = {"SIGINT": 130, "SIGTERM": 143}


@dataclasses.dataclass(frozen=True, kw_only=True)
class RunOptions:
    """How ``run`` sends a workload and what it records besides the run's figures: all of a run but
    the workload (``WorkloadSpec``), the target and the output folder, so that the CLI
    (``from_args``), the benchmarks and the tests build one object. Defaults: the CLI's."""

    # The base model's name at the gateway; where it is a folder, its tokenizer's too (vLLM's --model)
    base_model: str = "model"
    # What a request must meet to count toward goodput (--slo-*, vLLM's --goodput)
    slo: SLO = SLO()
    # Retries of a refused try (429, 503, a refused connection), as the openai package makes them
    max_retries: int = 0
    # The gateway's bearer token (None: OPENAI_API_KEY, as the openai package reads it)
    api_key: str | None = None
    # At most this many requests in flight (None: no cap, open loop; vLLM's --max-concurrency)
    max_concurrency: int | None = None
    # openai: token ids to /v1/completions; openai-chat: their text to /v1/chat/completions
    backend: str = "openai"
    # The folder whose tokenizer draws the prompts (None: base_model's, where it holds one)
    tokenizer: str | None = None
    # Send ignore_eos (False: outputs may end at EOS, short of the workload's lengths)
    ignore_eos: bool = True
    # What vllm-result.json writes besides the run's figures, and its name
    record: RecordOptions = RecordOptions()
    # Fields each request carries over loadgen's temperature 0 (vLLM's sampling options, --extra-body)
    sampling: dict[str, Any] | None = None
    # Requests sent first, not counted (vLLM's --num-warmups: ``runner.warm_up``)
    num_warmups: int = 0
    # Sent with every HTTP request, over the key's (vLLM's --header)
    headers: Mapping[str, str] | None = None
    # The name the base model's requests send, where base_model is its folder (None: base_model)
    served_model_name: str | None = None

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> RunOptions:
        """The options of a ``dlora loadgen`` command line (checked by ``run_loadgen`` before)."""
        return cls(
            base_model=args.base_model,
            slo=SLO(*slo_seconds(args).values()),
            max_retries=args.max_retries,
            api_key=args.api_key,
            max_concurrency=args.max_concurrency,
            backend=args.backend,
            tokenizer=args.tokenizer,
            ignore_eos=ignore_eos_of(args),
            record=RecordOptions.from_args(args),
            sampling=sampling_of(args),
            num_warmups=args.num_warmups,
            headers=dict(args.header) if args.header else None,
            served_model_name=args.served_model_name,
        )


async def run(
    spec: WorkloadSpec, target: str, out: str | Path, console: Console, options: RunOptions = RunOptions()
) -> dict:
    """Replay ``spec`` open loop against ``target`` (a gateway ``http://`` URL, streamed; or a
    ``nats://`` URL) as ``options`` say, and write result.json, vllm-result.json, report.png and
    report.html under ``out``. The tokenizer (``options.tokenizer``, else ``base_model`` where that
    folder holds one, as vLLM's bench defaults to --model; ``openai-chat``'s wherever it is a
    folder) is the vocabulary the prompts are drawn from (``prompt_text.ordinary_ids``), turns them
    into the chat's text, and counts an output the server's usage does not. Ctrl-C or SIGTERM stops
    sending; the report is still written.

    Returns:
        The overall summary (``metrics.summarize``), with the requests ``planned``, whether Ctrl-C
        or SIGTERM ``interrupted`` it and the signal's name (``stopped_by``; None if none).
    Raises:
        TraceError, ValueError, OSError: a trace cannot be read or the workload cannot be built,
            the target cannot be reached (NATS), the report cannot be written.
    """
    tokenizer = options.tokenizer  # (the folder found for it, where none is named)
    shown = dataclasses.asdict(options.record)  # result.json's config keys, in the CLI's option order
    # (else one of the two lost after the run)
    own = vllm_record.taken(shown | {"max_concurrency": options.max_concurrency, "rate": spec.options()["rate"]})
    if clash := sorted({key for key, _ in options.record.metadata or ()} & own):
        raise ValueError(f"--metadata {', '.join(clash)}: vllm-result.json has that key of its own")
    if unwritten := [m for m in options.record.percentile_metrics or () if f"mean_{m}_ms" not in own]:
        # vLLM writes none of them then and says nothing: a record without the figures asked for
        console.print(
            f"--percentile-metrics {','.join(unwritten)}: not written (the client queue's are under --max-concurrency "
            "only, e2el_including_client_queue at a finite --request-rate only, as vLLM's)"
        )
    traces = load_traces(spec)
    if traces[0] is not None and traces[0].skipped:
        console.print(f"trace: skipped {traces[0].skipped} failed requests (no response tokens)")
    requests = build_specs(spec, traces)
    chat_text: Callable[[int, list[int]], str] | None = None
    count_tokens: Callable[[str], int] | None = None
    prompt_vocab: list[int] | None = None  # no tokenizer: the ids 3..255 themselves
    if options.backend == "openai-chat":  # the prompts' text: the base model's tokenizer where none is named
        tokenizer = tokenizer or options.base_model
    elif tokenizer is None and holds_tokenizer(options.base_model):
        # vLLM's bench loads --model's tokenizer where --tokenizer names none: the prompts are drawn
        # from its vocabulary (over NATS too: one model folder, one set of prompts whichever the
        # target), and over HTTP it counts an output without usage (else one token an event, a
        # server streaming several an event read short)
        tokenizer = options.base_model
    if tokenizer is not None:  # before the run: a folder without a tokenizer is a usage error
        tok = load_tokenizer(tokenizer)
        # completions' too: vLLM's bench counts with its tokenizer an output whose usage is missing
        count_tokens = functools.partial(_tokens_in, tok)
        prompt_vocab = ordinary_ids(tok)
        if options.backend == "openai-chat":
            prompts = (prompt_ids(i, s, ids=prompt_vocab) for i, s in enumerate(requests))
            chat_text = made_chat_texts(tok, prompts, len(requests), console)
    out = Path(out)
    if out.exists() and not out.is_dir():  # found only after the whole run, its results lost
        raise NotADirectoryError(f"--out {out} is a file, not a folder")
    out.mkdir(parents=True, exist_ok=True)  # OSError now, not after the run
    names = [name for name in report.FILES if name != report.VLLM_RECORD]
    names.append(options.record.result_filename or report.VLLM_RECORD)
    if taken := [name for name in names if (out / name).is_dir()]:
        raise IsADirectoryError(f"--out {out}: {', '.join(taken)} is a folder; the report writes a file there")
    tempfile.TemporaryFile(dir=out).close()  # a folder this run cannot write to: OSError now, likewise
    if not target.startswith(NATS_SCHEMES):  # a connection a request in flight (NATS: one for all)
        allow_open_files(min(options.max_concurrency or len(requests), len(requests)), console)
    clock = Clock()
    client = (
        await NatsClient.connect(target, clock, options.ignore_eos, options.sampling, prompt_vocab)
        if target.startswith(NATS_SCHEMES)
        else HttpClient(
            target,
            options.served_model_name or options.base_model,
            clock,
            max_retries=options.max_retries,
            api_key=options.api_key,
            chat_text=chat_text,
            ignore_eos=options.ignore_eos,
            count_tokens=count_tokens,
            sampling=options.sampling,
            prompt_vocab=prompt_vocab,
            headers=options.headers,
        )
    )
    if isinstance(client, HttpClient):
        try:
            served = await client.served_models(
                lambda why, wait_s: console.print(f"{why}; trying again in {wait_s:g} s", markup=False)
            )
        except BaseException:  # refused, or Ctrl-C while it asked: closed either way (no warning left)
            await client.close()
            raise
        wanted = {s.adapter or options.served_model_name or options.base_model for s in requests}
        if missing := sorted(wanted - served):
            console.print(f"not served by the target (their requests will fail): {', '.join(missing)}")
    if options.num_warmups and requests:
        try:  # before the clock and the signal handlers: Ctrl-C here is "interrupted before sending"
            warm = await warm_up(requests, client, options.num_warmups, options.max_concurrency, spec.duration)
        except BaseException:
            await client.close()
            raise
        if failed := [r for r in warm if not r.completed]:
            reason = failed[0].error or "not finished within --duration"
            console.print(f"warm-up: {len(failed)} of {options.num_warmups} did not complete ({reason})", markup=False)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    stopped_by: list[str] = []

    def heard(sig: signal.Signals) -> None:
        stopped_by.append(sig.name)
        stop.set()

    # SIGTERM as Ctrl-C: `timeout 600 dlora loadgen ...`, a CI step's or a Kubernetes Job's deadline
    # ended the run with nothing written (as `dlora generate` treats it).
    for sig in STOP_SIGNALS:
        loop.add_signal_handler(sig, heard, sig)
    progress = progress_bar(console)
    task = progress.add_task("sending", total=len(requests))
    clock.restart()  # the run begins now: not with NATS's connect, or the target's model list
    started_at = datetime.datetime.now().isoformat()  # (local, naive: vLLM's records' timestamps)

    ended = {"requests": 0, "failed": 0, "tokens": 0}  # running counts: summed anew at each end, n² a run

    def on_update(r: RequestResult) -> None:
        ended["requests"] += 1
        ended["failed"] += r.error is not None
        ended["tokens"] += r.tokens
        rate = ended["tokens"] / max(clock(), 1e-9)
        progress.update(task, completed=ended["requests"], description=f"{rate:7.1f} tok/s  errors {ended['failed']}")

    try:
        try:
            with progress:
                results, end = await replay(
                    requests,
                    client,
                    clock,
                    spec.duration,
                    stop,
                    on_update=on_update,
                    max_concurrency=options.max_concurrency,
                )
        finally:
            await client.close()
        interrupted = stop.is_set()  # (a Ctrl-C after the run, while the report is written, did not cut it)
        summary = summarize(results, end, options.slo) | {"planned": len(requests)}
        if (unsent := len(requests) - summary["sent"]) and not interrupted:
            ended = f"--duration {spec.duration:g} s ended sending"
            console.print(f"{ended}: {unsent} of {len(requests)} requests not sent")
        # in result.json only, a server ignoring ignore_eos measured other lengths silently
        if summary["short"] and options.ignore_eos:
            console.print(
                f"{summary['short']} of {summary['completed']} completed requests ended before the tokens they "
                "asked for (max_tokens with ignore_eos): the target did not honour ignore_eos, so this run's "
                "outputs are shorter than the workload's"
            )
        by_adapter = summarize_by_adapter([r for r in results if r.sent], end, options.slo)
        # Keys in the CLI's option order and names, so records from the CLI and from benchmarks compare.
        kinds = ("request_trace", "popularity_source")
        formats = {f"{kind}_format": t.format for kind, t in zip(kinds, traces) if t is not None}
        skipped = {"request_trace_skipped_rows": traces[0].skipped} if traces[0] is not None else {}
        config = (
            {
                "target": redacted(target),
                "base_model": options.base_model,
                "served_model_name": options.served_model_name,
            }
            | {"backend": options.backend, "tokenizer": tokenizer}
            # the headers' names: their values may be credentials (vLLM's bench redacts --header)
            | {"headers": sorted(options.headers) if options.headers else None}
            | spec.options()
            | {"slo_ttft": options.slo.ttft_s, "slo_tpot": options.slo.tpot_s, "slo_e2e": options.slo.e2e_s}
            | {"max_concurrency": options.max_concurrency, "ignore_eos": options.ignore_eos}
            | shown
            | {"sampling": options.sampling}
            | {"num_warmups": options.num_warmups}
            | {"out": str(out), "interrupted": interrupted, "started_at": started_at}
            | formats
            | skipped
        )
        report.write(out, config, summary, by_adapter, results, end, console)
        return summary | {"interrupted": interrupted, "stopped_by": stopped_by[0] if interrupted else None}
    finally:  # a Ctrl-C while the report is written is heard (as stop) and let be: it is written whole
        for sig in STOP_SIGNALS:
            loop.remove_signal_handler(sig)


def run_loadgen(args: argparse.Namespace) -> int:
    console = Console(stderr=True)
    if not console.is_terminal:  # a log or a pipe: room for the whole table
        console = Console(stderr=True, width=160)
    try:
        if (problem := WorkloadSpec.unused_option(args)) is not None:
            raise ValueError(problem)
        if args.max_retries and args.target.startswith(NATS_SCHEMES):  # NATS answers no 429 or 503
            raise ValueError("--max-retries: retries are of HTTP answers (429, 503); a NATS target has none")
        if args.api_key is not None and args.target.startswith(NATS_SCHEMES):  # (it was dropped silently)
            raise ValueError("--api-key is the gateway's; a NATS target takes its user and password in the URL")
        for option in ("header", "served_model_name"):  # the HTTP request's; a NATS request names no model
            if getattr(args, option) is not None and args.target.startswith(NATS_SCHEMES):
                raise ValueError(f"--{option.replace('_', '-')} is for HTTP targets, not a NATS one")
        if args.endpoint not in (None, ENDPOINTS[args.backend]):  # vLLM's bench posted one body to the other
            raise ValueError(
                f"--endpoint {args.endpoint} is not --backend {args.backend}'s ({ENDPOINTS[args.backend]})"
            )
        if args.extra_body is not None and args.target.startswith(NATS_SCHEMES):  # SamplingParams, no body
            raise ValueError("--extra-body is the gateway's request body; a NATS target takes SamplingParams")
        chat = args.backend == "openai-chat"
        if args.extra_body is not None and (why := backend_problem(args.extra_body, chat)) is not None:
            raise ValueError(f"--extra-body: {why}")  # a 400 for every request of the run
        if chat and args.target.startswith(NATS_SCHEMES):  # NATS takes token ids, no messages
            raise ValueError("--backend openai-chat is the gateway's chat API; a NATS target takes token ids")
        # Not merely a folder: run in the repository's root, the default "model" is its `model/`
        # package, which holds no tokenizer (else asked of the Hub, ~50 s, where it is none)
        if chat and args.tokenizer is None and not holds_tokenizer(args.base_model):
            raise ValueError(
                "--backend openai-chat needs --tokenizer FOLDER to turn the prompts' ids into text: "
                f"--base-model {args.base_model} is no model folder holding a tokenizer"
            )
        summary = asyncio.run(
            run(WorkloadSpec.from_args(args), args.target, args.out, console, RunOptions.from_args(args))
        )
    except (TraceError, ValueError, OSError) as e:
        print(f"dlora loadgen: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # before it began sending (a big trace loading, NATS connecting)
        print("dlora loadgen: interrupted before sending; nothing written", file=sys.stderr)
        return 130
    if summary["interrupted"]:
        by = "Ctrl-C" if summary["stopped_by"] == "SIGINT" else summary["stopped_by"]
        console.print(f"interrupted ({by}): sending stopped after {summary['sent']} of {summary['planned']}")
    console.print(
        f"failed {summary['failed']}, cut {summary['cut']}, lost {summary['lost']} of {summary['sent']} sent  ->  "
        f"{Path(args.out) / 'result.json'}, {args.result_filename or report.VLLM_RECORD}, report.png, report.html"
    )
    # A run where nothing completed failed, though its requests were only cut (a server that
    # answers nothing, or too slowly for the run: it exited 0).
    nothing = summary["completed"] == 0
    if summary["interrupted"]:
        return EXIT_AFTER[summary["stopped_by"]]
    return 0 if summary["lost"] == 0 and summary["failed"] == 0 and not nothing else 1
