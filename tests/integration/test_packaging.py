"""The shipped traces travel with the package: a wheel built from this tree carries them, and an
install of that wheel finds them through importlib.resources from any working directory."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

from dlora.loadgen.gpu_check import package_dirs

ROOT = Path(__file__).resolve().parents[2]


def test_a_wheel_carries_the_traces_and_finds_them_installed(tmp_path: Path) -> None:
    # built from a copy, so the build leaves nothing in the checkout
    source = tmp_path / "source"
    shutil.copytree(
        ROOT,
        source,
        ignore=shutil.ignore_patterns(
            ".git", ".venv", ".cache", "build", "*.egg-info", "__pycache__", ".pytest_cache", "bench-results"
        ),
    )
    wheels = tmp_path / "wheels"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "-w",
            str(wheels),
            str(source),
        ],
        check=True,
        capture_output=True,
    )
    (wheel,) = wheels.glob("dlora-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    shipped = {str(p.relative_to(ROOT)) for p in (ROOT / "loadgen" / "data").rglob("*") if p.is_file()}
    assert {f"dlora/{name}" for name in shipped} <= names
    # every package of the tree (dlora.loadgen.chaos was left out, and with it `make soak`'s imports)
    tracked = subprocess.run(["git", "ls-files", "*__init__.py"], cwd=ROOT, capture_output=True, text=True, check=True)
    packages = {Path(f).parent for f in tracked.stdout.split() if not f.startswith("tests/")}
    installed_as = {folder.name: name for name, folder in package_dirs(ROOT).items()}  # dlora_kernels: kernels
    assert {"/".join(["dlora", installed_as[p.parts[0]], *p.parts[1:], "__init__.py"]) for p in packages} <= names
    target = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target), str(wheel)],
        check=True,
        capture_output=True,
    )
    # -S: no site-packages, so the editable install of this checkout is not on the path; only the wheel is.
    probe = (
        "import sys; sys.path.insert(0, sys.argv[1]);"
        "from dlora.loadgen import bundled; from dlora.loadgen.traces import read_trace;"
        "p = bundled.resolve('bundled:azure-conv'); print(p); print(len(read_trace(p).rows));"
        "print(len(read_trace(bundled.resolve('bundled:servegen')).tenants))"
    )
    cwd = tmp_path / "elsewhere"
    cwd.mkdir()
    out = subprocess.run(
        [sys.executable, "-S", "-c", probe, str(target)], cwd=cwd, check=True, capture_output=True, text=True
    ).stdout.split()
    assert Path(out[0]).is_relative_to(target) and out[1:] == ["19366", "32"]
