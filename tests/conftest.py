"""Shared fixtures: tiny random models made once per session (no downloads)."""

from __future__ import annotations

import gc
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

# Triton kernels run under its interpreter where there is no GPU; this must be set before
# anything imports triton.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Under xdist (make test: two workers on two cores) one thread per process, here and in the
# services the tests start: each process's OpenMP pool of one thread a core oversubscribed the
# cores, and its threads spin while they wait (the engine tests ran twice as long).
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)

import structlog

from dlora.model.make_tiny import TinyOutput, make_tiny


@pytest.fixture(autouse=True)
def logging_as_before_any_command() -> None:
    """structlog's defaults at each test's start: a command run in-process (`dlora keys`
    configures WARNING) left its level to every later test of the process, which then read none
    of the INFO lines it looked for (the access log's tests, in a random order)."""
    structlog.reset_defaults()


# A test process's resident memory past which a test's end runs the cycle collector. A stack's
# two engines (a 256 MiB KV cache each) sit in reference cycles, which the collector, counting
# Python objects, not bytes, reached rarely: an xdist worker grew ~0.5 GiB a stack test to 9.5 GiB
# and the OOM killer ended it (a clean-clone CI run). A collection at every test's end costs more
# than the suite can spare; past this, one.
COLLECT_PAST_BYTES = 3 << 30


@pytest.fixture(autouse=True)
def memory_of_ended_tests_freed() -> Iterator[None]:
    yield
    with open("/proc/self/statm") as f:
        resident = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    if resident > COLLECT_PAST_BYTES:
        gc.collect()


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory) -> TinyOutput:
    """Llama-shaped (GQA 4:2, untied head), five adapters of ranks 8/16/32 with mixed targets."""
    return make_tiny(tmp_path_factory.mktemp("llama"), preset="tiny", arch="llama", num_adapters=5, seed=1)


@pytest.fixture(scope="session")
def tiny_qwen(tmp_path_factory: pytest.TempPathFactory) -> TinyOutput:
    """Qwen2-shaped (GQA, q/k/v bias, tied embeddings), four adapters."""
    return make_tiny(tmp_path_factory.mktemp("qwen"), preset="tiny", arch="qwen2", num_adapters=4, seed=2)


@pytest.fixture(scope="session")
def engine_cfg(tiny_llama: TinyOutput):
    from dlora.model.config import ModelConfig

    return ModelConfig.from_dir(tiny_llama.model)


# Ids of the tiny model's vocabulary that ``special_tokenizer`` marks special: inside 3..255, where
# a real model's control tokens lie (Mistral v0.3's ids 3-770: [INST], [TOOL_CALLS], [control_N])
SPECIAL_IDS = (*range(3, 21), 100, 200)


@pytest.fixture(scope="session")
def special_tokenizer(tiny_llama: TinyOutput, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder holding the tiny model's tokenizer with ``SPECIAL_IDS`` made special tokens (their
    ids kept: tokens the vocabulary holds already)."""
    from dlora.model.tokenizer import load_tokenizer

    tok = load_tokenizer(tiny_llama.model)
    tok.add_special_tokens({"additional_special_tokens": tok.convert_ids_to_tokens(list(SPECIAL_IDS))})
    out = tmp_path_factory.mktemp("special-tokenizer")
    tok.save_pretrained(out)
    return out
