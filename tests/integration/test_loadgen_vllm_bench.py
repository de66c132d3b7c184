"""The load generator as vLLM's ``vllm bench serve``: the options its users type, the fields of its
record, against servers written here."""

from __future__ import annotations

import asyncio
import io
import json
import math
import sys
from asyncio.subprocess import PIPE
from pathlib import Path

import pytest
from aiohttp import web
from rich.console import Console

from dlora.loadgen.main import RunOptions, run
from dlora.loadgen.spec import WorkloadSpec
from dlora.loadgen.vllm_options import sampling_of
from dlora.loadgen.vllm_record import RecordOptions
from dlora.model.make_tiny import TinyOutput
from dlora.services.cli import build_parser
from tests.integration.conftest import Stack
from tests.integration.test_loadgen_streams import CHUNK, LAST, _stream, serving


async def test_no_ignore_eos_sends_none_and_short_outputs_are_no_warning(tmp_path: Path) -> None:
    """vLLM's --ignore-eos is an option (its random dataset turns it on); dlora loadgen sent
    ``ignore_eos`` always, so a server that refuses the field (OpenAI's answers 400 to unknown
    arguments) failed every request with no way around it. --no-ignore-eos sends none, and outputs
    that end at EOS are then what was asked for, not a target that ignored it."""
    bodies: list[dict] = []

    async def completions(request: web.Request) -> web.StreamResponse | web.Response:
        bodies.append(body := await request.json())
        if "ignore_eos" in body:
            return web.json_response({"error": {"message": "Unrecognized request argument: ignore_eos"}}, status=400)
        stop = {"choices": [{"index": 0, "text": "b", "finish_reason": "stop"}], "usage": {"completion_tokens": 2}}
        return await _stream(request, [CHUNK, stop])

    args = build_parser().parse_args(["loadgen", "--no-ignore-eos"])
    assert args.ignore_eos is False and build_parser().parse_args(["loadgen"]).ignore_eos is True
    spec = WorkloadSpec(requests=3, rate=50.0, lengths="fixed", prompt_len=4, output_len=8, adapter_names=(None,))
    console = Console(file=io.StringIO(), width=300)
    async with serving(completions) as url:
        summary = await run(spec, url, tmp_path, console, RunOptions(ignore_eos=False))
    assert summary["completed"] == 3 and summary["failed"] == 0 and all("ignore_eos" not in b for b in bodies)
    assert summary["short"] == 3 and "did not honour ignore_eos" not in console.file.getvalue()
    assert json.loads((tmp_path / "result.json").read_text())["config"]["ignore_eos"] is False


async def test_chat_outputs_without_usage_are_counted_by_the_tokenizer_and_recorded(
    tiny_llama: TinyOutput, tmp_path: Path
) -> None:
    """A server that ignores ``include_usage`` and streams several tokens an event: dlora loadgen
    counted one token an event, so each output read short (a warning that the target ignored
    ignore_eos, a TPOT several times too long). vLLM's bench counts the generated text's tokens with
    its tokenizer, and records each text (``generated_texts``); so does this now."""
    from dlora.model.tokenizer import load_tokenizer

    tok = load_tokenizer(tiny_llama.model)
    words = [tok.decode(tok.encode(" kalo mira", add_special_tokens=False)), " tu", " veni sola"]
    expected = len(tok.encode("".join(words), add_special_tokens=False))

    async def chat(request: web.Request) -> web.StreamResponse:
        body = await request.json()
        assert body["max_completion_tokens"] == expected
        events = [{"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}]}]
        for i, word in enumerate(words):
            finish = "length" if i == len(words) - 1 else None
            events.append({"choices": [{"index": 0, "delta": {"content": word}, "finish_reason": finish}]})
        return await _stream(request, events)  # no usage event

    async def completions(_: web.Request) -> web.Response:
        raise AssertionError("the chat backend posted to /v1/completions")

    spec = WorkloadSpec(
        requests=2, rate=50.0, lengths="fixed", prompt_len=4, output_len=expected, adapter_names=(None,)
    )
    console = Console(file=io.StringIO(), width=300)
    async with serving(completions, chat=chat) as url:
        summary = await run(
            spec, url, tmp_path, console, RunOptions(backend="openai-chat", tokenizer=str(tiny_llama.model))
        )
    assert expected > len(words) and summary["completed"] == 2 and summary["short"] == 0
    assert summary["total_output_tokens"] == 2 * expected and "did not honour" not in console.file.getvalue()
    v = json.loads((tmp_path / "vllm-result.json").read_text())
    assert v["output_lens"] == [expected] * 2 and v["generated_texts"] == ["".join(words)] * 2
    assert [len(i) for i in v["itls"]] == [len(words) - 1] * 2  # ITL stays one an event, as vLLM's


async def test_completions_take_vllms_tokenizer_and_count_outputs_without_usage_by_it(
    tiny_llama: TinyOutput, tmp_path: Path
) -> None:
    """``vllm bench serve --backend vllm --tokenizer FOLDER``, as vLLM's users type it, was refused
    (the option was the chat backend's only), and an output whose server sends no usage was counted
    one token an event: a server streaming several tokens an event read short. vLLM's bench counts
    such an output's generated text with its tokenizer, and so does this, with the chat backend's
    counting."""
    from dlora.model.tokenizer import load_tokenizer

    tok = load_tokenizer(tiny_llama.model)
    words = [" kalo mira", " tu", " veni sola"]
    expected = len(tok.encode("".join(words), add_special_tokens=False))

    async def completions(request: web.Request) -> web.StreamResponse:
        body = await request.json()
        assert body["max_tokens"] == expected and isinstance(body["prompt"], list)
        last = len(words) - 1
        events = [
            {"choices": [{"index": 0, "text": w, "finish_reason": "length" if i == last else None}]}
            for i, w in enumerate(words)
        ]
        return await _stream(request, events)  # no usage event

    argv = ["--backend", "vllm", "--tokenizer", str(tiny_llama.model), "--model", "model", "--num-prompts", "2"]
    argv += ["--dataset-name", "random", "--random-input-len", "4", "--random-output-len", str(expected)]
    async with serving(completions) as url:
        argv += ["--base-url", url, "--result-dir", str(tmp_path)]
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "dlora.services.cli", "loadgen", *argv, stdout=PIPE, stderr=PIPE
        )
        _, err = await asyncio.wait_for(proc.communicate(), timeout=120)
    assert proc.returncode == 0, err.decode()[-2000:]
    assert expected > len(words) and "did not honour" not in err.decode()
    v = json.loads((tmp_path / "vllm-result.json").read_text())
    assert v["output_lens"] == [expected] * 2 and v["tokenizer_id"] == str(tiny_llama.model)
    assert [len(i) for i in v["itls"]] == [len(words) - 1] * 2  # ITL stays one an event, as vLLM's


async def test_completions_count_outputs_without_usage_by_the_model_folders_tokenizer(
    tiny_llama: TinyOutput, tmp_path: Path
) -> None:
    """``vllm bench serve --model /models/llama`` with no --tokenizer counts an output whose server
    sends no usage by that folder's tokenizer (its tokenizer_id defaults to --model); dlora loadgen's
    completions backend had no default, so each such output read one token an event, short. The
    folder's tokenizer is the default now; a served name, or a folder with no tokenizer, keeps the
    count by events and is no usage error."""
    from dlora.model.tokenizer import load_tokenizer

    words = [" kalo mira", " tu", " veni sola"]
    expected = len(load_tokenizer(tiny_llama.model).encode("".join(words), add_special_tokens=False))

    async def completions(request: web.Request) -> web.StreamResponse:
        events = [{"choices": [{"index": 0, "text": w, "finish_reason": None}]} for w in words]
        return await _stream(request, [*events, {"choices": [{"index": 0, "text": "", "finish_reason": "length"}]}])

    spec = WorkloadSpec(
        requests=2, rate=50.0, lengths="fixed", prompt_len=4, output_len=expected, adapter_names=(None,)
    )
    bare = tmp_path / "bare"
    bare.mkdir()
    folder = str(tiny_llama.model)
    async with serving(completions) as url:
        for model, tokens, tokenizer in [(folder, expected, folder), (str(bare), 4, None)]:
            await run(spec, url, tmp_path / "out", Console(file=io.StringIO()), RunOptions(base_model=model))
            v = json.loads((tmp_path / "out" / "vllm-result.json").read_text())
            assert (v["output_lens"], v["tokenizer_id"]) == ([tokens] * 2, tokenizer)
    assert expected != 4  # (the words' tokens are not the events')


async def test_vllms_record_has_queue_times_and_peaks_under_max_concurrency(tmp_path: Path) -> None:
    """vLLM's record says how long each request waited for a --max-concurrency slot
    (``queue_times``), the peak tokens a second and requests in flight, and its backend under
    ``endpoint_type`` too; dlora's vllm-result.json had none of them (readers of vLLM's keys found
    none). Capped at one, all three arrive at once: the second and third wait while the first runs,
    each came (its send less its wait) before the first ended."""

    async def completions(request: web.Request) -> web.StreamResponse:
        await asyncio.sleep(0.2)
        return await _stream(request, [CHUNK, CHUNK, LAST])

    spec = WorkloadSpec(requests=3, rate=math.inf, lengths="fixed", prompt_len=4, output_len=3, adapter_names=(None,))
    async with serving(completions) as url:
        await run(spec, url, tmp_path, Console(file=io.StringIO()), RunOptions(max_concurrency=1))
    v = json.loads((tmp_path / "vllm-result.json").read_text())
    assert (v["endpoint_type"], v["backend"], v["max_concurrent_requests"], v["rtfx"]) == ("openai", "openai", 1, 0.0)
    assert 1 <= v["max_output_tokens_per_s"] <= 9 and len(v["queue_times"]) == 3
    order = sorted(range(3), key=lambda i: v["start_times"][i])
    sends, waits = [v["start_times"][i] for i in order], [v["queue_times"][i] for i in order]
    first_ended = sends[0] + v["latencies"][order[0]]
    assert waits[0] < waits[1] < waits[2] and all(s - w < first_ended for s, w in zip(sends, waits))


async def test_label_and_metadata_are_vllm_result_keys(tmp_path: Path) -> None:
    """vLLM's --label and --metadata KEY=VALUE (a run's version, its tensor parallelism: how its
    users tell records apart) were refused by dlora loadgen; they are keys of vllm-result.json now."""

    async def completions(request: web.Request) -> web.StreamResponse:
        return await _stream(request, [CHUNK, LAST])

    args = build_parser().parse_args(["loadgen", "--label", "dlora-a", "--metadata", "version=0.3.3", "cmd=a=b"])
    spec = WorkloadSpec(requests=2, rate=50.0, lengths="fixed", prompt_len=4, output_len=2, adapter_names=(None,))
    async with serving(completions) as url:
        await run(spec, url, tmp_path, Console(file=io.StringIO()), RunOptions(record=RecordOptions.from_args(args)))
    v = json.loads((tmp_path / "vllm-result.json").read_text())
    assert (v["label"], v["version"], v["cmd"], v["completed"]) == ("dlora-a", "0.3.3", "a=b", 2)


async def test_a_vllm_bench_command_line_saves_its_record_where_it_says(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A vLLM user's command line ends in ``--save-result --save-detailed --result-dir DIR
    --result-filename NAME``: dlora loadgen refused all four. The record goes to DIR/NAME (with
    loadgen's own report beside it); --save-result and --save-detailed say what loadgen always does.
    A name that is a path or one of the report's other files is a usage error."""

    async def completions(request: web.Request) -> web.StreamResponse:
        return await _stream(request, [CHUNK, LAST])

    argv = ["loadgen", "--dataset-name", "random", "--random-input-len", "4", "--random-output-len", "2"]
    argv += ["--num-prompts", "3", "--request-rate", "inf", "--save-result", "--save-detailed"]
    args = build_parser().parse_args([*argv, "--result-dir", str(tmp_path), "--result-filename", "run1.json"])
    spec = WorkloadSpec.from_args(args)
    async with serving(completions) as url:
        await run(spec, url, args.out, Console(file=io.StringIO()), RunOptions(record=RecordOptions.from_args(args)))
    v = json.loads((tmp_path / "run1.json").read_text())
    assert v["completed"] == 3 and len(v["ttfts"]) == 3 and (tmp_path / "result.json").exists()
    assert not (tmp_path / "vllm-result.json").exists()
    for name in ("result.json", "a/b.json", ".."):
        with pytest.raises(SystemExit):
            build_parser().parse_args(["loadgen", "--result-filename", name])
        assert "a file name in --out" in capsys.readouterr().err


async def test_sampling_options_and_extra_body_go_into_each_request(tmp_path: Path) -> None:
    """vLLM's --temperature, --top-p, --top-k and --extra-body (its users turn a model's thinking off
    with ``{"chat_template_kwargs": {"enable_thinking": false}}``) were refused: every request went
    greedy with loadgen's fixed body. Each is sent now (loadgen's own fields in an extra body are
    refused: test_loadgen_vllm_options)."""
    bodies: list[dict] = []

    async def completions(request: web.Request) -> web.StreamResponse:
        bodies.append(await request.json())
        return await _stream(request, [CHUNK, LAST])

    extra = '{"chat_template_kwargs": {"enable_thinking": false}, "seed": 7}'
    penalties = ["--min-p", "0.05", "--frequency-penalty", "0.5", "--presence-penalty", "-0.5"]
    argv = ["loadgen", "--temperature", "0.7", "--top-p", "0.9", *penalties, "--repetition-penalty", "1.1"]
    args = build_parser().parse_args([*argv, "--extra-body", extra])
    spec = WorkloadSpec(requests=2, rate=50.0, lengths="fixed", prompt_len=4, output_len=2, adapter_names=(None,))
    async with serving(completions) as url:
        summary = await run(spec, url, tmp_path, Console(file=io.StringIO()), RunOptions(sampling=sampling_of(args)))
    assert summary["completed"] == 2 and len(bodies) == 2
    body = bodies[0]
    assert (body["temperature"], body["top_p"], body["seed"], "top_k" in body) == (0.7, 0.9, 7, False)
    assert body["chat_template_kwargs"] == {"enable_thinking": False}
    # vLLM's --min-p and its penalties, refused before
    assert [body[k] for k in ("min_p", "frequency_penalty", "presence_penalty", "repetition_penalty")] == [
        0.05,
        0.5,
        -0.5,
        1.1,
    ]
    assert (body["max_tokens"], body["stream"], len(body["prompt"])) == (2, True, 4)
    plain = build_parser().parse_args(["loadgen"])
    assert sampling_of(plain) is None


async def test_sampling_options_reach_the_workers_over_nats(stack: Stack, tmp_path: Path) -> None:
    """Over NATS the sampling options go into each GenerateRequest's SamplingParams; an extra body
    (the gateway's request body) is refused for a NATS target."""
    import urllib.parse

    import msgspec

    from dlora.common import subjects
    from dlora.common.messages import GenerateRequest

    target = stack.nc._current_server.uri.geturl()
    sent: list[GenerateRequest] = []

    async def heard(msg) -> None:  # type: ignore[no-untyped-def]
        sent.append(msgspec.json.decode(msg.data, type=GenerateRequest))

    # what the workers are sent (the record's config alone was checked: it says what was asked for)
    watch = await stack.nc.subscribe(subjects.requests_of(urllib.parse.urlsplit(target).username or "app"), cb=heard)
    spec = WorkloadSpec(requests=4, rate=50.0, lengths="fixed", prompt_len=6, output_len=3, adapters=2)
    argv = ["loadgen", "--temperature", "0.8", "--top-k", "5", "--top-p", "0.5", "--min-p", "0.1"]
    argv += ["--frequency-penalty", "0.2", "--presence-penalty", "0.3", "--repetition-penalty", "1.2"]
    args = build_parser().parse_args(argv)
    summary = await run(spec, target, tmp_path, Console(file=io.StringIO()), RunOptions(sampling=sampling_of(args)))
    await watch.unsubscribe()
    assert summary["completed"] == 4 and summary["failed"] == 0
    assert len(sent) == 4 and {(r.params.temperature, r.params.top_p, r.params.top_k) for r in sent} == {(0.8, 0.5, 5)}
    penalties = {(r.params.min_p, r.params.frequency_penalty, r.params.presence_penalty) for r in sent}
    assert penalties == {(0.1, 0.2, 0.3)} and {r.params.repetition_penalty for r in sent} == {1.2}
    config = json.loads((tmp_path / "result.json").read_text())["config"]
    assert config["sampling"] == {"temperature": 0.8, "top_p": 0.5, "top_k": 5} | {
        "min_p": 0.1,
        "frequency_penalty": 0.2,
        "presence_penalty": 0.3,
        "repetition_penalty": 1.2,
    }
    refused = build_parser().parse_args(["loadgen", "--target", target, "--extra-body", "{}", "--out", str(tmp_path)])
    assert refused.func(refused) == 2


async def test_a_vllm_bench_serve_command_line_runs_against_the_stack(stack: Stack, tmp_path: Path) -> None:
    """The command a vLLM user copies from vLLM's docs, its options only, run as ``dlora loadgen``
    against the real stack: every request completes and the record is where the command says."""
    argv = ["--backend", "openai-chat", "--base-url", stack.url, "--endpoint", "/v1/chat/completions"]
    argv += ["--model", "model", "--tokenizer", str(stack.tiny.model), "--lora-modules", "lora-0", "lora-1"]
    argv += ["--dataset-name", "random", "--random-input-len", "12", "--random-output-len", "4"]
    argv += ["--random-range-ratio", "0.5", "--num-prompts", "6", "--request-rate", "inf", "--max-concurrency", "3"]
    argv += ["--ignore-eos", "--temperature", "0", "--percentile-metrics", "ttft,tpot,itl,e2el"]
    argv += ["--metric-percentiles", "50,99.9", "--goodput", "e2el:60000", "--label", "dlora", "--seed", "3"]
    argv += ["--save-result", "--save-detailed", "--result-dir", str(tmp_path), "--result-filename", "bench.json"]
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "dlora.services.cli", "loadgen", *argv, stdout=PIPE, stderr=PIPE
    )
    out, err = await asyncio.wait_for(proc.communicate(), timeout=120)
    assert proc.returncode == 0, err.decode()[-2000:]
    v = json.loads((tmp_path / "bench.json").read_text())
    assert (v["completed"], v["failed"], v["label"], v["backend"], v["max_concurrency"]) == (
        6,
        0,
        "dlora",
        "openai-chat",
        3,
    )
    assert v["request_goodput"] == v["request_throughput"] and v["p99.9_ttft_ms"] >= v["p50_ttft_ms"]
    assert all(1 < n < 7 for n in v["output_lens"]) and len(v["generated_texts"]) == 6
    assert max(v["queue_times"]) > 0 and v["max_concurrent_requests"] <= 3


async def test_warmups_go_first_to_each_adapter_and_are_not_counted(tmp_path: Path) -> None:
    """vLLM's --num-warmups N (requests before the measured run, so a cold server's first loads do
    not land in its TTFTs) was refused. They go first, to the workload's adapters in turn (a
    multi-LoRA server's cold start is each adapter's load), with prompts none of the run's shares
    (no prefix-cache hit given to the run), and none is counted."""
    bodies: list[dict] = []

    async def completions(request: web.Request) -> web.StreamResponse:
        bodies.append(await request.json())
        return await _stream(request, [CHUNK, LAST])

    spec = WorkloadSpec(requests=4, rate=50.0, lengths="fixed", prompt_len=6, output_len=2, adapters=3, seed=1)
    args = build_parser().parse_args(["loadgen", "--num-warmups", "3"])
    async with serving(completions) as url:
        summary = await run(spec, url, tmp_path, Console(file=io.StringIO()), RunOptions(num_warmups=args.num_warmups))
    warm, measured = bodies[:3], bodies[3:]
    assert summary["sent"] == summary["completed"] == 4 and len(measured) == 4
    assert {b["model"] for b in warm} == {b["model"] for b in measured} and len({b["model"] for b in warm}) > 1
    assert not {tuple(b["prompt"]) for b in warm} & {tuple(b["prompt"]) for b in measured}
    v = json.loads((tmp_path / "vllm-result.json").read_text())
    assert v["num_prompts"] == v["completed"] == 4


async def test_the_extra_body_is_merged_last_as_vllms_ignore_eos_and_sampling_too(tmp_path: Path) -> None:
    """vLLM's bench puts --extra-body over everything else it sends: its users turn off the
    ignore_eos its random dataset sets with ``--extra-body '{"ignore_eos": false}'``, and an extra
    body's temperature is sent over --temperature's. dlora loadgen sent ``ignore_eos: true`` and
    --temperature's value over them, silently (outputs ran past EOS, warned of as the target's fault)."""
    bodies: list[dict] = []

    async def completions(request: web.Request) -> web.StreamResponse:
        bodies.append(await request.json())
        stop = {"choices": [{"index": 0, "text": "b", "finish_reason": "stop"}], "usage": {"completion_tokens": 2}}
        return await _stream(request, [CHUNK, stop])

    argv = ["--dataset-name", "random", "--random-input-len", "4", "--random-output-len", "8", "--num-prompts", "2"]
    argv += ["--temperature", "0.7", "--extra-body", '{"ignore_eos": false, "temperature": 0.2}']
    async with serving(completions) as url:
        argv += ["--base-url", url, "--model", "model", "--result-dir", str(tmp_path)]
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "dlora.services.cli", "loadgen", *argv, stdout=PIPE, stderr=PIPE
        )
        _, err = await asyncio.wait_for(proc.communicate(), timeout=120)
    assert proc.returncode == 0, err.decode()[-2000:]
    assert len(bodies) == 2 and all(b["ignore_eos"] is False and b["temperature"] == 0.2 for b in bodies)
    assert "did not honour ignore_eos" not in err.decode()
    assert json.loads((tmp_path / "result.json").read_text())["config"]["ignore_eos"] is False


@pytest.mark.parametrize(
    "cap, rate, unwritten",
    [(None, 50.0, "client_queue_time,e2el_including_client_queue"), (2, math.inf, "e2el_including_client_queue")],
)
async def test_percentile_metrics_the_run_cannot_write_are_named(
    cap: int | None, rate: float, unwritten: str, tmp_path: Path
) -> None:
    """``--percentile-metrics ttft,client_queue_time,e2el_including_client_queue`` with no
    --max-concurrency (or at --request-rate inf, for the last) wrote no figure of the queue's and
    said nothing, as vLLM's: the user found the record without what the command asked for."""

    async def completions(request: web.Request) -> web.StreamResponse:
        return await _stream(request, [CHUNK, LAST])

    spec = WorkloadSpec(requests=2, rate=rate, lengths="fixed", prompt_len=4, output_len=2, adapter_names=(None,))
    console = Console(file=io.StringIO(), width=300)
    named = ("ttft", "client_queue_time", "e2el_including_client_queue")
    async with serving(completions) as url:
        await run(
            spec,
            url,
            tmp_path,
            console,
            RunOptions(max_concurrency=cap, record=RecordOptions(percentile_metrics=named)),
        )
    assert f"--percentile-metrics {unwritten}: not written" in console.file.getvalue()
    v = json.loads((tmp_path / "vllm-result.json").read_text())
    assert "mean_ttft_ms" in v and all(f"mean_{m}_ms" not in v for m in unwritten.split(","))


async def test_an_answers_text_is_held_in_its_pieces_and_joined_once(tmp_path: Path) -> None:
    """vllm-result.json's generated_texts were built by adding each streamed piece to the text so
    far: an output of n pieces copied some n²/2 of them (8,000 tokens of a reasoning model: ~128 MB
    a request), in the event loop that stamps the token times. The pieces are held as they come and
    joined once, for the record."""
    from dlora.loadgen.clients import HttpClient
    from dlora.loadgen.runner import Clock, replay
    from dlora.loadgen.workload import RequestSpec

    n = 200

    async def completions(request: web.Request) -> web.StreamResponse:
        return await _stream(request, [CHUNK] * (n - 1) + [LAST])

    async with serving(completions) as url:
        clock = Clock()
        client = HttpClient(url, "model", clock)
        specs = [RequestSpec(arrival_s=0.0, adapter=None, prompt_len=4, output_len=n)]
        try:
            [r], _ = await replay(specs, client, clock, 10.0, asyncio.Event())
        finally:
            await client.close()
    assert r.completed and len(r.pieces) == n and r.text == "a" * (n - 1) + "b"


async def test_a_stream_that_ends_in_an_error_event_fails_its_request(tmp_path: Path) -> None:
    """vLLM's server reports a generation that fails after its 200 in-band, ``data: {"error": ...}``
    then ``[DONE]``; vLLM's bench reads only choices and usage and counts such a request completed,
    its fragment in the throughput and latencies (vLLM PR #57519 and SGLang PR #38868 fail it).
    dlora loadgen fails it, with the server's message, on purpose: kept, not vLLM's reading."""
    engine_died = {"error": {"message": "EngineCore encountered an issue", "type": "InternalServerError", "code": 500}}

    async def completions(request: web.Request) -> web.StreamResponse:
        return await _stream(request, [CHUNK, CHUNK, engine_died])

    spec = WorkloadSpec(requests=2, rate=50.0, lengths="fixed", prompt_len=4, output_len=4, adapter_names=(None,))
    async with serving(completions) as url:
        summary = await run(spec, url, tmp_path, Console(file=io.StringIO()))
    assert (summary["completed"], summary["failed"]) == (0, 2)
    v = json.loads((tmp_path / "vllm-result.json").read_text())
    assert v["errors"] == ["EngineCore encountered an issue"] * 2 and v["output_lens"] == [0, 0]
    assert v["generated_texts"] == ["", ""] and all(len(i) == 1 for i in v["itls"])


async def test_a_model_folder_whose_tokenizer_has_no_vocabulary_is_refused_not_counted_zero(tmp_path: Path) -> None:
    """--model FOLDER is the completions backend's default tokenizer where the folder holds
    tokenizer_config.json. One without its vocabulary files (a partial download) loaded as an
    empty tokenizer (transformers 5 builds one from the config alone): every output without usage
    counted 0 tokens, each request "completed" with output_lens 0 and the run warned that the
    target ignored ignore_eos. A reviewer's trial; refused before the run now, naming the folder."""
    folder = tmp_path / "partial"
    folder.mkdir()
    (folder / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "LlamaTokenizer"}))
    spec = WorkloadSpec(requests=1, rate=50.0, lengths="fixed", prompt_len=4, output_len=2, adapter_names=(None,))
    with pytest.raises(ValueError, match="partial holds no tokenizer"):
        await run(
            spec,
            "http://127.0.0.1:9",
            tmp_path / "out",
            Console(file=io.StringIO()),
            RunOptions(base_model=str(folder)),
        )
    assert not (tmp_path / "out").exists()  # refused before the run wrote anything
