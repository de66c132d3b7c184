"""The model package serves processes that never run the model: importing the gateway, dispatcher,
migrator, launcher or CLI imports no torch, and an adapter is checked from its file header exactly
as the engine loads it."""

from __future__ import annotations

import subprocess
import sys

import pytest

from dlora.model.adapters import inspect_adapter
from dlora.model.config import ModelConfig
from dlora.services.worker.engine.lora import load_adapter

SERVICES = [
    "dlora.services.gateway.main",
    "dlora.services.dispatcher.main",
    "dlora.services.migrator.main",
    "dlora.services.launcher",
    "dlora.services.up",
    "dlora.services.cli",
]


@pytest.mark.parametrize("module", SERVICES)
def test_services_that_run_no_model_import_no_torch(module: str) -> None:
    probe = (
        f"import sys, {module}; print(sorted(m for m in ('torch', 'triton', 'safetensors.torch') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]", out


def test_the_header_check_is_what_the_engine_loads(tiny_llama) -> None:
    cfg = ModelConfig.from_dir(tiny_llama.model)
    for name, path in tiny_llama.adapters.items():
        spec, adapter = inspect_adapter(name, path, cfg), load_adapter(name, path, cfg)
        assert spec.digest == adapter.digest and spec.rank == adapter.rank
        assert set(spec.modules) == set(adapter.weights)
        for key, m in spec.modules.items():
            w = adapter.weights[key]
            assert (m.rank, m.scale) == (w.a.shape[0], w.scale)
