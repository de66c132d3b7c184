"""``dlora deploy install`` / ``uninstall``: put dlora under systemd on this host, and take it off.

``plan`` is pure: the steps an install takes for a root (``/``, or a staging directory), each a
path to create or a command to run; ``install`` carries them out and writes a manifest of what it
created, which ``uninstall`` reads to remove exactly that (a config that was there before, the
operator's, is never in it). Outside ``/`` the system user and ``systemctl`` are skipped and the
units name the paths under that root: a tree to inspect or to run the units' commands from (the
tests do), not one to copy onto another machine.

Layout (under the root): ``/opt/dlora/venv`` (the virtualenv, unless ``--venv`` names an existing
one), ``/opt/dlora/deploy`` (the shipped unit and server configs, for reference),
``/etc/dlora/dlora.toml`` (from ``deploy/dlora.example.toml``, written only if absent),
``/var/lib/dlora`` (the ``dlora`` user's home: models, adapters, caches) and the units in
``/etc/systemd/system``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

USER = "dlora"
TORCH = "torch==2.13.0"  # first and pinned: a range would pull a multi-GB CUDA build
MANIFEST = ".install-manifest.json"
# The absolute paths the shipped units name, longest first (the venv is under /opt/dlora).
_UNIT_PATHS = ("/opt/dlora/venv", "/opt/dlora", "/etc/dlora", "/var/lib/dlora")


@dataclass(frozen=True)
class Layout:
    root: Path
    venv: Path

    @property
    def opt(self) -> Path:
        return self.root / "opt/dlora"

    @property
    def etc(self) -> Path:
        return self.root / "etc/dlora"

    @property
    def state(self) -> Path:
        return self.root / "var/lib/dlora"

    @property
    def units(self) -> Path:
        return self.root / "etc/systemd/system"

    @property
    def system(self) -> bool:
        """Installing into this machine itself (root ``/``): the user and systemd are real."""
        return self.root == Path("/")


@dataclass(frozen=True)
class Step:
    """One thing install does: ``dir``, ``file`` (``content`` into ``path`` unless it exists and
    ``keep``), ``venv``, ``user`` or ``run`` (``command``)."""

    kind: str
    path: Path | None = None
    content: str = ""
    keep: bool = False
    command: tuple[str, ...] = ()

    def describe(self) -> str:
        if self.kind == "run":
            return "run " + " ".join(self.command)
        if self.kind == "user":
            return f"create system user {USER} (home {self.path})"
        if self.kind == "file" and self.keep:
            return f"write {self.path} if absent"
        return f"{'create ' + self.kind if self.kind != 'file' else 'write'} {self.path}"


def shipped() -> Path:
    """The shipped ``deploy/`` folder (``dlora.deploy``)."""
    return Path(str(resources.files("dlora.deploy")))


def render_unit(text: str, layout: Layout) -> str:
    """A shipped unit with its paths moved under ``layout`` (unchanged for ``/`` and the default venv)."""
    mapping = {
        "/opt/dlora/venv": str(layout.venv),
        "/opt/dlora": str(layout.opt),
        "/etc/dlora": str(layout.etc),
        "/var/lib/dlora": str(layout.state),
    }
    # one pass, longest path first: a path already moved is not moved again
    return re.sub("|".join(map(re.escape, _UNIT_PATHS)), lambda m: mapping[m.group(0)], text)


def plan(layout: Layout, source: Path | None, create_venv: bool) -> list[Step]:
    """The steps of an install into ``layout``; ``source`` is the project to pip-install into a
    new venv (None when ``create_venv`` is false)."""
    deploy = shipped()
    steps: list[Step] = []
    if layout.system:
        steps.append(Step("user", layout.state))
    steps += [Step("dir", d) for d in (layout.opt, layout.etc, layout.state, layout.state / "cache", layout.units)]
    if create_venv:
        steps.append(Step("venv", layout.venv, content=str(source)))
    for path in sorted(
        p for p in deploy.rglob("*") if p.is_file() and p.suffix != ".py" and "__pycache__" not in p.parts
    ):
        relative = path.relative_to(deploy)
        steps.append(Step("file", layout.opt / "deploy" / relative, content=path.read_text()))
    for unit in sorted((deploy / "systemd").iterdir()):
        steps.append(Step("file", layout.units / unit.name, content=render_unit(unit.read_text(), layout)))
    example = (deploy / "dlora.example.toml").read_text()
    steps.append(Step("file", layout.etc / "dlora.toml", content=example, keep=True))
    if layout.system:
        steps.append(Step("run", command=("systemctl", "daemon-reload")))
    return steps


def next_command(layout: Layout) -> str:
    if layout.system:
        return (
            f"edit {layout.etc / 'dlora.toml'}, then: systemctl enable --now dlora.target "
            "dlora-gateway dlora-dispatcher dlora-migrator (control host) or dlora-worker@0 ... (one per GPU)"
        )
    return f"staged under {layout.root} (its units name paths there): inspect it, or run what they start"


def install(layout: Layout, steps: list[Step]) -> list[str]:
    """Carry out ``steps``; what was created, recorded in ``etc/dlora/.install-manifest.json``
    (also when a step fails: an install run again, or an uninstall, goes on from there) and
    returned. A file written only if absent (``dlora.toml``) is never recorded: it is the
    operator's from then on. Raises ``OSError`` or ``subprocess.CalledProcessError`` on a step
    that fails."""
    created: list[str] = []
    manifest_path = layout.etc / MANIFEST
    if manifest_path.exists():  # a second install adds to the first's record
        created = json.loads(manifest_path.read_text())["created"]
    try:
        _carry_out(steps, created)
    finally:
        if layout.etc.exists():
            manifest_path.write_text(json.dumps({"created": sorted(set(created), key=created.index)}, indent=1) + "\n")
    if layout.system:
        subprocess.run(["chown", "-R", f"{USER}:{USER}", str(layout.state)], check=True)
    return created


def _carry_out(steps: list[Step], created: list[str]) -> None:
    for step in steps:
        if step.kind == "user":
            if subprocess.run(["id", "-u", USER], capture_output=True).returncode != 0:
                subprocess.run(
                    ["useradd", "--system", "--home-dir", str(step.path), "--shell", "/usr/sbin/nologin", USER],
                    check=True,
                )
                created.append(f"user:{USER}")
        elif step.kind == "dir":
            assert step.path is not None
            _make_dirs(step.path, created)
        elif step.kind == "venv":  # made once; dlora in it reinstalled from the source every time (upgrade)
            assert step.path is not None
            pip = [str(step.path / "bin/python"), "-m", "pip", "install", "-q"]
            if not step.path.exists():
                created.append(str(step.path))
                subprocess.run([sys.executable, "-m", "venv", str(step.path)], check=True)
            subprocess.run([*pip, TORCH], check=True)
            subprocess.run([*pip, "--upgrade", step.content], check=True)
        elif step.kind == "file":
            assert step.path is not None
            if step.keep and step.path.exists():
                continue
            _make_dirs(step.path.parent, created)
            if not step.path.exists() and not step.keep:
                created.append(str(step.path))
            step.path.write_text(step.content)
        elif step.kind == "run":
            subprocess.run(list(step.command), check=True)


def _make_dirs(path: Path, created: list[str]) -> None:
    missing = [p for p in (path, *path.parents) if not p.exists()]
    path.mkdir(parents=True, exist_ok=True)
    created += [str(p) for p in reversed(missing)]


def uninstall(layout: Layout, dry_run: bool = False) -> list[str]:
    """Stop and disable the units (on ``/``), then remove what install recorded, newest first
    (files, then the folders it made once empty of anything else, then the user); a path someone
    else added to is left, and so is ``dlora.toml``. What was removed."""
    manifest_path = layout.etc / MANIFEST
    if not manifest_path.exists():
        raise FileNotFoundError(f"{manifest_path}: nothing was installed there by dlora deploy install")
    created: list[str] = json.loads(manifest_path.read_text())["created"]
    removed: list[str] = []
    if layout.system and not dry_run:  # nothing may run from, or be enabled on, what goes
        units = sorted(Path(p).name for p in created if p.startswith(str(layout.units)))
        subprocess.run(["systemctl", "stop", "dlora.target", "dlora-*.service"], check=False)
        subprocess.run(["systemctl", "disable", *units], check=False)  # a template: every instance
    for item in reversed(created):
        if item.startswith("user:"):
            if dry_run or subprocess.run(["userdel", item[5:]], check=False).returncode == 0:
                removed.append(item)
            continue
        path = Path(item)
        if path.is_dir() and (path / "bin" / "python").exists() and path.name == "venv":
            if not dry_run:
                shutil.rmtree(path)
            removed.append(item)
        elif path.is_file() or path.is_symlink():
            if not dry_run:
                path.unlink()
            removed.append(item)
        elif path.is_dir() and not [p for p in path.iterdir() if p.name != MANIFEST or path != layout.etc]:
            if not dry_run:
                (path / MANIFEST).unlink(missing_ok=True)
                path.rmdir()
            removed.append(item)
    if not dry_run:
        manifest_path.unlink(missing_ok=True)
        if layout.system:
            subprocess.run(["systemctl", "daemon-reload"], check=False)
    return removed


def _source() -> Path:
    project = shipped().parent
    if not (project / "pyproject.toml").exists():
        raise SystemExit("dlora deploy install: run it from a source checkout, or pass --venv with dlora installed")
    return project


def run(args: argparse.Namespace) -> int:
    root = Path(args.prefix).resolve()
    layout = Layout(root, Path(args.venv).resolve() if args.venv else root / "opt/dlora/venv")
    if args.deploy_command == "uninstall":
        try:
            removed = uninstall(layout, args.dry_run)
        except FileNotFoundError as e:
            print(f"dlora deploy uninstall: {e}", file=sys.stderr)
            return 2
        for item in removed:
            print(("would remove " if args.dry_run else "removed ") + item)
        return 0
    if layout.system and os.geteuid() != 0 and not args.dry_run:
        print("dlora deploy install: installing into / needs root (or --prefix DIR to stage)", file=sys.stderr)
        return 2
    steps = plan(layout, None if args.venv else _source(), create_venv=not args.venv)
    if args.dry_run:
        for step in steps:
            print(step.describe())
        return 0
    install(layout, steps)
    if not layout.system:
        print("skipped outside /: the dlora user and systemctl daemon-reload")
    print("next: " + next_command(layout))
    return 0
