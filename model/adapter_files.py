"""An adapter's files, read as untrusted input: every file resolved and confined, bounded in size,
its safetensors file checked by safetensors' own loader, and its weights' values checked (finite, of a
float dtype, of a sane magnitude). ``adapters`` builds on this; the gateway (at registration) and
the worker's engine (at load) both read through here, so they refuse the same files.

Torch-free: the values are read with numpy straight from the file's bytes (bfloat16 by widening
its bits to float32), so the gateway checks them without importing torch.
"""

from __future__ import annotations

import json
import math
import os
import shlex
import stat
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, BinaryIO

import msgspec
import numpy as np
import numpy.typing as npt
from safetensors import SafetensorError, deserialize

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
# PEFT's weights file before safetensors (save_pretrained(safe_serialization=False)), and the
# adapter_model.pt vLLM reads too (its lora_model.py): pickles it reads with
# torch.load(weights_only=True); refused here with how to convert them (read_adapter_files).
PICKLE_FILES = ("adapter_model.bin", "adapter_model.pt")
# adapter_config.json is a few kB; a bound keeps a planted huge file from being parsed as JSON.
MAX_CONFIG_BYTES = 1 << 20
# The float dtypes a LoRA weight may have, by their safetensors names: the numpy dtype that reads
# them (bfloat16: its bits). Integer, boolean, fp8 and float64 weights are not LoRA adapters the
# engine serves.
FLOAT_DTYPES = {"F32": "<f4", "F16": "<f2", "BF16": "<u2"}
# safetensors' own bound on a header's length (MAX_HEADER_SIZE): a longer one it refuses
MAX_HEADER_BYTES = 100_000_000


class AdapterError(ValueError):
    """The adapter directory cannot be served; the message says why."""

    # The files' content digest (``content_digest``) where they were read whole before the error
    # (a rank over the limits, tensors torch cannot load): a reader then tells files changed since
    # registration from files that never loaded here.
    digest: str | None = None


class AdapterRefused(AdapterError):
    """The adapter's files read whole, but this process's limits refuse them (its adapter roots, a
    file size, max_lora_rank, max_scale): a fault of the settings, not of the files."""


class AdapterOverLimit(AdapterRefused):
    """The adapter itself is past a serving limit it is measured against (a module's rank above
    ``max_lora_rank``, its scaling above ``max_scale``): a request of it is refused as vLLM refuses
    a LoRA above ``--max-lora-rank`` (a 400 naming the limit), not answered as a server fault."""


class AdapterLimits(msgspec.Struct, kw_only=True, frozen=True, forbid_unknown_fields=True):
    """What an adapter may be, beyond fitting the base model. The gateway checks these when an
    adapter is registered (``[gateway.adapter_limits]``) and each worker when it loads one
    (``[worker.engine.adapter_limits]``); give both the same values, or adapters the gateway
    accepts fail their requests on the workers (400 naming the limit where the adapter's rank or
    scaling is above a worker's: ``AdapterOverLimit``)."""

    # Highest LoRA rank of any module (vLLM's max_lora_rank; 512 is the largest it supports).
    max_lora_rank: int = 512
    # Largest adapter_model.safetensors, in bytes. 4 GiB holds rank 256 on every projection of
    # an 8B Llama in fp32 (about 2.7 GB); raise it for bigger bases. The whole file is read into
    # memory, by the gateway and by each worker.
    max_file_bytes: int = 4 << 30
    # Largest |value| of any weight. Trained LoRA weights are far below 1; 1e4 is already
    # absurd, and half precision overflows at 65504.
    max_abs_weight: float = 1e4
    # Largest scaling of any module: lora_alpha / r (lora_alpha / sqrt(r) with use_rslora).
    # Usual values are 0.5 to 32; above 1e3 the adapter swamps the base model's output.
    max_scale: float = 1e3

    def check(self) -> list[tuple[str, object, str]]:
        """Problems as (field, value, why); empty when the values are usable."""
        bad: list[tuple[str, object, str]] = [
            (f, getattr(self, f), "must be >= 1") for f in ("max_lora_rank", "max_file_bytes") if getattr(self, f) < 1
        ]
        # `not x > 0` also refuses NaN; inf is allowed and means no bound
        bad += [
            (f, getattr(self, f), "must be > 0") for f in ("max_abs_weight", "max_scale") if not getattr(self, f) > 0
        ]
        return bad


_KINDS = {
    stat.S_IFDIR: "a directory",
    stat.S_IFIFO: "a FIFO",
    stat.S_IFCHR: "a character device",
    stat.S_IFBLK: "a block device",
    stat.S_IFSOCK: "a socket",
}


# Reads the first bytes of an open file of a given size, judging them (AdapterError) before the rest is read
HeadReader = Callable[[BinaryIO, int], None]


def read_file(
    name: str, file: Path, max_bytes: int, roots: Sequence[Path] | None = None, head: HeadReader | None = None
) -> bytes:
    """The bytes of ``file``, refused (AdapterError) unless it resolves (symlinks followed) to a
    regular file of at most ``max_bytes`` inside one of ``roots`` (resolved paths; None: anywhere)
    and ``head`` (if given) takes its first bytes (read again with the rest: a copy of a header, not
    of the data; the whole file is judged again after).

    Why each step: a symlink inside a root may point anywhere, so the root check is on the
    resolved path; a FIFO would block the reader forever and a device (/dev/zero) never ends, so
    only regular files are opened; and the file is opened without following a symlink, checked
    to be the one stat'ed and, where the system says, to lie inside the roots as opened, so
    neither it nor a directory above it can be swapped between the check and the read."""
    where = f"adapter {name!r}: {file}"
    try:
        real = file.resolve(strict=True)
    except FileNotFoundError:
        raise AdapterError(f"{where} not found") from None
    except (OSError, RuntimeError) as e:  # a symlink loop: RuntimeError before Python 3.13
        raise AdapterError(f"{where} cannot be resolved ({e})") from None
    if roots is not None and not any(real.is_relative_to(root) for root in roots):
        raise AdapterRefused(f"{where} resolves to {real}, outside the configured adapter roots")
    try:
        st = os.stat(real)
        if not stat.S_ISREG(st.st_mode):
            raise AdapterError(f"{where} is not a regular file ({_KINDS.get(stat.S_IFMT(st.st_mode), 'special')})")
        if st.st_size > max_bytes:
            raise AdapterRefused(f"{where} is {st.st_size} bytes, above the limit of {max_bytes}")
        flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
        with os.fdopen(os.open(real, flags), "rb") as f:
            now = os.fstat(f.fileno())
            if (now.st_dev, now.st_ino) != (st.st_dev, st.st_ino) or not stat.S_ISREG(now.st_mode):
                raise AdapterError(f"{where} changed while it was being read")
            if roots is not None and (opened := _opened_path(f.fileno())) is not None:
                if not any(opened.is_relative_to(root) for root in roots):
                    raise AdapterRefused(f"{where} resolves to {opened}, outside the configured adapter roots")
            if head is not None:
                head(f, st.st_size)
                f.seek(0)
            # As many bytes as it holds, and one to tell it grew: Python allocates what a read asks
            # for before reading, and max_bytes + 1 (4 GiB) failed every read under ulimit -v
            data = f.read(st.st_size + 1)
    except OSError as e:
        raise AdapterError(f"{where} cannot be read ({e.strerror})") from None
    except MemoryError:
        raise AdapterRefused(f"{where}: {st.st_size} bytes cannot be held in memory here") from None
    if len(data) != st.st_size:  # written meanwhile: what was read is no version of it
        raise AdapterError(f"{where} changed while it was being read ({st.st_size} bytes, then {len(data)})")
    return data


def _opened_path(fd: int) -> Path | None:
    """Where an open file really is (Linux's /proc; None elsewhere): a directory of its path
    swapped for a link out between the resolve and the open is followed by both stat and open,
    O_NOFOLLOW guarding only the last component."""
    try:
        return Path(os.readlink(f"/proc/self/fd/{fd}"))
    except OSError:
        return None


def files_bytes(path: str | Path) -> int | None:
    """The bytes reading the adapter at ``path`` reads (its config and weights, links followed:
    ``AdapterSpec.file_bytes``), from their sizes alone; None where one cannot be looked at (a
    read then says why)."""
    try:
        return sum(os.stat(Path(path) / f).st_size for f in (CONFIG_FILE, WEIGHTS_FILE))
    except (OSError, ValueError):
        return None


def convert_command(pickled: Path, weights: Path) -> str:
    """A shell command that writes the tensors of PEFT's pickled weights file ``pickled``
    (``adapter_model.bin`` or ``.pt``) into the safetensors file ``weights`` (the names kept: safetensors'
    ``save_file``, each tensor made contiguous as it requires), loading the pickle with
    ``torch.load(weights_only=True)`` (tensors only, as vLLM reads it)."""
    code = (
        "import torch; from safetensors.torch import save_file; "
        f"save_file({{k: v.contiguous() for k, v in torch.load({str(pickled)!r}, weights_only=True).items()}}, "
        f"{str(weights)!r})"
    )
    return f"python3 -c {shlex.quote(code)}"  # python3: Debian and Ubuntu have no `python` unless asked


# Judges the config's bytes and the weights' header (AdapterError) before the weights' data is read
HeaderJudge = Callable[[bytes, "dict[str, TensorInfo]"], None]


def read_adapter_files(
    name: str,
    path: str | Path,
    limits: AdapterLimits | None = None,
    roots: Sequence[str | Path] | None = None,
    judge: HeaderJudge | None = None,
) -> tuple[bytes, bytes]:
    """adapter_config.json and adapter_model.safetensors, as bytes (AdapterError if missing or
    refused by ``read_file``, or by ``judge`` given the config and the weights' header). ``roots``:
    the directories every file must resolve into; None (the engine, ``dlora generate``) reads them
    wherever they are: a worker loads only paths the gateway checked, and refuses files whose
    digest changed since."""
    limits = limits or AdapterLimits()
    path = Path(path)
    resolved = None if roots is None else [Path(r).expanduser().resolve() for r in roots]  # ~: as the gateway
    weights = path / WEIGHTS_FILE
    pickled = None if os.path.lexists(weights) else next((p for f in PICKLE_FILES if (p := path / f).exists()), None)
    if pickled is not None:
        raise AdapterError(
            f"adapter {name!r}: {weights} not found, only {pickled} (a pickle): only safetensors are "
            "loaded, as a pickle runs code when it is read and cannot be checked before; save the adapter "
            "again with PEFT's save_pretrained(dir, safe_serialization=True) (PEFT's default), or convert "
            f"it where torch is installed: {convert_command(pickled, weights)}"
        )
    conf = read_file(name, path / CONFIG_FILE, MAX_CONFIG_BYTES, resolved)
    head = partial(_weights_head, name, weights, None if judge is None else partial(judge, conf))
    return conf, read_file(name, weights, limits.max_file_bytes, resolved, head)


# How a Git LFS pointer file begins (git-lfs's spec, v1)
_LFS = b"version https://git-lfs.github.com/spec/"


def _weights_head(
    name: str, file: Path, judge: Callable[[dict[str, TensorInfo]], None] | None, f: BinaryIO, size: int
) -> None:
    """The safetensors length and header of an open weights file of ``size`` bytes, judged before
    its data is read: the gateway read a whole file (up to max_file_bytes, 4 GiB by default) into
    memory to refuse a header that said on its first bytes that the file was no adapter's."""

    def refuse(why: str) -> AdapterError:
        return AdapterError(f"adapter {name!r}: cannot read {file} ({why})")

    first = f.read(8)
    if first == _LFS[:8] and f.read(len(_LFS) - 8) == _LFS[8:]:  # (safetensors: "header too large")
        raise AdapterError(
            f"adapter {name!r}: {file} is a Git LFS pointer, not the weights (a clone without git-lfs): "
            "fetch them (git lfs pull) and register the adapter again"
        )
    if len(first) < 8:  # safetensors' words for each, as its loader would say them
        raise refuse("header too small")
    (length,) = struct.unpack("<Q", first)
    if length > MAX_HEADER_BYTES:
        raise refuse("header too large")
    if 8 + length > size:
        raise refuse("invalid header length")
    text = f.read(length)
    try:
        header = read_header(text, size - 8 - length)
    except ValueError as e:
        raise refuse(str(e)) from None
    for key, v in header.items():
        if key != "__metadata__" and v["dtype"] not in FLOAT_DTYPES:  # (as adapters words it)
            raise AdapterError(
                f"adapter {name!r}: {file}: tensor {key!r} has dtype {v['dtype']}; "
                f"LoRA weights must be {', '.join(FLOAT_DTYPES)}"
            )
    if judge is not None:
        base = 8 + length
        judge(
            {
                key: TensorInfo(v["dtype"], tuple(v["shape"]), base + v["data_offsets"][0], base + v["data_offsets"][1])
                for key, v in header.items()
                if key != "__metadata__"
            }
        )


def nonnegative_int(value: Any) -> bool:
    """A JSON integer (not a bool) at least 0."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def read_header(text: bytes, data_bytes: int) -> dict[str, Any]:
    """A safetensors header's JSON, checked for what its tensors need of ``data_bytes`` bytes of
    data: ValueError where safetensors' loader refuses it too, so a file it loads is never refused
    here (the loader, on the whole file, still judges the rest: ``safetensors_header``). Each
    tensor's dtype is a string, not yet judged."""
    try:
        header = json.loads(text.decode())
    except UnicodeDecodeError:
        raise ValueError("the header is not UTF-8") from None
    except (ValueError, RecursionError) as e:  # too deep for Python is too deep for serde (128)
        why = "nested too deeply" if isinstance(e, RecursionError) else str(e)
        raise ValueError(f"the header is not JSON ({why})") from None
    if not isinstance(header, dict):
        raise ValueError("the header is not a JSON object")
    bits = {"F32": 32, "F16": 16, "BF16": 16}
    for key, v in header.items():
        if key == "__metadata__":
            continue
        if not isinstance(v, dict) or not {"dtype", "shape", "data_offsets"} <= v.keys():
            raise ValueError(f"tensor {key!r} is not described by a dtype, shape and data_offsets")
        dtype, shape, offsets = v["dtype"], v["shape"], v["data_offsets"]
        if not isinstance(dtype, str) or not isinstance(shape, list) or not all(nonnegative_int(n) for n in shape):
            raise ValueError(f"invalid shape, data type, or offset for tensor {key!r}")
        if not isinstance(offsets, list) or len(offsets) != 2 or not all(nonnegative_int(n) for n in offsets):
            raise ValueError(f"invalid shape, data type, or offset for tensor {key!r}")
        if offsets[1] > data_bytes:
            raise ValueError(f"tensor {key!r}: offsets past the end of the data ({offsets[1]} > {data_bytes} bytes)")
        if dtype in bits and offsets[1] - offsets[0] != math.prod(shape) * bits[dtype] // 8:
            raise ValueError(f"invalid shape, data type, or offset for tensor {key!r}")
    return header


@dataclass(frozen=True)
class TensorInfo:
    """One tensor of a safetensors file, as its header describes it."""

    dtype: str
    shape: tuple[int, ...]
    start: int  # offset of its first byte in the file
    end: int  # one past its last byte

    @property
    def count(self) -> int:
        return math.prod(self.shape)


def safetensors_header(data: bytes) -> dict[str, TensorInfo]:
    """Tensor name -> what the header says of it. The file is first checked by safetensors' own
    loader (``safetensors.deserialize``, what every worker loads it with; no torch), so the gateway
    refuses what a worker would: read by our own rules, files with bytes after the data, two
    tensors at one offset, a number in ``__metadata__``, a key written twice or a lone surrogate
    were registered and then failed every worker's load, each request told the files had changed
    (a helper's finding, then a review's). That loader copies the data once, a registration's
    cost. Raises ValueError if the file is not one; the dtype is returned as written, for the
    caller to judge."""
    try:
        deserialize(data)  # type: ignore[no-untyped-call]
    except SafetensorError as e:
        raise ValueError(str(e).removeprefix("Error while deserializing: ")) from None
    (size,) = struct.unpack("<Q", data[:8])
    base, out = 8 + size, {}
    for key, v in json.loads(data[8:base]).items():
        if key == "__metadata__":
            continue
        dtype, shape, (start, end) = v["dtype"], v["shape"], v["data_offsets"]
        if not isinstance(dtype, str):  # safetensors takes {"F32": null} too: no LoRA weight's
            raise ValueError(f"tensor {key!r}: dtype {dtype!r} is not a name")
        out[key] = TensorInfo(dtype, tuple(shape), base + start, base + end)
    return out


def tensor_values(data: bytes, info: TensorInfo) -> npt.NDArray[np.floating]:
    """A float tensor's values, flat, read from the file's bytes (float32 for bfloat16)."""
    np_dtype = FLOAT_DTYPES[info.dtype]
    values = np.frombuffer(data, dtype=np_dtype, count=info.count, offset=info.start)
    if info.dtype == "BF16":  # bfloat16 is the top half of a float32
        return (values.astype(np.uint32) << 16).view(np.float32)
    return values


def value_problem(data: bytes, info: TensorInfo, limits: AdapterLimits) -> str | None:
    """Why a tensor's values cannot be served (no float dtype, NaN, Inf, above max_abs_weight), or None."""
    if info.dtype not in FLOAT_DTYPES:  # (``read_adapter_files`` refuses it before any data is read)
        return f"has dtype {info.dtype}; LoRA weights must be {', '.join(FLOAT_DTYPES)}"
    if info.count == 0:
        return None
    values = tensor_values(data, info)
    finite = np.isfinite(values)
    if not finite.all():
        bad = values[~finite]
        kinds = [k for k, hit in (("NaN", np.isnan(bad).any()), ("Inf", np.isinf(bad).any())) if hit]
        return f"holds {' and '.join(kinds)} ({bad.size} of {values.size} values)"
    peak = float(np.abs(values).max())
    if peak > limits.max_abs_weight:
        return f"holds a value of magnitude {peak:.3g}, above max_abs_weight={limits.max_abs_weight:g}"
    return None
