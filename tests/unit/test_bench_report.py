"""The e2e benchmark rewrites only its own section of BENCHMARKS.md, and draws its plot."""

from pathlib import Path

from dlora.loadgen.bench_e2e import write_outputs

BEGIN, END = "<!-- bench-e2e:begin -->", "<!-- bench-e2e:end -->"

RESULT = {
    "machine": "test box",
    "date": "2026-01-01",
    "preset": "tiny",
    "adapters": 4,
    "stride": 8,
    "top_adapter_share": 0.5,
    "length_scaling": {"divide": 8.0, "max_prompt": 64, "max_output": 32},
    "latency_bound_s_per_token": 0.5,
    "hf_batching": {"batch_1_tok_s": 10.0, "batch_32_tok_s": 40.0, "gain": 4.0},
    "rows": [
        {
            "rate": r,
            "system": s,
            "requests": 8,
            "finished": 8,
            "throughput_tok_s": 10.0 * r,
            "norm_latency_mean_s": 0.1 * r,
            "norm_latency_p90_s": 0.2 * r,
        }
        for r in (1.0, 2.0)
        for s in ("hf-peft", "dlora")
    ],
    "sustained_rate_req_s": {"hf-peft": 1.0, "dlora": 2.0},
    "dlora_over_hf": 2.0,
}


def test_section_is_added_then_replaced_in_place(tmp_path: Path) -> None:
    bench = tmp_path / "BENCHMARKS.md"
    bench.write_text("# Benchmarks\n\nearlier text\n")
    write_outputs(RESULT, str(tmp_path / "r.json"), bench, tmp_path / "docs")
    first = bench.read_text()
    assert "earlier text" in first and first.count(BEGIN) == 1 and "**2.0x**" in first and "**4.0×**" in first
    bench.write_text(first + "\nlater text\n")
    write_outputs({**RESULT, "dlora_over_hf": 3.0}, None, bench, tmp_path / "docs")
    second = bench.read_text()
    assert second.count(BEGIN) == 1 and second.count(END) == 1
    assert "**3.0x**" in second and "**2.0x**" not in second and "later text" in second
    assert (tmp_path / "docs" / "bench-e2e.png").read_bytes()[:4] == b"\x89PNG"
    assert (tmp_path / "r.json").exists()


def test_a_benchmark_model_with_more_adapters_is_reused(tmp_path: Path) -> None:
    """A GPU check asks for 64 adapters in one part and 8 in the next: the second reuses the first's
    model (at 7B widths a model costs seconds and gigabytes), whose first adapters are the same."""
    from dlora.loadgen.bench_common import ensure_model

    made = ensure_model(tmp_path, "tiny", 2, [8])
    assert ensure_model(tmp_path, "tiny", 1, [8]) == made
    assert sorted(p.name for p in tmp_path.iterdir()) == [made.name]


def test_without_hf_peft_among_the_systems_no_hf_figure_is_published(tmp_path: Path) -> None:
    """--systems dlora loaded HF PEFT all the same and published an 'HF batching gain' (a helper)."""
    alone = {
        **RESULT,
        "hf_batching": None,
        "dlora_over_hf": None,
        "rows": [r for r in RESULT["rows"] if r["system"] == "dlora"],
        "sustained_rate_req_s": {"dlora": 2.0},
    }
    bench = tmp_path / "BENCHMARKS.md"
    write_outputs(alone, None, bench, tmp_path / "docs")
    text = bench.read_text()
    assert "| dlora | 2 |" in text and "HF PEFT sustained rate" not in text and "batching gain" not in text
