"""``make gpu-check``: what a session lent a GPU measures first, in one command, within 8 minutes.

It runs on a machine with an NVIDIA GPU and its own torch, Triton, transformers and peft, with
nothing of this project installed, no network and perhaps no make: ``python3 loadgen/gpu_check.py``
(``bootstrap``) puts the source on ``PYTHONPATH`` and installs the wheels of ``make gpu-wheels``,
carried in ``.whl/``, for what such a machine lacks. In order, each with its own time bound so one
slow part cannot starve the rest:

0. ``dlora bench tune-lora``: the LoRA kernels' tiles timed on this GPU into ``dlora_kernels/tuned/``
   (and a copy in OUT, to commit);
1. the CUDA tests: ``tests/kernels`` natively (real-model sizes included) and the engine's parity,
   adapter (merge), graph, sampler, structured-output and async-scheduling tests with
   ``DLORA_TEST_DEVICE=cuda`` (every engine the tests make runs on the GPU). Not the deliberate
   illegal memory access of ``tests/engine/test_device_lost_gpu.py``: the first lent machine
   that ran a gpu-check including it stopped answering before it handed anything back, which
   loses the whole run; run that file by hand, alone, last;
2. ``dlora bench kernels``;
3. ``dlora bench engine --device cuda --preset 7b --dtype bfloat16 --profile``: decode steps at 7B
   widths (a few layers), wall vs GPU kernel time, launches and the host's phases per step (how
   much of a step the host spends outside the wait for the kernels), LoRA step ratios,
   merge/unmerge, and HF transformers + peft on the same model, with decode steps replayed as
   CUDA graphs;
4. the same at batch 32 with ``--enforce-eager`` (every kernel launched from the host), into its
   own files, for the graphs' gain;
5. the same at batch 32 with ``--async-scheduling`` (each step launched while the GPU runs the
   last), into its own files, for what overlapping the host's work gains.

Each benchmark rewrites its section of BENCHMARKS.md, naming the GPU; ``OUT/gpu-check.json``
holds every part's exit status and seconds. Exit status: 0 when every part passed, 1 when one
failed, 2 when there is no CUDA device.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tarfile
import time
import tomllib
from pathlib import Path


def parts(out: Path, benchmarks: str) -> list[tuple[str, list[str], dict[str, str], float]]:
    """(name, command, extra environment, seconds allowed) for each part, in order; the allowances
    sum to 480 s, the 8 minutes the whole may take (a device session has 15, start included)."""
    py = [sys.executable]
    cli = [*py, "-m", "dlora.services.cli", "bench"]
    # pytest without pytest-asyncio (its wheel left behind) would stop at pyproject's asyncio
    # options, warnings being errors; with pytest-xdist (the GPU image has it) the ~200 Triton
    # compiles of a cold cache run four at a time.
    pytest = [*py, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-W", "ignore::pytest.PytestConfigWarning"]
    if importlib.util.find_spec("xdist") is not None:
        pytest += ["-n", "4"]
    engine_7b = [
        *cli,
        "engine",
        "--device",
        "cuda",
        "--preset",
        "7b",
        "--dtype",
        "bfloat16",
        "--steps",
        "10",
        "--profile",
    ]
    return [
        # First, so every later part runs on the tiles it measures (dlora_kernels/tuned/, copied into OUT).
        (
            "tune-lora",
            [*cli, "tune-lora", "--tokens", "1,32,64", "--groups", "1,8"],
            {},
            75.0,
        ),
        ("kernel-tests", [*pytest, "tests/kernels"], {}, 100.0),
        (
            "engine-tests",
            [
                *pytest,
                "tests/engine/test_parity.py",
                "tests/engine/test_adapters.py",
                "tests/engine/test_graphs.py",
                "tests/engine/test_sampler_gpu.py",
                "tests/engine/test_structured.py",
                "tests/engine/test_async_scheduling.py",
            ],
            {"DLORA_TEST_DEVICE": "cuda"},
            100.0,
        ),
        ("bench-kernels", [*cli, "kernels", "--json", str(out / "kernels.json"), "--benchmarks", benchmarks], {}, 45.0),
        (
            "bench-engine",
            [
                *engine_7b,
                *("--batch-sizes", "1,32,64", "--adapters", "1,8,64", "--rounds", "3", "--hf-baseline"),
                *("--json", str(out / "engine.json"), "--benchmarks", benchmarks),
            ],
            {},
            110.0,
        ),
        (
            # The same steps launched op by op, beside the graphed ones above (its own file: the
            # section above stays the graphed run's).
            "bench-eager",
            [
                *engine_7b,
                *("--batch-sizes", "32", "--adapters", "1", "--rounds", "2", "--enforce-eager"),
                *("--json", str(out / "engine-eager.json"), "--benchmarks", str(out / "engine-eager.md")),
            ],
            {},
            25.0,
        ),
        (
            # The graphed steps again, each launched while the GPU runs the last (async scheduling):
            # its wall against kernel time beside the synchronous run's above.
            "bench-async",
            [
                *engine_7b,
                *("--batch-sizes", "32", "--adapters", "1", "--rounds", "2", "--async-scheduling"),
                *("--json", str(out / "engine-async.json"), "--benchmarks", str(out / "engine-async.md")),
            ],
            {},
            25.0,
        ),
    ]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="make gpu-check", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="bench-results/gpu", help="folder for the JSON results and logs")
    p.add_argument("--benchmarks", default="BENCHMARKS.md", help="file whose sections are regenerated")
    p.add_argument("--bundle", help="also write everything the run made or rewrote into this .tgz (to bring back)")
    p.add_argument(
        "--only",
        help="comma-separated parts to run, in their order (tune-lora, kernel-tests, engine-tests, bench-kernels, "
        "bench-engine, bench-eager, bench-async): a lent machine that may not last splits the run into calls",
    )
    args = p.parse_args(argv)
    known = [name for name, *_ in parts(Path(args.out), args.benchmarks)]
    only = known if args.only is None else args.only.split(",")
    if unknown := [name for name in only if name not in known]:
        p.error(f"unknown part(s) {', '.join(unknown)}; the parts: {', '.join(known)}")
    try:
        return _check(Path(args.out), args.benchmarks, only)
    finally:
        if args.bundle:
            bundle(Path(args.bundle), Path(args.out), Path(args.benchmarks))


def bundle(path: Path, out: Path, benchmarks: Path) -> None:
    """One archive of what a run made or rewrote: OUT (results, logs, the tuned table), the
    BENCHMARKS.md sections and their plots, the tuned tables (a device machine hands back a few
    files, not folders of them)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w:gz") as tar:
        for p in [out, benchmarks, *sorted(Path("docs").glob("bench-*.png")), Path("dlora_kernels/tuned")]:
            if p.exists():
                tar.add(p)


def _check(out: Path, benchmarks: str, only: list[str]) -> int:
    try:
        import torch
    except ImportError:
        print(
            "make gpu-check: this Python has no torch (use the GPU machine's own: make gpu-check PYTHON=...)",
            file=sys.stderr,
        )
        return 2
    if not torch.cuda.is_available():
        print("make gpu-check: no CUDA device here (torch.cuda.is_available() is False)", file=sys.stderr)
        return 2
    out.mkdir(parents=True, exist_ok=True)
    summary: dict[str, object] = {
        "gpu": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "parts": earlier_parts(out / "gpu-check.json", torch.cuda.get_device_name()),
    }
    failed = False
    for name, cmd, env, limit in parts(out, benchmarks):
        if name not in only:
            continue
        start = time.monotonic()
        log = out / f"{name}.log"
        with log.open("w") as f:
            try:
                rc = subprocess.run(
                    cmd, env={**os.environ, **env}, stdout=f, stderr=subprocess.STDOUT, timeout=limit, check=False
                ).returncode
            except subprocess.TimeoutExpired:
                rc = 124
        seconds = time.monotonic() - start
        summary["parts"][name] = {"rc": rc, "seconds": round(seconds, 1)}  # type: ignore[index]
        print(f"{name:<14} rc={rc:<4} {seconds:6.1f} s  (log: {log})", flush=True)
        failed |= rc != 0
    from dlora.kernels.lora_tuning import TUNED

    for table in TUNED.glob("*.json"):  # to commit: the run's files come back from OUT only
        shutil.copy(table, out / table.name)
    (out / "gpu-check.json").write_text(json.dumps(summary, indent=2) + "\n")
    return 1 if failed else 0


def earlier_parts(path: Path, gpu: str) -> dict[str, object]:
    """The parts an earlier run (``--only``) on this same GPU recorded in ``path``: a run split
    into calls ends with one summary of them all."""
    try:
        earlier = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return dict(earlier.get("parts", {})) if earlier.get("gpu") == gpu else {}


def package_dirs(root: Path) -> dict[str, Path]:
    """Each top-level package's name under ``dlora`` (``kernels``) to its folder in the source tree
    ``root`` (``root/dlora_kernels``): pyproject's ``package-dir``, what pip installs from."""
    table = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]
    return {name.removeprefix("dlora."): root / folder for name, folder in table.items()}


def lay_out(root: Path, src: Path) -> None:
    """``src/dlora/<name>`` a link to each package's folder, as installed (``package_dirs``)."""
    (src / "dlora").mkdir(parents=True, exist_ok=True)
    for name, pkg in package_dirs(root).items():
        link = src / "dlora" / name
        if link.is_symlink() and link.resolve() != pkg:  # made from a checkout elsewhere
            link.unlink()
        if not link.is_symlink():
            link.symlink_to(pkg)


def bootstrap(argv: list[str]) -> int:
    """Run as a file (``python3 loadgen/gpu_check.py``, what ``make gpu-check`` does; the GPU
    machine may have no make): the source laid out as the ``dlora`` package under .cache, the
    carried wheels installed beside it, then ``main`` with both on PYTHONPATH. Exit 2 without
    wheels: the engine needs msgspec, which that machine lacks."""
    root = Path(__file__).resolve().parents[1]
    src, site = root / ".cache/gpu-src", root / ".cache/gpu-site"
    lay_out(root, src)
    wheels = sorted(str(w) for w in root.glob(".whl/*.whl"))
    if not wheels:
        print("gpu-check: no wheels in .whl/ (run `make gpu-wheels` on a machine with a network, carry .whl)")
        return 2
    pip = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile", "--upgrade"]
    subprocess.run([*pip, "--target", str(site), *wheels], check=True)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(map(str, (src, site, root))), "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, "-m", "dlora.loadgen.gpu_check", *argv], cwd=root, env=env).returncode


if __name__ == "__main__":
    sys.exit(bootstrap(sys.argv[1:]) if not __package__ else main())
