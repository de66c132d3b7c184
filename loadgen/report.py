"""A run's report: a summary table on the terminal, result.json, and report.png / report.html
(latency over time, CDFs, per-adapter bars)."""

from __future__ import annotations

import base64
import html
import json
from collections import Counter
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt
import numpy as np
from rich.console import Console
from rich.table import Table

from dlora.loadgen import vllm_record
from dlora.loadgen.metrics import RequestResult, slowest


def _fmt(v: float | None, scale: float = 1.0, digits: int = 3) -> str:
    return "-" if v is None else f"{v * scale:.{digits}f}"


BASE = "(base)"  # result.json's key of the requests that named no adapter (metrics.summarize_by_adapter)


def named(by_adapter: dict[str, dict], base_model: str | None) -> dict[str, dict]:
    """``by_adapter`` with the base row labelled by the model its requests named (``--model lora-0``
    sends each to lora-0: the table called them "(base)"). result.json keeps "(base)", its readers'
    key whatever the model's name; so does a row whose name another row, or "all", has already."""
    if BASE not in by_adapter or not base_model or base_model in by_adapter or base_model == "all":
        return by_adapter
    return {base_model if n == BASE else n: s for n, s in by_adapter.items()}


def table(summary: dict, by_adapter: dict[str, dict]) -> Table:
    t = Table(title="dlora loadgen")
    for col in (
        "",
        "sent",
        "done",
        "failed",
        "cut",
        "lost",
        "req/s",
        "tok/s",
        "TTFT p50/p99 ms",
        "TPOT p50 ms",
        "norm. lat. mean/p90 s",
        "SLO",
    ):
        t.add_column(col, justify="right")
    for name, s in [("all", summary), *by_adapter.items()]:
        att = s["slo"]["attainment"]
        t.add_row(
            name,
            str(s["sent"]),
            str(s["completed"]),
            str(s["failed"]),
            str(s["cut"]),
            str(s["lost"]),
            _fmt(s["throughput_req_s"], digits=2),
            _fmt(s["throughput_tok_s"], digits=1),
            f"{_fmt(s['ttft_s']['p50'], 1e3, 1)}/{_fmt(s['ttft_s']['p99'], 1e3, 1)}",
            _fmt(s["tpot_s"]["p50"], 1e3, 1),
            f"{_fmt(s['normalized_latency_s']['mean'])}/{_fmt(s['normalized_latency_s']['p90'])}",
            "-" if att is None else f"{att:.0%}",
        )
    return t


def plot(results: list[RequestResult], by_adapter: dict[str, dict], end_s: float, path: Path) -> None:
    done = [r for r in results if r.completed]
    fig, ax = plt.subplots(2, 2, figsize=(11, 7), dpi=80)
    ax[0, 0].scatter([r.arrival_s for r in done], [r.finish_s - r.arrival_s for r in done], s=6)
    ax[0, 0].set(title="end-to-end latency by arrival", xlabel="arrival (s)", ylabel="latency (s)")
    for label, values in (
        ("TTFT", [r.first_token_s - r.arrival_s for r in done if r.first_token_s is not None]),
        ("normalized latency", [r.normalized_latency(end_s) for r in results if r.sent]),
    ):
        if values:
            v = np.sort(values)
            ax[0, 1].plot(v, np.arange(1, len(v) + 1) / len(v), label=label)
    ax[0, 1].set(title="CDF", xlabel="seconds (TTFT) / seconds per token", xscale="log")
    if ax[0, 1].get_legend_handles_labels()[0]:  # a run stopped before its first request was sent has none
        ax[0, 1].legend()
    names = list(by_adapter)
    ax[1, 0].bar(names, [by_adapter[n]["throughput_tok_s"] for n in names])
    ax[1, 0].set(title="throughput per adapter", ylabel="tokens/s")
    ax[1, 1].bar(names, [by_adapter[n]["normalized_latency_s"]["mean"] or 0 for n in names])
    ax[1, 1].set(title="mean normalized latency per adapter", ylabel="s / token")
    for a in ax[1]:
        a.tick_params(axis="x", rotation=45, labelsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


FILES = ("result.json", "vllm-result.json", "report.png", "report.html")  # what ``write`` writes in its folder
VLLM_RECORD = FILES[1]  # the vLLM-shaped record's name unless config's result_filename names another


def append_line(path: Path, record: dict) -> None:
    """``record`` as one line of JSON at the end of ``path`` (JSON Lines; made if missing). A
    record written there indented (a run without --append-result, into the same --out) becomes
    one line first, and a last line without its line break (vLLM's) gets one: appended as they
    were, the file was neither JSON nor JSON Lines."""
    text = path.read_text(encoding="utf-8") if path.exists() else ""
    if "\n" in text.strip():  # one record indented, or JSON Lines already
        try:
            text = json.dumps(json.loads(text)) + "\n"
            path.write_text(text, encoding="utf-8")
        except json.JSONDecodeError:
            pass  # JSON Lines: appended to as they are
    with open(path, "a", encoding="utf-8") as f:
        f.write(("\n" if text and not text.endswith("\n") else "") + json.dumps(record) + "\n")


def write(
    out: Path,
    config: dict,
    summary: dict,
    by_adapter: dict[str, dict],
    results: list[RequestResult],
    end_s: float,
    console: Console | None = None,
) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "result.json").write_text(
        json.dumps(
            {"config": config, "summary": summary, "by_adapter": by_adapter, "slowest": slowest(results)}, indent=2
        )
        + "\n"
    )
    vllm_name = config.get("result_filename") or VLLM_RECORD  # vLLM's --result-filename
    record = vllm_record.record(config, summary, results)
    if config.get("append_result"):  # vLLM's --append-result: each run's record one line after the last's
        append_line(out / vllm_name, record)
    else:
        (out / vllm_name).write_text(json.dumps(record, indent=2) + "\n")
    # (what is shown; result.json written above)
    by_adapter = named(by_adapter, config.get("served_model_name") or config.get("base_model"))
    plot(results, by_adapter, end_s, out / "report.png")
    png = base64.b64encode((out / "report.png").read_bytes()).decode()
    rows = "".join(
        f"<tr><td>{html.escape(n)}</td><td>{s['sent']}</td><td>{s['completed']}</td><td>{s['failed']}</td>"
        f"<td>{s['cut']}</td><td>{s['lost']}</td><td>{_fmt(s['throughput_tok_s'], digits=1)}</td>"
        f"<td>{_fmt(s['normalized_latency_s']['mean'])}</td></tr>"
        for n, s in [("all", summary), *by_adapter.items()]
    )
    (out / "report.html").write_text(
        "<!doctype html><meta charset=utf-8><title>dlora loadgen</title>"
        f"<h1>dlora loadgen</h1><pre>{html.escape(json.dumps(config, indent=1))}</pre>"
        "<table border=1><tr><th>adapter</th><th>sent</th><th>done</th><th>failed</th><th>cut</th><th>lost</th>"
        f"<th>tok/s</th><th>norm. latency mean (s/token)</th></tr>{rows}</table>"
        f'<img alt="report" src="data:image/png;base64,{png}">\n'
    )
    console = console or Console()
    console.print(table(summary, by_adapter))
    # Why requests failed, most common first: the table counts them, result.json keeps ten reasons.
    reasons = Counter(r.error for r in results if r.sent and r.error is not None)
    for reason, count in reasons.most_common(5):
        console.print(f"failed ({count}): {reason}", markup=False, highlight=False)
    if len(reasons) > 5:
        console.print(f"... and {len(reasons) - 5} other reasons (result.json)")
