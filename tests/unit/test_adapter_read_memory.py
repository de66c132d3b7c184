"""An adapter's files are read into as many bytes as they hold, not as many as they may hold: the
read asked for ``max_file_bytes`` + 1 (4 GiB by default), which Python allocates before reading,
so under an address-space limit (``ulimit -v``) registering or loading even a tiny adapter failed
with MemoryError (a 500), and a small host's overcommit check refuses such an allocation alike."""

from __future__ import annotations

import subprocess
import sys
import tracemalloc
from pathlib import Path

from dlora.model.adapters import AdapterLimits, inspect_adapter
from dlora.model.config import ModelConfig
from dlora.model.make_tiny import TinyOutput

LIMITED = """
import resource, sys
from dlora.model.adapters import inspect_adapter
from dlora.model.config import ModelConfig
cfg = ModelConfig.from_dir(sys.argv[2])
vm = int(next(line for line in open("/proc/self/status") if line.startswith("VmSize")).split()[1]) * 1024
resource.setrlimit(resource.RLIMIT_AS, (vm + (1 << 30), resource.RLIM_INFINITY))
print("rank", inspect_adapter("a", sys.argv[1], cfg).rank)
"""


def test_an_adapter_registers_under_an_address_space_limit(adapter: Path, tiny_llama: TinyOutput) -> None:
    done = subprocess.run(
        [sys.executable, "-c", LIMITED, str(adapter), str(tiny_llama.model)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0 and "rank 8" in done.stdout, done.stderr[-2000:]


def test_a_read_holds_the_files_bytes_not_the_limits(adapter: Path, root: Path, engine_cfg: ModelConfig) -> None:
    size = sum(f.stat().st_size for f in adapter.iterdir())
    tracemalloc.start()
    try:
        inspect_adapter("a", adapter, engine_cfg, AdapterLimits(max_file_bytes=1 << 30), [root])
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 16 * size + (8 << 20), f"{peak} bytes held to read {size}"
