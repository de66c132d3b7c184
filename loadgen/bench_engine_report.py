"""``dlora bench engine``'s report: its BENCHMARKS.md section and its plot, from the result JSON."""

from __future__ import annotations

from typing import TYPE_CHECKING

from dlora.loadgen.bench_common import figure
from dlora.loadgen.step_phases import PHASES

if TYPE_CHECKING:
    from matplotlib.figure import Figure

FULL_DEPTH = 32  # Llama-2-7B's layers: the 7b preset runs a few of them


def projected_ratio(wall_ms: float, kernel_ms: float, layers: int, to: int = FULL_DEPTH) -> float:
    """Wall over kernel time of a graphed decode step at ``to`` layers, from one measured at
    ``layers``: each layer adds its kernels' time and nothing on the host (the step's scheduling,
    its one graph replay and its sampling do not grow with depth), so wall grows by the kernels of
    the layers added."""
    scale = to / layers
    return (wall_ms + (scale - 1) * kernel_ms) / (scale * kernel_ms)


def _cell(p: dict | None) -> str:
    return f"{p['tokens_per_s']:.1f} ({p['step_ms']:.1f} ms)" if p else "-"


def markdown(r: dict) -> str:
    by = {(p["mode"], p["adapters"], p["batch"]): p for p in r["points"]}
    batches = sorted({p["batch"] for p in r["points"]})
    counts = sorted({p["adapters"] for p in r["points"] if p["mode"] == "unmerged"})
    cols = [("base", 0), ("merged", 1)] + [("unmerged", n) for n in counts]
    head = ["batch", "base", "merged"] + [f"unmerged, {n} adapter{'s' if n > 1 else ''}" for n in counts]
    # A mixed step's adapters grow with its batch (three quarters merged, the rest over up to 7 others).
    mixed = {p["batch"]: p for p in r["points"] if p["mode"] == "mixed"}
    if mixed:
        head.append("mixed (¾ merged)")
    lines = [
        f"Measured {r.get('date', '?')} on **{r['machine']}**, preset `{r['preset']}`, {r['dtype']}"
        + (", decode steps replayed as CUDA graphs" if r.get("cuda_graphs") else "")
        + (", asynchronous scheduling" if r.get("async_scheduling") else "")
        + ": prompts of "
        f"{r['prompt_len']} tokens prefilled untimed, then the median of {r['timed_decode_steps']} decode steps, "
        f"{r['rounds']} interleaved rounds, median reported. Output tokens/s (median step time); a batch holds at "
        "most `batch` distinct adapters.",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    for b in batches:
        cells = [_cell(by.get((m, n, b))) for m, n in cols] + ([_cell(mixed.get(b))] if mixed else [])
        lines.append(f"| {b} | " + " | ".join(cells) + " |")
    lines += [
        "",
        f"Switch cost: **merge {r['merge_ms']:.1f} ms, unmerge {r['unmerge_ms']:.1f} ms**"
        + (f"; one copy of the rows a merge rewrites {r['copy_once_ms']:.1f} ms." if "copy_once_ms" in r else "."),
        "",
        "| ratio (measured in the same run) | value |",
        "|---|---|",
    ]
    lines += [f"| {k} | {v:.3f} |" for k, v in r["ratios"].items()]
    if tax := r.get("lora_tax"):
        lines += [
            "",
            f"LoRA tax, steps interleaved: a base batch and a one-adapter batch of {tax['batch']} held at once, "
            f"{tax['pairs']} pairs of steps alternating: base {tax['base_ms']:.1f} ms, unmerged "
            f"{tax['unmerged_ms']:.1f} ms (medians), median pairwise base/unmerged **{tax['ratio_of_pairs']:.3f}**.",
        ]
    if r.get("profile"):
        gpu = any(p["kernel_ms_per_step"] is not None for p in r["profile"].values())
        layers = r.get("num_layers")
        deep = gpu and r.get("cuda_graphs") and layers is not None and layers < FULL_DEPTH
        lines += [
            "",
            "Per decode step, profiled (torch.profiler): "
            + ("GPU kernels launched and their summed time." if gpu else "operators dispatched (no GPU here).")
            + " The phases are the host's (`timed_phases`); on a GPU, sample holds the wait for the kernels."
            + (
                f" At {FULL_DEPTH} layers (projected from these {layers}: each layer adds its kernels' time, "
                "not the host's, `projected_ratio`)."
                if deep
                else ""
            ),
            "",
            f"| step | batch | wall ms | kernel ms | wall / kernel{f' ({FULL_DEPTH} layers)' if deep else ''} "
            "| launches | host launch calls | ms in prepare · forward · sample · postprocess · observe |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for label, p in r["profile"].items():
            k = p["kernel_ms_per_step"]
            ratio = f"{p['wall_ms_per_step'] / k:.2f}" if k else "-"
            if k and deep:
                ratio += f" ({projected_ratio(p['wall_ms_per_step'], k, layers):.2f})"
            kernel = f"{k:.2f}" if k is not None else "-"
            calls = p.get("host_launch_calls_per_step")
            phases = p.get("host_phases_ms")
            spent = " · ".join(f"{phases[k]:.2f}" for k in PHASES.values()) if phases else "-"
            lines.append(
                f"| {label} | {p['batch']} | {p['wall_ms_per_step']:.2f} | {kernel} | {ratio} | "
                f"{p['launches_per_step']:.0f} | {'-' if calls is None else f'{calls:.0f}'} | {spent} |"
            )
    if r.get("hf_peft_step_ms"):
        lines += [
            "",
            "transformers + peft on the same model and adapter, per decode step: "
            + ", ".join(f"{k}: {v:.1f} ms" for k, v in r["hf_peft_step_ms"].items())
            + ".",
        ]
    return "\n".join(lines)


def plot(r: dict) -> Figure:
    """Decode throughput by batch size per mode, and each mode's throughput relative to base."""
    fig, ax = figure(2)
    by = {(p["mode"], p["adapters"], p["batch"]): p for p in r["points"]}
    counts = sorted({p["adapters"] for p in r["points"] if p["mode"] == "unmerged"})
    for mode, n in [("base", 0), ("merged", 1)] + [("unmerged", n) for n in counts]:
        ps = sorted((p for p in r["points"] if (p["mode"], p["adapters"]) == (mode, n)), key=lambda p: p["batch"])
        label = mode if mode != "unmerged" else f"unmerged, {n} adapter{'s' if n > 1 else ''}"
        ax[0].plot([p["batch"] for p in ps], [p["tokens_per_s"] for p in ps], marker="o", label=label)
        rel = [(p["batch"], p["tokens_per_s"] / by["base", 0, p["batch"]]["tokens_per_s"]) for p in ps]
        ax[1].plot(*zip(*rel), marker="o", label=label)
    ax[0].set(xlabel="batch size (requests)", ylabel="decode throughput (tok/s)", xscale="log", yscale="log")
    ax[0].set_title("Decode throughput")
    ax[1].set(xlabel="batch size (requests)", ylabel="throughput / base", xscale="log")
    ax[1].set_title("Relative to base")
    ax[1].axhline(1.0, color="grey", linestyle=":")
    for a in ax:
        a.set_xticks(sorted({p["batch"] for p in r["points"]}))
        a.xaxis.set_major_formatter("{x:g}")
        a.xaxis.set_minor_formatter("")
    ax[0].legend(fontsize=7)
    return fig
