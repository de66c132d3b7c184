"""The workload data shipped inside the package (``loadgen/data/``; its README gives each file's
source, commit and licence). Found through ``importlib.resources``, so it resolves the same from a
source checkout, an editable install or an installed wheel, whatever the working directory."""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

AZURE_CONV = "AzureLLMInferenceTrace_conv.csv"
AZURE_FUNCTIONS = "azure_functions_2019_sample/invitro_500fn_invocations_min480-959.csv"
BURSTGPT = "burstgpt/BurstGPT_1_rows1-400.csv"
SERVEGEN = "servegen/language/m-large"  # a folder: the 32 busiest of ServeGen's m-large clients


def data_dir() -> Path:
    """The folder holding the shipped traces (a real folder: wheels are installed unpacked)."""
    return Path(str(files("dlora.loadgen") / "data"))


def path(name: str) -> Path:
    """A shipped trace by its name under ``data_dir()`` (one of the constants above)."""
    return data_dir() / name


# ``--trace bundled:<name>`` names a shipped trace without its path.
NAMES = {"azure-conv": AZURE_CONV, "azure-functions": AZURE_FUNCTIONS, "burstgpt": BURSTGPT, "servegen": SERVEGEN}
PREFIX = "bundled:"


def resolve(arg: str) -> Path:
    """A ``--trace`` argument as a path: ``bundled:<name>`` (one of ``NAMES``) or a path as given.

    Raises:
        ValueError: an unknown bundled name.
    """
    if not arg.startswith(PREFIX):
        return Path(arg)
    name = arg[len(PREFIX) :]
    if name not in NAMES:
        raise ValueError(f"--trace {arg}: no such bundled trace; they are {', '.join(PREFIX + n for n in NAMES)}")
    return path(NAMES[name])
