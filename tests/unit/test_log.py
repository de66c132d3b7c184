"""Log lines as services write them: one JSON object per line, written at once, naming its logger."""

from __future__ import annotations

import json
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


def test_readable_lines_name_their_logger_too(capsys: pytest.CaptureFixture[str]) -> None:
    log.configure(json=False)
    log.get("migrator").warning("no plan")
    (line,) = capsys.readouterr().err.splitlines()
    assert "no plan" in line and "[migrator]" in line and not line.startswith("{")
