"""`dlora loadgen` against the running stack, over HTTP and over NATS: nothing lost, a full report."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import msgspec
import pytest
from redis.asyncio import Redis
from rich.console import Console

from dlora.common import subjects
from dlora.common.messages import GenerateRequest
from dlora.loadgen.main import RunOptions, run
from dlora.loadgen.metrics import SLO
from dlora.loadgen.options import add_arguments
from dlora.loadgen.prompt_text import ordinary_ids
from dlora.loadgen.spec import WorkloadSpec
from dlora.loadgen.workload import build_specs, prompt_ids
from dlora.model.make_tiny import TinyOutput
from dlora.model.tokenizer import load_tokenizer
from dlora.services.cli import build_parser
from dlora.services.servers import Server
from tests.integration.conftest import Stack, run_stack
from tests.integration.test_gateway import post, stream


@pytest.mark.parametrize("via", ["http", "nats"])
async def test_loadgen_run_loses_nothing_and_reports(stack: Stack, tmp_path: Path, via: str) -> None:
    target = stack.url if via == "http" else stack.nc._current_server.uri.geturl()
    spec = WorkloadSpec(
        requests=24,
        rate=20.0,
        # Far past the arrivals' ~1.2 s: the run ends once its requests do, and a stall of the
        # test's process (9 s at load 13) left the last arrival past a 10 s duration, not sent.
        duration=60.0,
        lengths="uniform",
        prompt_len=12,
        output_len=8,
        popularity="zipf",
        alpha=1.1,
        adapters=3,
    )
    with open(tmp_path / "console.txt", "w") as log:
        summary = await run(spec, target, tmp_path, Console(file=log, width=160), RunOptions(slo=SLO(ttft_s=5)))
    assert summary["sent"] == 24 and summary["completed"] == 24 and summary["lost"] == 0 and summary["failed"] == 0
    assert summary["throughput_tok_s"] > 0 and summary["ttft_s"]["p50"] is not None
    result = json.loads((tmp_path / "result.json").read_text())
    assert set(result) == {"config", "summary", "by_adapter", "slowest"}
    assert len(result["slowest"]) == 5 and all(r["tokens"] > 0 and r["error"] is None for r in result["slowest"])
    config = result["config"]
    assert (config["target"], config["slo_ttft"], config["alpha"], config["out"]) == (target, 5, 1.1, str(tmp_path))
    assert sum(a["sent"] for a in result["by_adapter"].values()) == 24
    assert (tmp_path / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "data:image/png;base64," in (tmp_path / "report.html").read_text()
    assert "lost" in (tmp_path / "console.txt").read_text()
    # vLLM's generated_texts: each answer's text, over NATS too (the worker's chunks carry it)
    v = json.loads((tmp_path / "vllm-result.json").read_text())
    assert len(v["generated_texts"]) == 24 and any(v["generated_texts"]), v["generated_texts"]


async def _run_chat(spec: WorkloadSpec, url: str, out: Path, model: Path) -> dict:
    """``spec`` run with vLLM's --backend openai-chat against ``url``, its prompts decoded by
    ``model``'s tokenizer; the console's lines in ``out``/console.txt."""
    with open(out / "console.txt", "w") as log:
        return await run(
            spec, url, out, Console(file=log, width=160), RunOptions(backend="openai-chat", tokenizer=str(model))
        )


async def test_loadgen_chat_backend_goes_through_the_chat_template(stack: Stack, tmp_path: Path) -> None:
    """vLLM's --backend openai-chat: the same workload as text in one user message to
    /v1/chat/completions (what most deployments serve, through the gateway's chat template and
    tokenizer); streamed chat deltas time the tokens, the server's usage counts the prompt (the
    template adds tokens to the workload's)."""
    spec = WorkloadSpec(requests=6, rate=20.0, duration=10.0, lengths="fixed", prompt_len=12, output_len=5, adapters=2)
    summary = await _run_chat(spec, stack.url, tmp_path, stack.tiny.model)
    assert summary["sent"] == summary["completed"] == 6 and summary["failed"] == summary["short"] == 0
    assert summary["total_output_tokens"] == 6 * 5 and summary["ttft_s"]["p50"] is not None
    v = json.loads((tmp_path / "vllm-result.json").read_text())
    assert (v["backend"], v["tokenizer_id"]) == ("openai-chat", str(stack.tiny.model))
    assert v["output_lens"] == [5] * 6 and all(len(itls) == 4 for itls in v["itls"])
    assert all(n > 12 for n in v["input_lens"]) and v["total_input_tokens"] == sum(v["input_lens"])
    assert all(t > 0 for t in v["latencies"]) and len(v["start_times"]) == 6
    # the template's own tokens on top of the workload's 12, not the ids' text re-encoded longer
    # (random ids' text came back ~1.45x: the default workload overran `make run`'s context)
    _, empty = await post(stack, "/tokenize", {"model": "lora-0", "messages": [{"role": "user", "content": ""}]})
    assert all(n <= empty["count"] + 12 for n in v["input_lens"]), (v["input_lens"], empty["count"])


@pytest.mark.parametrize(
    "argv, refusal",
    [
        (["--backend", "openai-chat", "--target", "nats://127.0.0.1:4222"], "NATS target takes token ids"),
        # the completions backend takes it (it counts outputs the server's usage does not): loaded first
        (["--backend", "vllm", "--tokenizer", "no/such/folder"], "no/such/folder holds no tokenizer"),
        (["--backend", "openai-chat", "--tokenizer", "no/such/folder"], "no/such/folder holds no tokenizer"),
        # a --base-model that is a name, no folder (the default "model"): refused at once (transformers
        # asked the Hub for that repository, five retries offline, ~50 s, then named no option)
        (["--backend", "openai-chat", "--base-model", "served-name"], "openai-chat needs --tokenizer FOLDER"),
    ],
)
def test_loadgen_chat_options_refused_where_they_do_nothing(
    argv: list[str], refusal: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = build_parser().parse_args(["loadgen", "--requests", "1", "--out", str(tmp_path), *argv])
    assert args.func(args) == 2
    assert refusal in capsys.readouterr().err


def test_loadgen_chat_refuses_a_folder_without_a_tokenizer(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # the default --base-model "model", run in the repository's root, is its `model/` package: a
    # folder, no tokenizer; it was taken as a model folder and refused as one holding no tokenizer
    package = tmp_path / "model"
    package.mkdir()
    (package / "__init__.py").write_text("")
    argv = ["loadgen", "--requests", "1", "--out", str(tmp_path / "out"), "--backend", "openai-chat"]
    args = build_parser().parse_args([*argv, "--base-model", str(package)])
    assert args.func(args) == 2
    assert "openai-chat needs --tokenizer FOLDER" in capsys.readouterr().err


def test_cli_knows_the_loadgen_options() -> None:
    args = build_parser().parse_args(
        [
            "loadgen",
            "--arrivals",
            "gamma",
            "--cv",
            "4",
            "--popularity",
            "stride",
            "--stride",
            "8",
            "--shift-every",
            "30",
        ]
    )
    assert (args.cv, args.stride, args.shift_every) == (4.0, 8, 30.0)
    assert callable(add_arguments)


async def test_loadgen_chat_backend_counts_a_reasoning_parsers_deltas_at_once(
    nats_server: Server, redis: Redis, tiny_llama: TinyOutput, tmp_path: Path
) -> None:
    """With the gateway's reasoning_parser the random model's output goes out as ``delta.reasoning``
    (the template opened a think block): each such event is a token, as vLLM's benchmark times them,
    and all requests sent at once (--rate inf) to several adapters complete with every token counted."""
    spec = WorkloadSpec(requests=6, rate=math.inf, lengths="fixed", prompt_len=12, output_len=5, adapters=2)
    async with run_stack(nats_server, redis, tiny_llama, reasoning_parser="qwen3") as stack:
        summary = await _run_chat(spec, stack.url, tmp_path, tiny_llama.model)
        chat = {"model": "lora-0", "messages": [{"role": "user", "content": "kalo"}], "max_completion_tokens": 5}
        events = await stream(stack, "/v1/chat/completions", chat | {"ignore_eos": True})
    deltas = [e["choices"][0]["delta"] for e in events if isinstance(e, dict) and e.get("choices")]
    assert any(d.get("reasoning") for d in deltas), deltas  # (what the run read)
    assert summary["sent"] == summary["completed"] == 6 and summary["failed"] == summary["short"] == 0
    v = json.loads((tmp_path / "vllm-result.json").read_text())
    assert v["output_lens"] == [5] * 6 and all(len(itls) == 4 for itls in v["itls"])
    lists = ("input_lens", "output_lens", "ttfts", "itls", "latencies", "start_times", "errors")
    assert all(len(v[k]) == v["num_prompts"] for k in lists)


async def test_loadgen_chat_backend_names_the_templates_refusal_in_its_failures(stack: Stack, tmp_path: Path) -> None:
    """A chat template that refuses the messages: the gateway answers each chat 400 with its
    reason; the run counts them failed, by that reason, and does not stop. (A model without a
    template is served a plain transcript by the gateway, not refused.)"""
    tok = stack.gateway.tokenizer
    saved = getattr(tok, "chat_template", None)
    tok.chat_template = "{{ raise_exception('this model takes no chat') }}"
    spec = WorkloadSpec(requests=3, rate=20.0, duration=5.0, lengths="fixed", prompt_len=8, output_len=3, adapters=2)
    try:
        summary = await _run_chat(spec, stack.url, tmp_path, stack.tiny.model)
    finally:
        tok.chat_template = saved
    assert summary["sent"] == summary["failed"] == 3 and summary["completed"] == 0
    v = json.loads((tmp_path / "vllm-result.json").read_text())
    assert all(e.startswith("HTTP 400") and "takes no chat" in e for e in v["errors"]), v["errors"]
    assert len(v["latencies"]) == len(v["start_times"]) == len(v["errors"]) == 3 and v["latencies"] == [0.0] * 3


async def test_a_nats_run_draws_its_prompts_from_the_model_folders_vocabulary(stack: Stack, tmp_path: Path) -> None:
    """Over NATS the prompts stayed ids 3..255 (--tokenizer refused there), where an HTTP run
    of the same model folder drew from its tokenizer: ``--model FOLDER`` (or ``--tokenizer``) gives
    a NATS run the same prompts as an HTTP one, drawn over the whole vocabulary (the demo's 3..511)."""
    seen: list[GenerateRequest] = []

    async def heard(msg: Any) -> None:
        seen.append(msgspec.json.decode(msg.data, type=GenerateRequest))

    sub = await stack.nc.subscribe(subjects.requests_of("app"), cb=heard)
    spec = WorkloadSpec(requests=4, rate=20.0, duration=10.0, lengths="fixed", prompt_len=64, output_len=2, adapters=2)
    target = stack.nc._current_server.uri.geturl()
    try:
        with open(tmp_path / "console.txt", "w") as log:
            summary = await run(spec, target, tmp_path, Console(file=log), RunOptions(base_model=str(stack.tiny.model)))
        await stack.nc.flush()
    finally:
        await sub.unsubscribe()
    assert summary["completed"] == 4 and len(seen) == 4
    vocab = ordinary_ids(load_tokenizer(stack.tiny.model))
    assert sorted(r.prompt_token_ids for r in seen) == sorted(
        prompt_ids(i, s, ids=vocab) for i, s in enumerate(build_specs(spec))
    )
    assert max(t for r in seen for t in r.prompt_token_ids) > 255
