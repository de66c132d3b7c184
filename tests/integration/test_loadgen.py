"""`dlora loadgen` against the running stack, over HTTP and over NATS: nothing lost, a full report."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from rich.console import Console

from dlora.loadgen.main import run
from dlora.loadgen.metrics import SLO
from dlora.loadgen.options import add_arguments
from dlora.loadgen.spec import WorkloadSpec
from dlora.services.cli import build_parser
from tests.integration.conftest import Stack


@pytest.mark.parametrize("via", ["http", "nats"])
async def test_loadgen_run_loses_nothing_and_reports(stack: Stack, tmp_path: Path, via: str) -> None:
    target = stack.url if via == "http" else stack.nc._current_server.uri.geturl()
    spec = WorkloadSpec(
        requests=24,
        rate=20.0,
        duration=10.0,
        lengths="uniform",
        prompt_len=12,
        output_len=8,
        popularity="zipf",
        alpha=1.1,
        adapters=3,
    )
    with open(tmp_path / "console.txt", "w") as log:
        summary = await run(spec, target, tmp_path, Console(file=log, width=160), slo=SLO(ttft_s=5))
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


async def test_loadgen_chat_backend_goes_through_the_chat_template(stack: Stack, tmp_path: Path) -> None:
    """vLLM's --backend openai-chat: the same workload as text in one user message to
    /v1/chat/completions (what most deployments serve, through the gateway's chat template and
    tokenizer); streamed chat deltas time the tokens, the server's usage counts the prompt (the
    template adds tokens to the workload's)."""
    spec = WorkloadSpec(requests=6, rate=20.0, duration=10.0, lengths="fixed", prompt_len=12, output_len=5, adapters=2)
    with open(tmp_path / "console.txt", "w") as log:
        summary = await run(
            spec,
            stack.url,
            tmp_path,
            Console(file=log, width=160),
            backend="openai-chat",
            tokenizer=str(stack.tiny.model),
        )
    assert summary["sent"] == summary["completed"] == 6 and summary["failed"] == summary["short"] == 0
    assert summary["total_output_tokens"] == 6 * 5 and summary["ttft_s"]["p50"] is not None
    v = json.loads((tmp_path / "vllm-result.json").read_text())
    assert (v["backend"], v["tokenizer_id"]) == ("openai-chat", str(stack.tiny.model))
    assert v["output_lens"] == [5] * 6 and all(len(itls) == 4 for itls in v["itls"])
    assert all(n > 12 for n in v["input_lens"]) and v["total_input_tokens"] == sum(v["input_lens"])
    assert all(t > 0 for t in v["latencies"]) and len(v["start_times"]) == 6


@pytest.mark.parametrize(
    "argv, refusal",
    [
        (["--backend", "openai-chat", "--target", "nats://127.0.0.1:4222"], "NATS target takes token ids"),
        (["--tokenizer", "some/folder"], "--tokenizer decodes the prompts for --backend openai-chat"),
        (["--backend", "openai-chat", "--tokenizer", "no/such/folder"], "no/such/folder holds no tokenizer"),
    ],
)
def test_loadgen_chat_options_refused_where_they_do_nothing(
    argv: list[str], refusal: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = build_parser().parse_args(["loadgen", "--requests", "1", "--out", str(tmp_path), *argv])
    assert args.func(args) == 2
    assert refusal in capsys.readouterr().err


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
