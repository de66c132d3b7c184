"""What systemd would run for a unit, read from the unit file: the ExecStart command line, the
environment (Environment= and the EnvironmentFile= that exist) and the working directory, with
the specifiers the units use expanded as systemd.unit(5) defines them. The stand-in for systemd
where PID 1 is not systemd: it runs exactly what the unit says, as the unit says it."""

from __future__ import annotations

import shlex
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Command:
    argv: list[str]
    env: dict[str, str]
    cwd: Path | None


def _specifiers(text: str, unit: str, instance: str, short_host: str) -> str:
    prefix = unit.split("@")[0].removesuffix(".service")
    values = {"i": instance, "I": instance, "l": short_host, "p": prefix, "%": "%"}
    out, i = [], 0
    while i < len(text):
        if text[i] == "%" and i + 1 < len(text):
            key = text[i + 1]
            if key not in values:
                raise ValueError(f"{unit}: specifier %{key} is not one this stand-in knows")
            out.append(values[key])
            i += 2
        else:
            out.append(text[i])
            i += 1
    return "".join(out)


def service_lines(path: Path) -> list[tuple[str, str]]:
    """The ``[Service]`` section's settings in order, repeated keys kept."""
    lines, section = [], ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line
        elif section == "[Service]":
            key, _, value = line.partition("=")
            lines.append((key.strip(), value.strip()))
    return lines


def command(path: Path, instance: str = "", short_host: str = "", base_env: dict[str, str] | None = None) -> Command:
    """What systemd runs for the unit at ``path`` (instance ``instance`` of a template), on a host
    whose short name is ``short_host``."""
    unit = path.name.replace("@.", f"@{instance}.") if instance else path.name
    env = dict(base_env or {})
    argv: list[str] = []
    cwd: Path | None = None
    for key, value in service_lines(path):
        value = _specifiers(value, unit, instance, short_host)
        if key == "Environment":
            for word in shlex.split(value):
                name, _, v = word.partition("=")
                env[name] = v
        elif key == "EnvironmentFile":
            file = Path(value.removeprefix("-"))
            if not file.exists() and value.startswith("-"):
                continue  # "-": optional
            for line in file.read_text().splitlines():
                if line.strip() and not line.lstrip().startswith("#"):
                    name, _, v = line.partition("=")
                    env[name.strip()] = v.strip().strip('"')
        elif key == "ExecStart":
            argv = shlex.split(value)
        elif key == "WorkingDirectory":
            cwd = Path(value)
    if not argv:
        raise ValueError(f"{path}: no ExecStart")
    return Command(argv, env, cwd)
