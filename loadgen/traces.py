"""Readers for the public workload trace formats: request traces (arrivals and lengths) and
per-tenant popularity sources.

Request traces (``RequestTrace``):
- Azure LLM inference, 2023 and 2024 schemas: CSV ``TIMESTAMP,ContextTokens,GeneratedTokens``;
  timestamps ``2023-11-16 18:15:46.6805900`` (no zone) or ``2024-05-10 00:00:00.009930+00:00``.
- BurstGPT: CSV ``Timestamp,Model,Request tokens,Response tokens,Total tokens,Log Type`` (seconds;
  later releases add columns, which are ignored). Rows with zero response tokens are failed
  requests: skipped and counted.
- Mooncake / Kimi: JSONL ``{"timestamp": ms, "input_length", "output_length", "hash_ids"}``; each
  hash id names one 512-token prompt block (``MOONCAKE_BLOCK_TOKENS``), shared by every request
  that carries it.

Popularity sources (``TenantSeries``, requests per tenant per time window):
- ServeGen per-client rate series: CSV without a header, one file per client (``chunk-<i>-trace.csv``)
  or a folder of them; columns window start (s), mean rate (req/s), CV, fitted family, shape, scale.
- Azure Functions 2019 per-minute invocation counts: ``HashOwner,HashApp,HashFunction,Trigger,<minute>...``.

Every reader raises ``TraceError`` naming the file and the row (1-based; a header is row 1) and
what was expected there, never a bare parsing exception.
"""

from __future__ import annotations

import csv
import json
import math
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TextIO

FORMATS = ("auto", "azure", "burstgpt", "mooncake", "servegen", "azure-functions")
REQUEST_FORMATS = ("azure", "burstgpt", "mooncake")

# Mooncake's traces hash prompts in blocks of 512 tokens (kvcache-ai/Mooncake, FAST'25 traces README).
MOONCAKE_BLOCK_TOKENS = 512

AZURE_COLUMNS = ("TIMESTAMP", "ContextTokens", "GeneratedTokens")
BURSTGPT_COLUMNS = ("Timestamp", "Request tokens", "Response tokens")
FUNCTIONS_COLUMNS = ("HashOwner", "HashApp", "HashFunction", "Trigger")
SERVEGEN_COLUMNS = "window start (s), rate (req/s), cv, family, shape, scale; no header"
MOONCAKE_FIELDS = '{"timestamp": ms, "input_length": int, "output_length": int, "hash_ids": [int, ...]}'


class TraceError(ValueError):
    """The trace file cannot be read; the message names the file, the row and what was expected."""


@dataclass(frozen=True, slots=True)
class LLMRequestRow:
    t: float  # seconds since the trace's first request
    input_tokens: int
    output_tokens: int
    hash_ids: tuple[int, ...] = ()  # prompt blocks (Mooncake), shared token for token by every row naming them


@dataclass(frozen=True)
class RequestTrace:
    """Requests in arrival order (stable-sorted by time, t = 0 at the first)."""

    format: str
    rows: list[LLMRequestRow]
    skipped: int = 0  # rows dropped as failed requests (BurstGPT rows with no response tokens)
    block_tokens: int | None = None  # tokens per hash id, where rows carry hash_ids


@dataclass(frozen=True)
class TenantSeries:
    """Requests per tenant per window: ``counts`` is (tenants, windows), ``window_s`` seconds each.

    For ServeGen a count is the window's mean rate x its length (expected requests), for Azure
    Functions the invocations in that minute.
    """

    format: str
    tenants: list[str]
    counts: list[list[float]]
    window_s: float

    def totals(self) -> list[float]:
        return [sum(row) for row in self.counts]


def _open_text(path: Path) -> TextIO:
    try:
        return open(path, newline="", encoding="utf-8-sig")  # a BOM is not part of the header
    except IsADirectoryError:
        raise TraceError(f"{path}: is a folder, expected a file") from None
    except OSError as e:
        raise TraceError(f"{path}: cannot read ({e.strerror})") from None


def _csv_rows(path: Path) -> Iterator[tuple[int, list[str]]]:
    """Every non-empty row with its 1-based row number, read as the file streams (a week-long
    trace is tens of millions of rows)."""
    with _open_text(path) as f:
        try:
            for i, row in enumerate(csv.reader(f), start=1):
                if row:
                    yield i, row
        except csv.Error as e:
            raise TraceError(f"{path}: not CSV ({e})") from None
        except UnicodeDecodeError:
            raise TraceError(f"{path}: not text (UTF-8)") from None


def _with_header(
    path: Path, columns: tuple[str, ...], what: str
) -> tuple[dict[str, int], Iterator[tuple[int, list[str]]]]:
    rows = _csv_rows(path)
    first = next(rows, None)
    if first is None:
        raise TraceError(f"{path}: empty file")
    header = [c.strip() for c in first[1]]
    missing = [c for c in columns if c not in header]
    if missing:
        raise TraceError(f"{path}: row 1: expected a {what} header with columns {','.join(columns)}, got {header}")
    return {c: header.index(c) for c in columns}, rows


def _seconds(value: object) -> float:
    """A finite number of seconds from text or JSON (not a boolean)."""
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise ValueError(f"not a number: {value!r}")
    t = float(value)
    if not math.isfinite(t):
        raise ValueError(f"not finite: {value!r}")
    return t


def _epoch_seconds(text: str) -> float:
    when = datetime.fromisoformat(text.strip())
    if when.tzinfo is None:  # the 2023 schema has no zone; read it as UTC so mixed files still order
        when = when.replace(tzinfo=UTC)
    return _seconds(when.timestamp())


def _count(text: str) -> int:
    value = int(text.strip())
    if value < 0:
        raise ValueError("negative")
    return value


def _finish(
    path: Path,
    fmt: str,
    stamped: list[tuple[float, int, int, tuple[int, ...]]],
    skipped: int = 0,
    block_tokens: int | None = None,
) -> RequestTrace:
    if not stamped:
        raise TraceError(f"{path}: no data rows" + (f" ({skipped} failed requests skipped)" if skipped else ""))
    if any(b[0] < a[0] for a, b in zip(stamped, stamped[1:])):
        stamped.sort(key=lambda r: r[0])  # stable: rows of one instant keep the file's order
    t0 = stamped[0][0]
    rows = [LLMRequestRow(t - t0, i, o, h) for t, i, o, h in stamped]
    return RequestTrace(fmt, rows, skipped, block_tokens)


def read_azure_llm(path: str | Path) -> RequestTrace:
    """Azure LLM inference trace, 2023 or 2024 schema: ``TIMESTAMP,ContextTokens,GeneratedTokens``."""
    path = Path(path)
    col, rows = _with_header(path, AZURE_COLUMNS, "Azure LLM")
    out: list[tuple[float, int, int, tuple[int, ...]]] = []
    for n, row in rows:
        try:
            out.append(
                (
                    _epoch_seconds(row[col["TIMESTAMP"]]),
                    _count(row[col["ContextTokens"]]),
                    _count(row[col["GeneratedTokens"]]),
                    (),
                )
            )
        except (ValueError, IndexError):
            raise TraceError(
                f"{path}: row {n}: expected an ISO time and two token counts >= 0 "
                f"({','.join(AZURE_COLUMNS)}), got {row!r}"
            ) from None
    return _finish(path, "azure", out)


def read_burstgpt(path: str | Path) -> RequestTrace:
    """BurstGPT: ``Timestamp`` (s), ``Request tokens``, ``Response tokens`` (other columns ignored).
    Rows with zero response tokens are failed requests: skipped, counted in ``skipped``."""
    path = Path(path)
    col, rows = _with_header(path, BURSTGPT_COLUMNS, "BurstGPT")
    out: list[tuple[float, int, int, tuple[int, ...]]] = []
    skipped = 0
    for n, row in rows:
        try:
            t = _seconds(row[col["Timestamp"]])
            inp, outp = _count(row[col["Request tokens"]]), _count(row[col["Response tokens"]])
        except (ValueError, IndexError):
            raise TraceError(
                f"{path}: row {n}: expected seconds and two token counts >= 0 "
                f"({','.join(BURSTGPT_COLUMNS)}), got {row!r}"
            ) from None
        if outp == 0:
            skipped += 1
            continue
        out.append((t, inp, outp, ()))
    return _finish(path, "burstgpt", out, skipped)


def read_mooncake(path: str | Path) -> RequestTrace:
    """Mooncake / Kimi JSONL: ``timestamp`` (ms), ``input_length``, ``output_length``, ``hash_ids``
    (optional; one per ``MOONCAKE_BLOCK_TOKENS`` prompt tokens)."""
    path = Path(path)
    out: list[tuple[float, int, int, tuple[int, ...]]] = []
    for n, line in _lines(path):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
            if not isinstance(obj, dict):
                raise ValueError("not an object")
            if isinstance(obj["timestamp"], str):
                raise ValueError("a string")
            t = _seconds(obj["timestamp"]) / 1000.0
            inp, outp = _int_field(obj["input_length"]), _int_field(obj["output_length"])
            hash_ids = tuple(_int_field(h) for h in obj.get("hash_ids") or ())
        except (ValueError, KeyError, TypeError):
            raise TraceError(
                f"{path}: row {n}: expected a JSON object {MOONCAKE_FIELDS}, got {line.strip()[:120]!r}"
            ) from None
        out.append((t, inp, outp, hash_ids))
    return _finish(path, "mooncake", out, block_tokens=MOONCAKE_BLOCK_TOKENS)


def _lines(path: Path) -> Iterator[tuple[int, str]]:
    with _open_text(path) as f:
        try:
            yield from enumerate(f, start=1)
        except UnicodeDecodeError:
            raise TraceError(f"{path}: not text (UTF-8)") from None


def _int_field(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"not a count: {value!r}")
    return value


def read_azure_functions(path: str | Path) -> TenantSeries:
    """Azure Functions 2019 per-minute invocation counts: owner, app, function, trigger, minutes..."""
    path = Path(path)
    rows = _csv_rows(path)
    first = next(rows, None)
    if first is None:
        raise TraceError(f"{path}: empty file")
    header = first[1]
    if tuple(header[:4]) != FUNCTIONS_COLUMNS or len(header) < 5:
        raise TraceError(f"{path}: row 1: expected {','.join(FUNCTIONS_COLUMNS)},<minute>... got {header[:6]}")
    width = len(header)
    functions, counts = [], []
    for n, row in rows:
        if len(row) != width:
            raise TraceError(f"{path}: row {n}: {len(row)} columns, the header has {width}")
        try:
            values = [float(_count(v)) for v in row[4:]]
        except ValueError:
            bad = next(v for v in row[4:] if not v.strip().isdigit())
            raise TraceError(f"{path}: row {n}: invocation counts must be integers >= 0, got {bad!r}") from None
        functions.append(row[2])
        counts.append(values)
    return _series(path, "azure-functions", functions, counts, 60.0)


def _series(path: Path, fmt: str, tenants: list[str], counts: list[list[float]], window_s: float) -> TenantSeries:
    if not tenants:
        raise TraceError(f"{path}: no data rows")
    if not any(any(c) for c in counts):
        raise TraceError(f"{path}: every tenant is idle in every window: no popularity to take from it")
    return TenantSeries(fmt, tenants, counts, window_s)


def _servegen_file(path: Path) -> list[tuple[int, float, float]]:
    """One client's windows as (row, start s, rate req/s), starts rising."""
    out: list[tuple[int, float, float]] = []
    for n, row in _csv_rows(path):
        try:
            if len(row) != 6:
                raise ValueError
            start, rate = _seconds(row[0]), _seconds(row[1])
            if rate < 0 or start < 0 or (out and start <= out[-1][1]):
                raise ValueError
        except ValueError:
            raise TraceError(
                f"{path}: row {n}: expected ServeGen columns ({SERVEGEN_COLUMNS}) "
                f"with finite rates >= 0 and rising window starts, got {row!r}"
            ) from None
        out.append((n, start, rate))
    if not out:
        raise TraceError(f"{path}: no data rows")
    return out


def _chunk_order(p: Path) -> tuple[int, str]:
    m = re.search(r"(\d+)", p.stem)
    return (int(m.group(1)) if m else -1, p.name)


def read_servegen(path: str | Path) -> TenantSeries:
    """ServeGen per-client rate series: one client's file, or a folder of ``*-trace.csv`` files
    (one tenant each, named by file stem, in chunk-number order). Each rate lands in the window
    its start time names, so clients whose series start late or end early line up."""
    path = Path(path)
    files = sorted(path.glob("*-trace.csv"), key=_chunk_order) if path.is_dir() else [path]
    if not files:
        raise TraceError(f"{path}: no ServeGen client files (*-trace.csv) in this folder")
    series = {f: _servegen_file(f) for f in files}
    gaps = [b[1] - a[1] for rows in series.values() for a, b in zip(rows, rows[1:])]
    window = min(gaps) if gaps else 600.0  # ServeGen's windows are 10 minutes
    width = 1 + max(round(rows[-1][1] / window) for rows in series.values())
    counts = []
    for f, rows in series.items():
        c = [0.0] * width
        for n, start, rate in rows:
            if abs(start / window - round(start / window)) > 1e-6:
                raise TraceError(
                    f"{f}: row {n}: window start {start:g} s is not a multiple of the {window:g} s "
                    "windows of the series"
                )
            c[round(start / window)] = rate * window
        counts.append(c)
    return _series(path, "servegen", [f.stem.removesuffix("-trace") for f in files], counts, window)


def sniff(path: str | Path) -> str:
    """The format of a trace file or folder, from its first row (see the module docstring)."""
    path = Path(path)
    if path.is_dir():
        if any(path.glob("*-trace.csv")):
            return "servegen"
        raise TraceError(f"{path}: a folder, but no ServeGen client files (*-trace.csv) in it")
    with _open_text(path) as f:
        try:
            first = next((line for line in f if line.strip()), "")
        except UnicodeDecodeError:
            raise TraceError(f"{path}: not text (UTF-8)") from None
    if not first:
        raise TraceError(f"{path}: empty file")
    if first.lstrip().startswith("{"):
        return "mooncake"
    header = [c.strip() for c in next(csv.reader([first]), [])]
    if all(c in header for c in AZURE_COLUMNS):
        return "azure"
    if all(c in header for c in BURSTGPT_COLUMNS):
        return "burstgpt"
    if tuple(header[:4]) == FUNCTIONS_COLUMNS:
        return "azure-functions"
    if len(header) == 6 and re.fullmatch(r"[0-9.]+", header[0] or "x"):
        return "servegen"
    raise TraceError(
        f"{path}: row 1: not a trace format dlora knows; expected an Azure LLM header ({','.join(AZURE_COLUMNS)}), "
        f"a BurstGPT header ({','.join(BURSTGPT_COLUMNS)},...), Mooncake JSONL ({MOONCAKE_FIELDS}), "
        f"ServeGen rows ({SERVEGEN_COLUMNS}) or an Azure Functions header ({','.join(FUNCTIONS_COLUMNS)},<minute>...); "
        f"got {first.strip()[:120]!r}"
    )


_READERS: dict[str, Callable[[str | Path], RequestTrace | TenantSeries]] = {
    "azure": read_azure_llm,
    "burstgpt": read_burstgpt,
    "mooncake": read_mooncake,
    "servegen": read_servegen,
    "azure-functions": read_azure_functions,
}


def read_trace(path: str | Path, fmt: str = "auto") -> RequestTrace | TenantSeries:
    """Read a trace of the given format (``FORMATS``; ``auto`` sniffs it).

    Raises:
        TraceError: unknown format, unreadable or malformed file (file, row and expected columns named).
    """
    if fmt not in FORMATS:
        raise TraceError(f"unknown trace format {fmt!r}; expected one of {', '.join(FORMATS)}")
    return _READERS[sniff(path) if fmt == "auto" else fmt](path)
