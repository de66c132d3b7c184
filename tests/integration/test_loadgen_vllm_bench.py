"""The load generator as vLLM's ``vllm bench serve``: the options its users type, the fields of its
record, against servers written here."""

from __future__ import annotations

import io
import json
from pathlib import Path

from aiohttp import web
from rich.console import Console

from dlora.loadgen.main import run
from dlora.loadgen.spec import WorkloadSpec
from dlora.services.cli import build_parser
from tests.integration.test_loadgen_streams import CHUNK, _stream, serving


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
        summary = await run(spec, url, tmp_path, console, ignore_eos=False)
    assert summary["completed"] == 3 and summary["failed"] == 0 and all("ignore_eos" not in b for b in bodies)
    assert summary["short"] == 3 and "did not honour ignore_eos" not in console.file.getvalue()
    assert json.loads((tmp_path / "result.json").read_text())["config"]["ignore_eos"] is False
