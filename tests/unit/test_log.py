"""Log lines as services write them: one JSON object per line, written at once, naming its logger."""

from __future__ import annotations

import json
import logging
import subprocess
import sys

import pytest

from dlora.common import log


class _Writes:
    """A stderr that keeps each write() apart."""

    def __init__(self) -> None:
        self.writes: list[str] = []

    def write(self, text: str) -> int:
        self.writes.append(text)
        return len(text)

    def flush(self) -> None:
        pass


def test_each_record_is_one_write_of_one_json_line_naming_its_logger(monkeypatch: pytest.MonkeyPatch) -> None:
    """`dlora up`'s services share one stderr: PrintLogger wrote a record and its newline in two
    writes, and another process's record landed between them ({...}{...}); and the name log.get
    was given was dropped, so no line said which service wrote it."""
    stderr = _Writes()
    monkeypatch.setattr(sys, "stderr", stderr)
    log.configure(json=True)
    log.get("dispatcher").warning("worker handed back requests", worker="worker-1")
    log.get("gateway").info("ready")
    assert len(stderr.writes) == 2 and all(w.endswith("\n") and w.count("\n") == 1 for w in stderr.writes)
    records = [json.loads(w) for w in stderr.writes]
    assert [(r["logger"], r["event"], r["level"]) for r in records] == [
        ("dispatcher", "worker handed back requests", "warning"),
        ("gateway", "ready", "info"),
    ]
    assert records[0]["worker"] == "worker-1" and all("timestamp" in r for r in records)


class _Broken:
    """A stderr whose reader has gone (``dlora up 2>&1 | head`` after head exits)."""

    def write(self, text: str) -> int:
        raise BrokenPipeError(32, "Broken pipe")

    def flush(self) -> None:
        raise BrokenPipeError(32, "Broken pipe")


def test_a_line_that_cannot_be_written_is_dropped_not_raised(monkeypatch: pytest.MonkeyPatch) -> None:
    """A helper's trial: with the gateway's stderr pipe closed, every log call raised BrokenPipeError,
    and every request failed with a 500 from its access-log line after its handler had succeeded."""
    monkeypatch.setattr(sys, "stderr", _Broken())
    try:
        log.configure(json=True)
        log.get("gateway").info("http request", status=200)
        logging.getLogger("aiohttp.access").warning("a library's record")
    finally:
        monkeypatch.undo()
        log.configure(json=True)


def test_the_level_setting_leaves_out_what_is_less_severe(monkeypatch: pytest.MonkeyPatch) -> None:
    stderr = _Writes()
    monkeypatch.setattr(sys, "stderr", stderr)
    try:
        for level in ("WARNING", "debug"):  # (in any case: vLLM's VLLM_LOGGING_LEVEL=INFO)
            log.configure(json=True, level=level)
            logger = log.get(f"level-{level}")  # a logger first used under this level (they are cached)
            logger.debug("detail")
            logger.info("news")
            logger.warning("trouble")
        assert [json.loads(w)["event"] for w in stderr.writes] == ["trouble", "detail", "news", "trouble"]
    finally:
        log.configure(json=True)


def test_readable_lines_name_their_logger_too(capsys: pytest.CaptureFixture[str]) -> None:
    log.configure(json=False)
    log.get("migrator").warning("no plan")
    (line,) = capsys.readouterr().err.splitlines()
    assert "no plan" in line and "[migrator]" in line and not line.startswith("{")


def test_the_standard_librarys_records_and_warnings_are_json_lines_too() -> None:
    """deploy/README promises `journalctl -u dlora-gateway -o cat | jq`: aiohttp's, asyncio's and
    nats's records reached Python's last-resort handler as bare text, and jq stopped at the first;
    a library's warning was bare text too."""
    code = """if True:
        import logging, warnings
        from dlora.common import log
        log.configure(json=True)
        logging.getLogger("aiohttp.server").error("Error handling request", exc_info=ValueError("bad"))
        logging.getLogger("nats.aio.client").info("INFO chatter stays out, as it did")
        warnings.warn("a library's deprecation", FutureWarning, stacklevel=1)
    """
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    records = [json.loads(line) for line in done.stderr.splitlines()]
    assert [(r["logger"], r["level"]) for r in records] == [("aiohttp.server", "error"), ("py.warnings", "warning")]
    assert records[0]["event"] == "Error handling request" and records[0]["exception"] == "ValueError: bad"
    assert "FutureWarning: a library's deprecation" in records[1]["event"]
    assert all("timestamp" in r for r in records)


def test_the_standard_librarys_readable_lines_and_a_second_configure(capsys: pytest.CaptureFixture[str]) -> None:
    log.configure(json=True)
    log.configure(json=False)  # replaces its handler: one line per record, not two
    logging.getLogger("asyncio").warning("Executing <Task> took 0.2 seconds")
    (line,) = capsys.readouterr().err.splitlines()
    assert "Executing <Task> took 0.2 seconds" in line and "[asyncio]" in line and not line.startswith("{")
