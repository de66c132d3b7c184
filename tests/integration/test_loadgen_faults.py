"""`dlora loadgen` when the other side misbehaves (a user's trial): a stream not in OpenAI's form,
an error given as a string, a NATS server that goes away mid-run. Each request is failed with a
reason, no task's exception goes unretrieved, and the run ends with its report."""

from __future__ import annotations

import asyncio
import io
import json
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
from aiohttp import web
from rich.console import Console

from dlora.loadgen.clients import HttpClient, NatsClient
from dlora.loadgen.main import run
from dlora.loadgen.runner import Clock, replay
from dlora.loadgen.spec import WorkloadSpec
from dlora.loadgen.workload import RequestSpec
from dlora.services.servers import free_port, start_nats

BODIES = ['data: {"foo": 1}\n\n', 'data: {"error": "boom"}\n\n', "data: hello\n\n"]


async def test_a_stream_not_in_openai_form_fails_its_request_with_a_reason() -> None:
    """It raised KeyError, AttributeError or JSONDecodeError inside a task nobody awaited: the
    requests were counted cut, and the run exited 0."""
    served = iter(BODIES)

    async def completions(request: web.Request) -> web.StreamResponse:
        await request.read()
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await response.write(next(served).encode())
        await response.write_eof()
        return response

    app = web.Application()
    app.router.add_post("/v1/completions", completions)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    unretrieved: list[dict] = []
    asyncio.get_running_loop().set_exception_handler(lambda _, context: unretrieved.append(context))
    clock = Clock()
    client = HttpClient(f"http://127.0.0.1:{port}", "model", clock)
    specs = [RequestSpec(arrival_s=0.01 * i, adapter=None, prompt_len=4, output_len=4) for i in range(3)]
    try:
        results, _ = await replay(specs, client, clock, 10.0, asyncio.Event())
    finally:
        await client.close()
        await runner.cleanup()
    errors = [r.error or "" for r in results]
    # (an event without choices is none of the completion's: read on, the stream ends without a finish)
    assert errors[0] == "the stream ended without a finish" and errors[1] == "boom"
    assert errors[2].startswith("JSONDecodeError")
    assert not any(r.cut for r in results) and not unretrieved


async def test_a_nats_server_that_goes_away_fails_what_waits_and_the_report_is_written(tmp_path: Path) -> None:
    """It hung until the grace ran out, printed a traceback per request, then lost the report to
    one more from closing the closed connection (exit 1, no result.json)."""
    server = start_nats(jetstream=False)
    spec = WorkloadSpec(requests=6, rate=20.0, duration=30.0, lengths="fixed", prompt_len=4, output_len=4)

    async def stop_soon() -> None:
        await asyncio.sleep(1.0)  # requests sent, none answered (no worker)
        server.stop()

    stopper = asyncio.create_task(stop_soon())
    with open(tmp_path / "console.txt", "w") as log:
        summary = await asyncio.wait_for(run(spec, server.url, tmp_path, Console(file=log)), timeout=20)
    await stopper
    assert summary["sent"] == 6 and summary["failed"] == 6, summary
    assert "NATS connection closed" in summary["errors"][0]
    assert (tmp_path / "result.json").is_file()


async def test_a_port_that_is_not_nats_says_why_in_words() -> None:
    """'cannot connect to NATS at nats://127.0.0.1:8137: ' (the gateway's port) ended with an empty
    reason: nats-py's timeout there says nothing."""
    runner = web.AppRunner(web.Application())  # an HTTP server, as a gateway's port is
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        with pytest.raises(OSError, match=r"cannot connect to NATS at nats://127\.0\.0\.1:\d+: \S"):
            await NatsClient.connect(f"nats://127.0.0.1:{port}", Clock())
    finally:
        await runner.cleanup()


async def test_an_out_that_is_a_file_is_refused_before_the_run(tmp_path: Path) -> None:
    """It ran the whole schedule, then lost the results: `[Errno 20] Not a directory`."""
    (tmp_path / "afile").write_text("")
    spec = WorkloadSpec(requests=2, rate=1.0, lengths="fixed", prompt_len=4, output_len=4)
    clock = Clock()
    start = clock()
    with pytest.raises(NotADirectoryError, match="--out .*afile is a file"):
        await run(spec, f"http://127.0.0.1:{free_port()}", tmp_path / "afile", Console(file=io.StringIO()))
    assert clock() - start < 1.0  # nothing was sent (the first request would wait a second)


# An OpenAI-compatible server whose completions never answer, in a process of its own: it marks
# each route asked (a file named after it in argv[1]), holds /v1/models argv[2] seconds, and
# writes the port it took to argv[1]/port (a port chosen free beforehand was taken meanwhile by
# another test's server, and the run talked to that one: twice, exit 1 with all 20 requests cut).
SLOW_SERVER = """
import asyncio, pathlib, socket, sys
from aiohttp import web
here = pathlib.Path(sys.argv[1])
async def models(_):
    (here / "models").touch(); await asyncio.sleep(float(sys.argv[2]))
    return web.json_response({"object": "list", "data": [{"id": "model", "object": "model"}]})
async def completions(_):
    (here / "completions").touch(); await asyncio.sleep(3600)
app = web.Application(); app.router.add_get("/v1/models", models); app.router.add_post("/v1/completions", completions)
sock = socket.socket(); sock.bind(("127.0.0.1", 0)); sock.listen(64)
(here / "port.tmp").write_text(str(sock.getsockname()[1])); (here / "port.tmp").rename(here / "port")
web.run_app(app, sock=sock, print=None)
"""


def test_ctrl_c_writes_the_report_says_so_and_exits_130(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """An interrupted run said nothing on the terminal and exited 0 (`interrupted: true` only in
    result.json). Ctrl-C is pressed once a completion request reached the server (on a 2 s timer
    it missed the run in fresh-clone runs: exit 1, every request sent and cut)."""
    import os
    import signal
    import subprocess
    import sys
    import threading
    import time

    from dlora.loadgen.main import run_loadgen
    from dlora.services.cli import build_parser

    done = threading.Event()
    server = subprocess.Popen([sys.executable, "-c", SLOW_SERVER, str(tmp_path), "0"])

    def interrupt() -> None:  # never once the run is over (it would stop a later test)
        while not done.wait(0.05):
            if (tmp_path / "completions").exists():
                os.kill(os.getpid(), signal.SIGINT)
                return

    pressing = threading.Thread(target=interrupt, daemon=True)
    try:
        for _ in range(300):  # up: listening on the port it wrote
            if (tmp_path / "port").exists():
                break
            time.sleep(0.1)
        port = int((tmp_path / "port").read_text())
        argv = ["loadgen", "--target", f"http://127.0.0.1:{port}", "--requests", "20", "--rate", "2"]
        args = build_parser().parse_args([*argv, "--adapter-names", "-", "--out", str(tmp_path / "out")])
        pressing.start()
        assert run_loadgen(args) == 130
    finally:
        done.set()
        pressing.join()
        server.kill()
        server.wait()
    err = capsys.readouterr().err
    assert "Traceback" not in err and "interrupted" in err
    assert json.loads((tmp_path / "out" / "result.json").read_text())["config"]["interrupted"]  # written, says so


async def test_a_target_that_is_not_an_openai_server_is_refused_before_the_run() -> None:
    """A refused port, a NATS port or `python -m http.server` ran the whole schedule of failures."""
    client = HttpClient(f"http://127.0.0.1:{free_port()}", "model", Clock())
    try:
        with pytest.raises(OSError, match="cannot reach http://127.0.0.1:.*/v1/models"):
            await client.served_models()
    finally:
        await client.close()


async def _model_list(models: Callable[[web.Request], Awaitable[web.Response]]) -> tuple[web.AppRunner, int]:
    """A server of ``GET /v1/models`` set up (not yet listening), and the free port it is for."""
    app = web.Application()
    app.router.add_get("/v1/models", models)
    runner = web.AppRunner(app)
    await runner.setup()
    return runner, free_port()


async def test_a_target_given_as_the_openai_base_url_is_told_to_drop_its_v1() -> None:
    """A user of the openai package gives loadgen the base_url they know, ending in /v1: the run
    stopped on "http://.../v1/v1/models answered HTTP 404", the fix left to be guessed."""

    async def models(request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": "model"}]})

    runner, port = await _model_list(models)
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        for target in (f"http://127.0.0.1:{port}/v1", f"http://127.0.0.1:{port}/v1/"):
            client = HttpClient(target, "model", Clock())
            try:
                with pytest.raises(OSError, match=r"answered HTTP 404.*--target is the server's root, without /v1"):
                    await client.served_models()
            finally:
                await client.close()
        client = HttpClient(f"http://127.0.0.1:{port}", "model", Clock())
        try:
            assert await client.served_models() == {"model"}
        finally:
            await client.close()
    finally:
        await runner.cleanup()


async def test_the_model_list_is_retried_as_a_request_is() -> None:
    """An operator's drill: `dlora loadgen --max-retries 5` against a gateway restarting exited 2
    on its first `/v1/models`, refused, before sending anything. It is retried (a refused
    connection until the gateway listens, then its 503s) and the run goes on; out of retries,
    the error names how many tries it made."""
    answers = iter([503, 503, 200])
    asked: list[int] = []

    async def models(request: web.Request) -> web.Response:
        asked.append(status := next(answers))
        if status != 200:  # as the gateway's 503: a Retry-After (here short)
            return web.json_response({"error": "starting"}, status=status, headers={"retry-after-ms": "10"})
        return web.json_response({"object": "list", "data": [{"id": "model"}]})

    runner, port = await _model_list(models)
    retries: list[str] = []
    started: list[asyncio.Task[None]] = []

    def on_retry(why: str, wait_s: float) -> None:  # the gateway comes up at the first retry's wait
        retries.append(why)
        if not started:
            started.append(asyncio.ensure_future(web.TCPSite(runner, "127.0.0.1", port).start()))

    client = HttpClient(f"http://127.0.0.1:{port}", "model", Clock(), max_retries=5)
    try:
        assert await client.served_models(on_retry) == {"model"}
        assert asked == [503, 503, 200]
        assert ["cannot reach" in why for why in retries] == [True, False, False]
        await runner.cleanup()
        client.max_retries = 1  # refused again: out of retries, it says how many tries it made
        with pytest.raises(OSError, match=r"cannot reach .*/v1/models: .* \(after 2 tries, --max-retries 1\)"):
            await client.served_models()
        # an answer not retried ends the tries sooner: the error names the --max-retries given
        # (it said "--max-retries 1" for the one retry made of 5)
        runner, port = await _model_list(models)
        await web.TCPSite(runner, "127.0.0.1", port).start()
        answers, client.max_retries = iter([503, 500]), 5
        client.url = f"http://127.0.0.1:{port}"
        with pytest.raises(OSError, match=r"HTTP 500 \(after 2 tries, --max-retries 5\)"):
            await client.served_models()
    finally:
        await client.close()
        await runner.cleanup()


async def test_the_client_sets_no_deadline_of_its_own_shorter_than_the_run() -> None:
    """The HTTP client's session had a 600 s total timeout: in a --duration 900 run against a
    server whose queue had grown past ten minutes, requests still being served were counted failed
    ("TimeoutError: ", no reason), not timed or cut at the duration and its grace as the README
    says (vLLM's benchmark allows 6 h). The run bounds every request; the client adds none."""
    client = HttpClient(f"http://127.0.0.1:{free_port()}", "model", Clock())
    try:
        assert client.session.timeout.total is None and client.session.timeout.sock_read is None
    finally:
        await client.close()


def test_sigterm_writes_the_report_says_so_and_exits_143(tmp_path: Path) -> None:
    """`timeout 600 dlora loadgen ...` (or a CI step's, a Kubernetes Job's deadline) sent SIGTERM
    and the run ended with nothing written, though Ctrl-C writes the report. Sent once a completion
    request reached the server, to a loadgen process of its own."""
    import signal
    import subprocess
    import sys
    import time

    server = subprocess.Popen([sys.executable, "-c", SLOW_SERVER, str(tmp_path), "0"])
    loadgen = None
    try:
        for _ in range(300):
            if (tmp_path / "port").exists():
                break
            time.sleep(0.1)
        port = int((tmp_path / "port").read_text())
        argv = ["loadgen", "--target", f"http://127.0.0.1:{port}", "--requests", "20", "--rate", "2"]
        loadgen = subprocess.Popen(
            [sys.executable, "-m", "dlora.services.cli", *argv, "--adapter-names", "-", "--out", str(tmp_path / "out")],
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(300):
            if (tmp_path / "completions").exists():
                break
            time.sleep(0.1)
        loadgen.send_signal(signal.SIGTERM)
        _, err = loadgen.communicate(timeout=60)
    finally:
        for proc in (loadgen, server):
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait()
    assert loadgen.returncode == 143, err
    assert "Traceback" not in err and "interrupted (SIGTERM)" in err
    assert json.loads((tmp_path / "out" / "result.json").read_text())["config"]["interrupted"]


async def test_a_low_soft_open_file_limit_is_raised_before_requests_fail_on_it(tmp_path: Path) -> None:
    """At the usual soft limit of 1,024 open files, `--rate inf --requests 2000` failed half its
    requests with "Too many open files" on loadgen's side, counted as the target's failures (vLLM's
    and SGLang's benchmark users hit it: sglang#647). Here a soft limit of 128 and 200 requests
    held 0.5 s each, all in flight at once."""
    import resource
    import sys

    from tests.integration.test_loadgen_streams import CHUNK, LAST, _stream, serving

    async def completions(request: web.Request) -> web.StreamResponse:
        await asyncio.sleep(0.5)
        return await _stream(request, [CHUNK, LAST])

    def low_limit() -> None:  # the hard limit lowered to 1,024 (any process may lower it): room for 200
        resource.setrlimit(resource.RLIMIT_NOFILE, (128, 1024))

    async with serving(completions) as url:
        argv = ["loadgen", "--target", url, "--requests", "200", "--rate", "inf", "--adapter-names", "-"]
        argv += ["--lengths", "fixed", "--prompt-len", "4", "--output-len", "2", "--out", str(tmp_path)]
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "dlora.services.cli", *argv, stderr=asyncio.subprocess.PIPE, preexec_fn=low_limit
        )
        _, err = await asyncio.wait_for(proc.communicate(), timeout=120)
    summary = json.loads((tmp_path / "result.json").read_text())["summary"]
    assert (summary["completed"], summary["failed"]) == (200, 0), err.decode()[-2000:]
    assert proc.returncode == 0
