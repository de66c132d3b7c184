"""Trace readers for every public format, format sniffing, and what the load generator builds from
them: each reader on small files written here, malformed rows named by file and row."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest

from dlora.loadgen import bundled, popularity, workload
from dlora.loadgen.spec import WorkloadSpec
from dlora.loadgen.traces import (
    RequestTrace,
    TenantSeries,
    TraceError,
    read_burstgpt,
    read_mooncake,
    read_servegen,
    read_trace,
    sniff,
)
from dlora.loadgen.workload import build_specs, load_traces
from dlora.services.cli import build_parser

AZURE_2023 = (
    "TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:15:46.6805900,374,44\n2023-11-16 18:15:48.1805900,10,2\n"
)
AZURE_2024 = (
    "TIMESTAMP,ContextTokens,GeneratedTokens\n"
    "2024-05-10 00:00:00.009930+00:00,4808,10\n2024-05-10 00:00:01+00:00,3180,8\n"
    "2024-05-10 00:00:00.509930+00:00,110,27\n"
)
BURSTGPT = (
    "Timestamp,Model,Request tokens,Response tokens,Total tokens,Log Type\n"
    "5,ChatGPT,472,18,490,Conversation log\n45,ChatGPT,1087,230,1317,Conversation log\n"
    "46,GPT-4,20,0,20,API log\n118,GPT-4,417,276,693,API log\n"
)
MOONCAKE = (
    '{"timestamp": 0, "input_length": 1100, "output_length": 52, "hash_ids": [0, 1, 2]}\n'
    '{"timestamp": 1500, "input_length": 600, "output_length": 26, "hash_ids": [0, 3]}\n'
    '\n{"timestamp": 3000, "input_length": 30, "output_length": 5}\n'
)
SERVEGEN_A = "0,1.5,8.5,Weibull,0.37,0.39\n600,0,0,,0,0\n1200,0.25,6.0,Gamma,0.49,3.38\n"
SERVEGEN_B = "0,0.5,1.0,Gamma,1.0,2.0\n600,0,0,,0,0\n1200,1.0,1.0,Gamma,1.0,1.0\n"


def write(tmp_path: Path, text: str, name: str = "trace.csv") -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


def servegen_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "m-large"
    folder.mkdir()
    write(folder, SERVEGEN_A, "chunk-10-trace.csv")
    write(folder, SERVEGEN_B, "chunk-2-trace.csv")
    (folder / "chunk-2-dataset.json").write_text("{}")  # ServeGen's other files are not clients
    return folder


def test_azure_2023_and_2024_schemas(tmp_path: Path) -> None:
    old = read_trace(write(tmp_path, AZURE_2023))
    assert old.format == "azure"
    assert [(r.t, r.input_tokens, r.output_tokens) for r in old.rows] == [(0.0, 374, 44), (1.5, 10, 2)]
    new = read_trace(write(tmp_path, AZURE_2024, "2024.csv"))
    # rows are put in time order; zone-aware timestamps and whole seconds both parse
    assert [(round(r.t, 6), r.input_tokens) for r in new.rows] == [(0.0, 4808), (0.5, 110), (0.99007, 3180)]


def test_burstgpt_skips_and_counts_failed_requests(tmp_path: Path) -> None:
    trace = read_burstgpt(write(tmp_path, BURSTGPT))
    assert trace.skipped == 1
    assert [(r.t, r.input_tokens, r.output_tokens) for r in trace.rows] == [
        (0.0, 472, 18),
        (40.0, 1087, 230),
        (113.0, 417, 276),
    ]
    # newer releases add columns: read by name, so extra and reordered columns are fine
    wider = "Session ID,Response tokens,Timestamp,Request tokens,Model,Elapsed time\nx,7,3.5,9,GPT-4,1.0\n"
    assert read_burstgpt(write(tmp_path, wider, "v2.csv")).rows[0].output_tokens == 7


def test_mooncake_keeps_hash_ids_and_times_in_ms(tmp_path: Path) -> None:
    trace = read_mooncake(write(tmp_path, MOONCAKE, "t.jsonl"))
    assert trace.block_tokens == 512
    assert [(r.t, r.input_tokens, r.output_tokens, r.hash_ids) for r in trace.rows] == [
        (0.0, 1100, 52, (0, 1, 2)),
        (1.5, 600, 26, (0, 3)),
        (3.0, 30, 5, ()),
    ]


def test_azure_functions_counts_per_minute(tmp_path: Path) -> None:
    text = "HashOwner,HashApp,HashFunction,Trigger,1,2,3\no,a,f1,http,1,2,3\no,a,f2,timer,10,0,0\no,b,f3,queue,0,0,1\n"
    trace = read_trace(write(tmp_path, text))
    assert (trace.format, trace.tenants, trace.window_s) == ("azure-functions", ["f1", "f2", "f3"], 60.0)
    assert trace.totals() == [6, 10, 1]


def test_servegen_file_and_folder(tmp_path: Path) -> None:
    one = read_servegen(write(tmp_path, SERVEGEN_A, "chunk-10-trace.csv"))
    assert one.tenants == ["chunk-10"] and one.window_s == 600 and one.counts == [[900.0, 0.0, 150.0]]
    many = read_trace(servegen_folder(tmp_path))
    assert isinstance(many, TenantSeries) and many.tenants == ["chunk-2", "chunk-10"]
    assert many.totals() == [900.0, 1050.0]
    # a client whose series starts late lines up by its window starts, not its row numbers
    late = tmp_path / "late"
    late.mkdir()
    write(late, SERVEGEN_A, "chunk-1-trace.csv")
    write(late, "1200,2.0,1,Gamma,1,1\n", "chunk-2-trace.csv")
    assert read_servegen(late).counts == [[900.0, 0.0, 150.0], [0.0, 0.0, 1200.0]]


@pytest.mark.parametrize(
    "name,text,fragment",
    [
        ("a.csv", "a,b\n1,2\n", "row 1: not a trace format"),
        ("a.csv", "", "empty file"),
        ("a.jsonl", MOONCAKE + '{"timestamp": 1, "input_length": "x", "output_length": 2}\n', "row 5"),
        ("a.jsonl", MOONCAKE + "{not json\n", "row 5"),
        ("a.jsonl", MOONCAKE + '{"timestamp": 1, "input_length": 3}\n', "row 5"),
        ("a.jsonl", MOONCAKE + '{"timestamp": 1, "input_length": 3, "output_length": 1, "hash_ids": [-1]}\n', "row 5"),
        ("a.csv", AZURE_2023 + "2023-11-16 18:15:50,12\n", "row 4"),
        ("a.csv", AZURE_2023 + "not a time,1,2\n", "row 4"),
        ("a.csv", AZURE_2023 + "2023-11-16 18:15:50,-3,2\n", "row 4"),
        ("a.csv", "TIMESTAMP,ContextTokens,GeneratedTokens\n", "no data rows"),
        ("a.csv", BURSTGPT + "50,GPT-4,ten,3,13,API log\n", "row 6"),
        ("a.csv", "Timestamp,Model,Request tokens,Response tokens\n1,GPT-4,3,0\n", "no data rows"),
        ("chunk-1-trace.csv", SERVEGEN_A + "1800,nan,1,Gamma,1,1\n", "row 4"),
        ("chunk-1-trace.csv", SERVEGEN_A + "1800,inf,1,Gamma,1,1\n", "row 4"),
        ("chunk-1-trace.csv", SERVEGEN_A + "1900,0.1,1,Gamma,1,1\n", "row 4: window start 1900"),
        ("chunk-1-trace.csv", "0,0,0,,0,0\n600,0,0,,0,0\n", "every tenant is idle"),
        ("a.csv", BURSTGPT + "nan,GPT-4,3,3,6,API log\n", "row 6"),
        ("a.csv", BURSTGPT + "inf,GPT-4,3,3,6,API log\n", "row 6"),
        ("a.jsonl", '{"timestamp": "NaN", "input_length": 3, "output_length": 1}\n', "row 1"),
        ("a.jsonl", '{"timestamp": "5", "input_length": 3, "output_length": 1}\n', "row 1"),
        ("a.jsonl", '{"timestamp": true, "input_length": 3, "output_length": 1}\n', "row 1"),
        ("a.jsonl", '{"timestamp": 1e400, "input_length": 3, "output_length": 1}\n', "row 1"),
        ("chunk-1-trace.csv", SERVEGEN_A + "1800,-0.1,1,Gamma,1,1\n", "row 4"),
        ("chunk-1-trace.csv", SERVEGEN_A + "1000,0.1,1,Gamma,1,1\n", "row 4"),
        ("chunk-1-trace.csv", SERVEGEN_A + "1800,0.1,1\n", "row 4"),
        ("f.csv", "HashOwner,HashApp,HashFunction,Trigger,1,2\no,a,f1,http,1,2\no,b,f4,http,1\n", "row 3"),
        ("f.csv", "HashOwner,HashApp,HashFunction,Trigger,1,2\no,a,f1,http,1,x\n", "row 2: .* got 'x'"),
        ("f.csv", "HashOwner,HashApp,HashFunction,Trigger,1,2\no,a,f1,http,0,0\n", "every tenant is idle"),
    ],
)
def test_malformed_traces_name_file_row_and_what_was_expected(
    tmp_path: Path, name: str, text: str, fragment: str
) -> None:
    path = write(tmp_path, text, name)
    with pytest.raises(TraceError, match=fragment) as err:
        read_trace(path)
    assert str(path) in str(err.value)


def test_a_forced_format_that_does_not_fit_says_what_it_expected(tmp_path: Path) -> None:
    with pytest.raises(TraceError, match="row 1: expected a BurstGPT header with columns Timestamp"):
        read_trace(write(tmp_path, AZURE_2023), "burstgpt")
    with pytest.raises(TraceError, match="unknown trace format"):
        read_trace(write(tmp_path, AZURE_2023), "sharegpt")
    with pytest.raises(TraceError, match="cannot read"):
        read_trace(tmp_path / "nope.csv")
    with pytest.raises(TraceError, match="no ServeGen client files"):
        read_trace(tmp_path)


def test_sniffing_tells_every_format_apart(tmp_path: Path) -> None:
    files = {
        "azure": AZURE_2024,
        "burstgpt": BURSTGPT,
        "mooncake": MOONCAKE,
        "servegen": SERVEGEN_A,
        "azure-functions": "HashOwner,HashApp,HashFunction,Trigger,1\no,a,f,http,3\n",
    }
    for fmt, text in files.items():
        assert sniff(write(tmp_path, text, f"{fmt}.txt")) == fmt
    assert sniff(servegen_folder(tmp_path)) == "servegen"


def test_shared_hash_ids_share_prompt_blocks_token_for_token() -> None:
    a = workload.RequestSpec(0.0, None, 20, 1, hash_ids=(7, 8, 9), block_tokens=8)
    b = workload.RequestSpec(0.0, None, 12, 1, hash_ids=(7, 5), block_tokens=8)
    c = workload.RequestSpec(0.0, None, 10, 1)
    pa, pb, pc = workload.prompt_ids(0, a), workload.prompt_ids(1, b), workload.prompt_ids(2, c)
    assert (len(pa), len(pb), len(pc)) == (20, 12, 10)
    assert pa[:8] == pb[:8] and pa[8:12] != pb[8:12]  # block 7 shared, 8 and 5 differ
    assert all(3 <= t < 256 for t in pa + pb + pc)
    # more prompt than blocks: the rest is the request's own
    d = workload.RequestSpec(0.0, None, 12, 1, hash_ids=(7,), block_tokens=8)
    assert workload.prompt_ids(3, d)[:8] == pa[:8] and len(workload.prompt_ids(3, d)) == 12


def test_mooncake_blocks_scale_with_the_lengths(tmp_path: Path) -> None:
    specs = build_specs(
        WorkloadSpec(
            trace=(str(write(tmp_path, MOONCAKE, "t.jsonl")),),
            arrivals="trace",
            requests=3,
            length_divide=64,
            max_prompt=1000,
        )
    )
    assert [(s.prompt_len, s.hash_ids, s.block_tokens) for s in specs] == [
        (17, (0, 1, 2), 8),
        (9, (0, 3), 8),
        (1, (), 0),
    ]
    first, second = (workload.prompt_ids(i, s) for i, s in enumerate(specs[:2]))
    assert first[:8] == second[:8] and first[8:9] != second[8:9]


def test_tenant_schedule_follows_the_windows(tmp_path: Path) -> None:
    series = read_servegen(servegen_folder(tmp_path))
    # chunk-10 (1050 requests) ranks first -> lora-0; chunk-2 (900) -> lora-1
    assert popularity.tenants(series, 2) == pytest.approx([1050 / 1950, 900 / 1950])
    sched = popularity.tenants(series, 2, window_s=5.0)
    assert isinstance(sched, popularity.Schedule)
    assert sched.at(0.0) == pytest.approx([0.75, 0.25])  # window 0: 1.5 vs 0.5 req/s
    assert sched.at(6.0) == pytest.approx([1050 / 1950, 900 / 1950])  # window 1: both idle -> overall
    assert sched.at(12.0) == pytest.approx([0.2, 0.8])
    assert sched.at(15.0) == sched.at(0.0)  # replayed in a loop
    rng = np.random.default_rng(0)
    rows = [workload.LLMRequestRow(0.0, 4, 4)]
    specs = workload.build([0.1] * 400 + [12.1] * 400, sched, rows, rng)
    early = sum(s.adapter == "lora-0" for s in specs[:400]) / 400
    late = sum(s.adapter == "lora-0" for s in specs[400:]) / 400
    assert early == pytest.approx(0.75, abs=0.07) and late == pytest.approx(0.2, abs=0.07)


def test_servegen_clients_as_adapter_popularity(tmp_path: Path) -> None:
    spec = WorkloadSpec(
        trace=(str(servegen_folder(tmp_path)),), popularity="stride", adapters=2, lengths="fixed", requests=2000
    )
    counts = [sum(s.adapter == f"lora-{i}" for s in build_specs(spec)) / 2000 for i in range(2)]
    assert counts == pytest.approx([1050 / 1950, 900 / 1950], abs=0.04)


def test_traces_go_where_the_options_use_them(tmp_path: Path) -> None:
    def load(*argv: str) -> tuple[RequestTrace | None, TenantSeries | None]:
        return load_traces(WorkloadSpec.from_args(build_parser().parse_args(["loadgen", *argv])))

    azure, folder = str(write(tmp_path, AZURE_2023)), str(servegen_folder(tmp_path))
    requests, tenants = load("--trace", azure, "--trace", folder, "--popularity", "stride")
    assert requests.format == "azure" and tenants.format == "servegen"
    # defaults: the bundled traces, only where an option needs them
    requests, tenants = load("--popularity", "stride")
    assert len(requests.rows) == 19366 and len(tenants.tenants) == 500
    assert load("--lengths", "fixed") == (None, None)
    with pytest.raises(TraceError, match="second request trace"):
        load("--trace", azure, "--trace", azure)
    with pytest.raises(TraceError, match="used only by --popularity stride"):
        load("--trace", folder)
    with pytest.raises(TraceError, match="used only by --arrivals trace"):
        load("--trace", azure, "--lengths", "fixed")
    assert load("--trace", "bundled:burstgpt")[0].format == "burstgpt"
    with pytest.raises(ValueError, match="no such bundled trace; they are bundled:azure-conv"):
        load("--trace", "bundled:sharegpt")


SHA256 = {  # published with the sources (loadgen/data/README.md)
    bundled.AZURE_CONV: "2f1e5b666d4e3055fdbba98598ce2ec307767b9064e03e2fa46676dbcc7d0bf8",
    bundled.AZURE_FUNCTIONS: "a0ca953d1b50cc1f0e813c656e0c3d65b7369757804b571e2767e1ab76b05536",
    bundled.BURSTGPT: "7865fda5dac50938a84dfccb06c405e2f5202969ecfbd671c8399de00f4335f0",
}


def test_the_bundled_traces_are_the_published_bytes_and_load() -> None:
    for name, digest in SHA256.items():
        assert hashlib.sha256(bundled.path(name).read_bytes()).hexdigest() == digest, name
        assert name in (bundled.data_dir() / "README.md").read_text()
    assert len(read_trace(bundled.path(bundled.AZURE_CONV)).rows) == 19366
    assert len(read_trace(bundled.path(bundled.AZURE_FUNCTIONS)).tenants) == 500
    burst = read_trace(bundled.path(bundled.BURSTGPT))
    assert (len(burst.rows), burst.skipped) == (383, 17)
    servegen = read_trace(bundled.path(bundled.SERVEGEN))
    assert len(servegen.tenants) == 32 and all(len(c) == 2016 for c in servegen.counts)
    assert (bundled.data_dir() / "LICENSES").exists() and len(list((bundled.data_dir() / "licenses").iterdir())) == 3


def test_the_cli_refuses_a_malformed_trace_before_sending(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from dlora.services.cli import main

    bad = write(tmp_path, MOONCAKE + '{"timestamp": 1, "input_length": 3}\n', "bad.jsonl")
    # port 9 (discard) is never served here: a run that got as far as sending would report failures, not 2
    assert (
        main(
            [
                "loadgen",
                "--trace",
                str(bad),
                "--arrivals",
                "trace",
                "--target",
                "http://127.0.0.1:9",
                "--out",
                str(tmp_path / "out"),
            ]
        )
        == 2
    )
    err = capsys.readouterr().err
    assert f"{bad}: row 5: expected a JSON object" in err and not (tmp_path / "out").exists()
    assert (
        main(
            [
                "loadgen",
                "--trace",
                str(bad),
                "--trace",
                "bundled:servegen",
                "--trace-format",
                "mooncake",
                "--target",
                "http://127.0.0.1:9",
            ]
        )
        == 2
    )
    assert "leave it at auto" in capsys.readouterr().err
