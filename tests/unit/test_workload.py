"""The workload library: trace readers, popularity, arrivals, and building a workload."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from dlora.loadgen import arrivals, popularity, workload
from dlora.loadgen.traces import TraceError, read_azure_functions, read_azure_llm

LLM = "TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:15:46.6805900,374,44\n2023-11-16 18:15:48.1805900,10,2\n"
FUNCS = "HashOwner,HashApp,HashFunction,Trigger,1,2,3\no,a,f1,http,1,2,3\no,a,f2,timer,10,0,0\no,b,f3,queue,0,0,1\n"


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "trace.csv"
    p.write_text(text)
    return p


def test_reads_azure_llm(tmp_path: Path) -> None:
    rows = read_azure_llm(write(tmp_path, LLM))
    assert [(r.t, r.input_tokens, r.output_tokens) for r in rows] == [(0.0, 374, 44), (1.5, 10, 2)]


def test_reads_azure_functions(tmp_path: Path) -> None:
    trace = read_azure_functions(write(tmp_path, FUNCS))
    assert trace.functions == ["f1", "f2", "f3"] and trace.totals() == [6, 10, 1]


@pytest.mark.parametrize(
    "reader,text,fragment",
    [
        (read_azure_llm, "a,b\n1,2\n", "row 1"),
        (read_azure_llm, LLM + "2023-11-16 18:15:50,12\n", "row 4"),
        (read_azure_llm, LLM + "not a time,1,2\n", "row 4"),
        (read_azure_llm, "TIMESTAMP,ContextTokens,GeneratedTokens\n", "no data rows"),
        (read_azure_llm, "", "empty"),
        (read_azure_functions, FUNCS + "o,b,f4,http,1,2\n", "row 5"),
        (read_azure_functions, FUNCS.replace("0,0,1", "0,x,1"), "row 4"),
        (read_azure_functions, "a,b,c\n", "row 1"),
    ],
)
def test_malformed_traces_name_file_and_row(tmp_path: Path, reader, text: str, fragment: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(TraceError, match=fragment) as err:
        reader(path)
    assert str(path) in str(err.value)


def test_missing_trace_is_a_trace_error(tmp_path: Path) -> None:
    with pytest.raises(TraceError, match="cannot read"):
        read_azure_llm(tmp_path / "nope.csv")


def test_the_shared_traces_load() -> None:
    root = Path(__file__).resolve().parents[3] / "shared" / "traces"
    if not root.exists():  # the sibling folder is part of every checkout here; say so if not
        pytest.fail(f"{root} is missing")
    assert len(read_azure_llm(root / "AzureLLMInferenceTrace_conv.csv")) == 19366
    assert len(read_azure_functions(root / "azure_functions_2019_sample" / "invitro_500fn_invocations_min480-959.csv").functions) == 500


def test_popularity_shapes() -> None:
    assert popularity.uniform(4) == [0.25] * 4
    assert popularity.power(4, 1.0) == pytest.approx([0.25] * 4)
    p = popularity.power(4, 0.3)
    assert p[0] > p[1] > p[2] > p[3] and sum(p) == pytest.approx(1)
    z = popularity.zipf(3, 1.0)
    assert z == pytest.approx([6 / 11, 3 / 11, 2 / 11])


def test_stride_mapping_skews_with_stride() -> None:
    counts = [100, 50, 40, 30, 20, 10, 5, 1]
    assert popularity.stride(counts, 4, 1) == pytest.approx(np.array([120, 60, 45, 31]) / 256)
    assert popularity.stride(counts, 4, 4) == pytest.approx(np.array([220, 36, 0, 0]) / 256)
    shares = [max(popularity.stride(counts, 4, s)) for s in (1, 2, 4, 8)]
    assert shares == sorted(shares)
    # clipped at the 4th largest (30): the top four functions weigh the same
    assert popularity.stride(counts, 4, 1, cap_rank=4) == pytest.approx(np.array([50, 40, 35, 31]) / 156)


def test_gamma_arrivals_have_the_rate_and_burstiness() -> None:
    rng = np.random.default_rng(0)
    for cv in (1.0, 4.0):
        times = arrivals.gamma(10.0, cv, 20000, rng)
        gaps = np.diff(times)
        assert gaps.mean() == pytest.approx(0.1, rel=0.1)
        assert gaps.std() / gaps.mean() == pytest.approx(cv, rel=0.15)


def test_replay_rescales_to_a_rate() -> None:
    assert arrivals.replay([5.0, 6.0, 9.0]) == [0.0, 1.0, 4.0]
    assert arrivals.replay([5.0, 6.0, 9.0], rate=1.0) == pytest.approx([0.0, 0.5, 2.0])


def test_workload_is_deterministic_and_scaled(tmp_path: Path) -> None:
    rows = read_azure_llm(write(tmp_path, LLM))
    scaling = workload.LengthScaling(divide=2, max_prompt=100, max_output=10)

    def make() -> list[workload.RequestSpec]:
        rng = np.random.default_rng(3)
        return workload.build(arrivals.poisson(2.0, 50, rng), popularity.zipf(4, 1.2), rows, rng, scaling)

    a, b = make(), make()
    assert a == b and len(a) == 50
    assert {(r.prompt_len, r.output_len) for r in a} <= {(100, 10), (5, 1)}
    assert {r.adapter for r in a} <= {f"lora-{i}" for i in range(4)}
