"""vLLM bench options that shape each HTTP request or the record's file: --header,
--served-model-name, --append-result (against the gateway, or a server written here that shows
what it was sent)."""

from __future__ import annotations

import io
import json
from pathlib import Path

from aiohttp import web
from rich.console import Console

from dlora.loadgen.main import RunOptions, run
from dlora.loadgen.spec import WorkloadSpec
from dlora.loadgen.vllm_record import RecordOptions
from dlora.services.cli import build_parser
from tests.integration.conftest import Stack
from tests.integration.test_loadgen_streams import CHUNK, LAST, _stream, serving

SPEC = WorkloadSpec(requests=2, rate=50.0, lengths="fixed", prompt_len=4, output_len=2, adapter_names=(None,))


async def test_headers_go_with_every_request_over_the_keys(tmp_path: Path) -> None:
    """vLLM's --header KEY=VALUE (a gateway in front that routes or bills by a header) was refused:
    each is sent with every request and the model list, over --api-key's Authorization as vLLM's
    bench merges them; result.json records their names, not their values (credentials, at times)."""
    seen: list[dict[str, str]] = []

    async def completions(request: web.Request) -> web.StreamResponse:
        seen.append(dict(request.headers))
        return await _stream(request, [CHUNK, LAST])

    argv = ["loadgen", "--header", "X-Tenant=blue=1", "Authorization=Bearer from-header", "--api-key", "k"]
    args = build_parser().parse_args(argv)
    async with serving(completions) as url:
        summary = await run(
            SPEC,
            url,
            tmp_path,
            Console(file=io.StringIO()),
            RunOptions(api_key=args.api_key, headers=dict(args.header)),
        )
    assert summary["completed"] == 2 and len(seen) == 2
    assert all(h["X-Tenant"] == "blue=1" and h["Authorization"] == "Bearer from-header" for h in seen)
    assert json.loads((tmp_path / "result.json").read_text())["config"]["headers"] == ["Authorization", "X-Tenant"]


async def test_an_authorization_header_in_any_case_replaces_the_keys(tmp_path: Path) -> None:
    """HTTP field names are case-insensitive: ``--header authorization=...`` beside --api-key sent
    two Authorization headers, and a server reading the first took the key's, not the header's."""
    seen: list[list[str]] = []

    async def completions(request: web.Request) -> web.StreamResponse:
        seen.append(request.headers.getall("Authorization"))
        return await _stream(request, [CHUNK, LAST])

    async with serving(completions) as url:
        await run(
            SPEC,
            url,
            tmp_path,
            Console(file=io.StringIO()),
            RunOptions(api_key="k", headers={"authorization": "Bearer h"}),
        )
    assert seen == [["Bearer h"]] * 2


async def test_the_served_model_name_is_what_requests_name_and_the_folder_their_tokenizer(
    stack: Stack, tmp_path: Path
) -> None:
    """``--model FOLDER --served-model-name NAME`` (vLLM's: the tokenizer from the folder, NAME in
    each request) was refused; with --model alone every request named the folder and the gateway
    answered 404."""
    folder = str(stack.tiny.model)
    argv = ["loadgen", "--model", folder, "--served-model-name", "model", "--num-prompts", "4", "--request-rate", "20"]
    # a few short requests: the default 100 of the trace's lengths took 50 s, all to finish in --duration's grace
    argv += ["--dataset-name", "random", "--random-input-len", "8", "--random-output-len", "2"]
    args = build_parser().parse_args(argv)
    shown = io.StringIO()
    spec = WorkloadSpec.from_args(args)
    assert spec.adapter_names == (None,)
    summary = await run(
        spec,
        stack.url,
        tmp_path,
        Console(file=shown),
        RunOptions(base_model=folder, served_model_name=args.served_model_name),
    )
    assert summary["sent"] == summary["completed"] > 0 and summary["failed"] == 0
    assert "not served" not in shown.getvalue()
    config = json.loads((tmp_path / "result.json").read_text())["config"]
    assert (config["served_model_name"], config["tokenizer"]) == ("model", folder)
    assert json.loads((tmp_path / "vllm-result.json").read_text())["model_id"] == folder  # vLLM's: --model


async def test_append_result_adds_each_runs_record_as_a_line(tmp_path: Path) -> None:
    """vLLM's --append-result (one file over a sweep of rates) was refused: each run wrote the
    record over the last. Appended, each run's record is one line of JSON after the last's."""

    async def completions(request: web.Request) -> web.StreamResponse:
        return await _stream(request, [CHUNK, LAST])

    args = build_parser().parse_args(["loadgen", "--append-result", "--result-filename", "sweep.jsonl"])
    record = RecordOptions.from_args(args)
    async with serving(completions) as url:
        for rate in (10.0, 20.0):
            spec = WorkloadSpec(
                requests=2, rate=rate, lengths="fixed", prompt_len=4, output_len=2, adapter_names=(None,)
            )
            await run(spec, url, tmp_path, Console(file=io.StringIO()), RunOptions(record=record))
    lines = (tmp_path / "sweep.jsonl").read_text().splitlines()
    assert [json.loads(line)["request_rate"] for line in lines] == [10.0, 20.0]
    assert [json.loads(line)["completed"] for line in lines] == [2, 2]


async def test_append_result_after_a_record_written_whole_keeps_the_file_json_lines(tmp_path: Path) -> None:
    """A run without --append-result writes the record indented; a sweep then appended into the
    same --out put its lines after it: a file neither JSON nor JSON Lines. A vLLM-written file's
    last line has no line break: the next record ran onto it."""

    async def completions(request: web.Request) -> web.StreamResponse:
        return await _stream(request, [CHUNK, LAST])

    appended = RecordOptions.from_args(build_parser().parse_args(["loadgen", "--append-result"]))
    (tmp_path / "vllm.jsonl").write_text(json.dumps({"request_rate": 1.0}))  # vLLM's: no line break
    named = RecordOptions.from_args(
        build_parser().parse_args(["loadgen", "--append-result", "--result-filename", "vllm.jsonl"])
    )
    async with serving(completions) as url:
        for rate, record in ((10.0, RecordOptions()), (20.0, appended), (30.0, named)):
            spec = WorkloadSpec(
                requests=2, rate=rate, lengths="fixed", prompt_len=4, output_len=2, adapter_names=(None,)
            )
            await run(spec, url, tmp_path, Console(file=io.StringIO()), RunOptions(record=record))
    for name, rates in (("vllm-result.json", [10.0, 20.0]), ("vllm.jsonl", [1.0, 30.0])):
        lines = (tmp_path / name).read_text().splitlines()
        assert [json.loads(line)["request_rate"] for line in lines] == rates, name
