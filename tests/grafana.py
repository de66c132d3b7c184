"""Read the PromQL out of a Grafana dashboard, the metric names out of PromQL, and the documented
metrics out of docs/metrics.md, so tests can hold the dashboard and the exporters to the doc. A
scanner, not a parser: enough for the expressions a dashboard holds, with no PromQL library to
install."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

# Words that look like metric names but are operators or modifiers. Functions and aggregations
# need no list: they are the identifiers followed by "(" once grouping clauses are gone.
KEYWORDS = frozenset(
    {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "offset", "and", "or", "unless", "atan2"}
    | {"inf", "nan"}  # numbers
)
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_NAME_MATCHER = re.compile(r'__name__\s*=\s*"((?:[^"\\]|\\.)*)"')
_VARIABLE = re.compile(r"\$\{[^}]*\}|\$\w+")
_COMMENT = re.compile(r"#[^\n]*")
_RANGE = re.compile(r"\[[^\]]*\]")
_MATCHERS = re.compile(r"\{[^{}]*\}")
_CLAUSE = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^()]*\)", re.IGNORECASE)
# A number or duration (0.9, 1e3, 5m, 1h30m, 0x1f) is one token, so its letters are never read as a name.
_TOKEN = re.compile(r"(?P<number>\.?\d[\w.]*)|(?P<name>[a-zA-Z_:][a-zA-Z0-9_:]*)")
_LABEL_VALUES = re.compile(r"^\s*label_values\s*\((?P<args>.*)\)\s*$", re.DOTALL)
_QUERY_RESULT = re.compile(r"^\s*query_result\s*\((?P<expr>.*)\)\s*$", re.DOTALL)
_HISTOGRAM_SERIES = re.compile(r"_(?:bucket|sum|count)$")


def metric_names(expr: str) -> set[str]:
    """The metric names ``expr`` selects, as written (``x_bucket`` stays ``x_bucket``)."""
    names = set(_NAME_MATCHER.findall(expr))
    text = _STRING.sub(" ", expr)
    # `${var}` holds braces, so variables go before label matchers; ranges hold `$__rate_interval`.
    for pattern in (_COMMENT, _VARIABLE, _RANGE, _MATCHERS, _CLAUSE):
        text = pattern.sub(" ", text)
    for m in _TOKEN.finditer(text):
        name = m.group("name")
        if name is None or name.lower() in KEYWORDS:
            continue
        if text[m.end() :].lstrip().startswith("("):
            continue  # a function or an aggregation
        names.add(name)
    return names


def family(name: str) -> str:
    """The metric family of a series name: ``x`` for ``x_bucket``, ``x_sum`` and ``x_count``."""
    return _HISTOGRAM_SERIES.sub("", name)


def panels(dashboard: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Every panel, rows included, and the panels a collapsed row keeps inside it."""
    for panel in dashboard.get("panels", []):
        yield panel
        yield from panels(panel)


def _variable_query(variable: dict[str, Any]) -> str | None:
    """The PromQL behind a query variable; None for other kinds and for ``label_values(label)``."""
    if variable.get("type") != "query":
        return None
    query = variable.get("query")
    if isinstance(query, dict):  # the shape Grafana 10+ saves
        query = query.get("query")
    if not isinstance(query, str):
        return None
    if m := _LABEL_VALUES.match(query):
        # label_values(selector, label): the selector may hold commas, the label never does.
        selector, comma, _label = m.group("args").rpartition(",")
        return selector.strip() if comma else None
    if m := _QUERY_RESULT.match(query):
        return m.group("expr").strip()
    return query


def dashboard_queries(path: Path) -> list[str]:
    """Every PromQL expression in the dashboard at ``path``: panel targets' ``expr`` and template
    variables' queries, in the order they appear."""
    dashboard = json.loads(path.read_text())
    queries = [t["expr"] for p in panels(dashboard) for t in p.get("targets", []) if t.get("expr")]
    for variable in dashboard.get("templating", {}).get("list", []):
        if query := _variable_query(variable):
            queries.append(query)
    return queries


METRICS_DOC = Path(__file__).resolve().parents[1] / "docs" / "metrics.md"
TYPES = frozenset({"counter", "gauge", "histogram"})


def documented_by_section(doc: Path = METRICS_DOC) -> dict[str, dict[str, str]]:
    """Section title (``Worker``, ``Dispatcher``, ...) -> metric name -> type, from the tables of
    docs/metrics.md (a cell may name several: `a` / `b`)."""
    found: dict[str, dict[str, str]] = {}
    section = ""
    for line in doc.read_text().splitlines():
        if line.startswith("## "):
            section = line[3:].split("(")[0].strip()
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.lstrip().startswith("|") and len(cells) >= 2 and cells[1] in TYPES:
            for name in re.findall(r"`([^`]+)`", cells[0]):
                found.setdefault(section, {})[name] = cells[1]
    return found
