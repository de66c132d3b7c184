"""Readers for the workload traces in ``../shared/traces`` and files of the same formats.

A malformed or truncated file raises ``TraceError`` naming the file and the row (1-based, the
header being row 1), never a bare parsing exception.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path


class TraceError(ValueError):
    """The trace file cannot be read; the message names the file and row."""


@dataclass(frozen=True)
class LLMRequestRow:
    t: float  # seconds since the trace's first request
    input_tokens: int
    output_tokens: int


@dataclass(frozen=True)
class FunctionTrace:
    functions: list[str]  # HashFunction per row
    counts: list[list[int]]  # invocations per function per minute column

    def totals(self) -> list[int]:
        return [sum(row) for row in self.counts]


def _rows(path: Path) -> tuple[list[str], list[tuple[int, list[str]]]]:
    try:
        with open(path, newline="") as f:
            reader = csv.reader(f)
            header = next(reader, None)
            if header is None:
                raise TraceError(f"{path}: empty file")
            return header, [(i, row) for i, row in enumerate(reader, start=2) if row]
    except OSError as e:
        raise TraceError(f"{path}: cannot read ({e.strerror})") from None
    except csv.Error as e:
        raise TraceError(f"{path}: not CSV ({e})") from None


def read_azure_llm(path: str | Path) -> list[LLMRequestRow]:
    """Azure LLM inference trace: ``TIMESTAMP,ContextTokens,GeneratedTokens``."""
    path = Path(path)
    header, rows = _rows(path)
    try:
        ts, ctx, gen = (header.index(c) for c in ("TIMESTAMP", "ContextTokens", "GeneratedTokens"))
    except ValueError:
        raise TraceError(f"{path}: row 1: expected columns TIMESTAMP,ContextTokens,GeneratedTokens, got {header}") from None
    out: list[LLMRequestRow] = []
    first: datetime | None = None
    for n, row in rows:
        try:
            when = datetime.fromisoformat(row[ts])
            inp, outp = int(row[ctx]), int(row[gen])
        except (ValueError, IndexError):
            raise TraceError(f"{path}: row {n}: cannot parse {row!r}") from None
        if inp < 0 or outp < 0:
            raise TraceError(f"{path}: row {n}: negative token count")
        first = first or when
        out.append(LLMRequestRow((when - first).total_seconds(), inp, outp))
    if not out:
        raise TraceError(f"{path}: no data rows")
    return out


def read_azure_functions(path: str | Path) -> FunctionTrace:
    """Azure Functions 2019 per-minute invocation counts: owner, app, function, trigger, minutes..."""
    path = Path(path)
    header, rows = _rows(path)
    if header[:4] != ["HashOwner", "HashApp", "HashFunction", "Trigger"] or len(header) < 5:
        raise TraceError(f"{path}: row 1: expected HashOwner,HashApp,HashFunction,Trigger,<minutes...>")
    width = len(header)
    functions, counts = [], []
    for n, row in rows:
        if len(row) != width:
            raise TraceError(f"{path}: row {n}: {len(row)} columns, the header has {width}")
        try:
            values = [int(v) for v in row[4:]]
        except ValueError:
            raise TraceError(f"{path}: row {n}: invocation counts must be integers") from None
        functions.append(row[2])
        counts.append(values)
    if not functions:
        raise TraceError(f"{path}: no data rows")
    return FunctionTrace(functions, counts)
