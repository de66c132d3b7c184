"""Typed settings, one object per service, from ``dlora.toml`` and ``DLORA_*`` environment variables.

Precedence (last wins): defaults, the toml file's top-level keys, its ``[service]`` table,
``DLORA_<FIELD>``, ``DLORA_<SERVICE>_<FIELD>``, explicit overrides (command-line flags).
A bad value raises ``SettingsError`` naming the field, the value and where it came from.
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

import msgspec

T = TypeVar("T", bound=msgspec.Struct)


class SettingsError(ValueError):
    """A setting has a bad value; the message names it."""


class Common(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    # NATS server URL; empty: the launcher starts one.
    nats_url: str = ""
    # Redis URL; empty: the launcher starts one.
    redis_url: str = ""
    # Log as JSON lines (services) rather than for a terminal.
    log_json: bool = True
    # Key prefix in Redis, to share one Redis between deployments.
    redis_prefix: str = "dlora"
    # Seconds without a worker's stats after which it is gone, for every service alike: its
    # heartbeat key expires, the dispatcher stops choosing it and recovers its requests, the
    # migrator stops counting it. One value, so they cannot disagree.
    heartbeat_ttl_s: float = 5.0


class GatewaySettings(Common, kw_only=True, forbid_unknown_fields=True):
    host: str = "127.0.0.1"
    port: int = 8000
    # The base model directory (its tokenizer and config check requests; its name is the base "model").
    model: str = ""
    # The name clients use for the base model (vLLM's --served-model-name); empty: the directory's name.
    served_model_name: str = ""
    # Bearer key for POST/DELETE /v1/adapters; empty: adapter admin is refused.
    admin_key: str = ""
    # Adapter directories must lie inside one of these.
    adapter_roots: list[str] = []
    max_body_bytes: int = 1 << 20
    # Seconds without a chunk from the worker (before the first, or between two) after which the
    # request fails with 503 (or an error event on a stream): a worker that died does not hang it.
    chunk_timeout_s: float = 60.0

    def check(self) -> None:
        _require(0 < self.port < 65536, "port", self.port, "must be in 1..65535")
        _require(bool(self.model), "model", self.model, "must name the base model directory")
        _require(self.max_body_bytes > 0, "max_body_bytes", self.max_body_bytes, "must be > 0")


class DispatcherSettings(Common, kw_only=True, forbid_unknown_fields=True):
    # Seconds between recomputing the adapter placement from decayed traffic shares.
    placement_interval_s: float = 5.0
    # "proactive" (dLoRA: soonest estimated finish, placement-aware) or "round-robin" (baseline).
    dispatch: str = "proactive"

    def check(self) -> None:
        _require(self.dispatch in ("proactive", "round-robin"), "dispatch", self.dispatch,
                 "must be 'proactive' or 'round-robin'")


class MigratorSettings(Common, kw_only=True, forbid_unknown_fields=True):
    # Name in the leader lease; unique per migrator process.
    migrator_id: str = "migrator-0"
    # Seconds between looks at the cluster.
    interval_s: float = 1.0
    # Plan when any of these bounds is passed; null (DLORA_..._IMBALANCE=null) turns one off.
    # Queue-delay spread: the most loaded worker's estimated completion time exceeds the mean by
    # this fraction ...
    imbalance: float | None = 0.25
    # ... and by at least this many seconds (also the least gain a plan must bring).
    min_gain_s: float = 0.5
    # Request-count excess: the most loaded worker holds this many requests more than the mean.
    request_excess: int | None = None
    # KV pressure: a worker's requests need more than this fraction of its KV blocks while another
    # worker's need less. Plans also price KV demand above it (as the recompute it will cause).
    kv_pressure: float | None = 0.9
    # Plan only after this many consecutive imbalanced looks, and not within cooldown_s of the
    # last solve (a plan's moves must show in the stats first; an unpaying imbalance is not
    # re-solved every look).
    patience: int = 2
    cooldown_s: float = 3.0
    # Leader lease in Redis: the leader renews it every interval; a standby takes over when it expires.
    lease_s: float = 3.0
    # Solver time bound.
    solve_time_s: float = 1.0
    # Move costs the planner weighs (seconds per token moved; per load for adapters). Recompute and
    # KV transfer: unset, what the workers measured (prefill speed; a shipped cache's export plus the
    # receiver's stall), with a prior until one has; a number fixes the cost (and so the choice).
    recompute_seconds_per_token: float | None = None
    kv_transfer_seconds_per_token: float | None = None
    adapter_load_seconds: float = 0.05

    def check(self) -> None:
        _require(self.imbalance is None or self.imbalance >= 0, "imbalance", self.imbalance, "must be >= 0 or null")
        _require(self.request_excess is None or self.request_excess >= 0, "request_excess", self.request_excess,
                 "must be >= 0 or null")
        _require(self.kv_pressure is None or 0 < self.kv_pressure <= 1, "kv_pressure", self.kv_pressure,
                 "must be a fraction in (0, 1] or null")
        _require(self.solve_time_s > 0, "solve_time_s", self.solve_time_s, "must be > 0")


class WorkerSettings(Common, kw_only=True, forbid_unknown_fields=True):
    worker_id: str = "worker-0"
    model: str = ""
    dtype: str = "float32"
    device: str = "cpu"
    # Compute kernels: auto (Triton on CUDA, torch elsewhere) | torch | triton.
    kernels: str = "auto"
    policy: str = "dlora"
    max_loras: int = 8
    max_num_seqs: int = 64
    kv_cache_bytes: int = 256 << 20
    stats_interval_s: float = 0.5
    # torch intra-op threads; 0: torch's default (all cores). One worker per core wants 1.
    torch_threads: int = 0

    def check(self) -> None:
        _require(bool(self.model), "model", self.model, "must name the base model directory")
        _require(bool(self.worker_id) and "." not in self.worker_id and "*" not in self.worker_id,
                 "worker_id", self.worker_id, "must be non-empty without '.' or '*' (it is a NATS token)")
        _require(self.max_loras >= 1, "max_loras", self.max_loras, "must be >= 1")
        _require(self.kernels in ("auto", "torch", "triton"), "kernels", self.kernels, "must be auto, torch or triton")
        # Refused here, at load, not after the weights are in memory.
        _require(self.policy in ("dlora", "merged-only", "unmerged-only"), "policy", self.policy,
                 "must be dlora, merged-only or unmerged-only")
        _require(self.dtype in ("float32", "bfloat16", "float16"), "dtype", self.dtype,
                 "must be float32, bfloat16 or float16")
        _require(self.stats_interval_s > 0, "stats_interval_s", self.stats_interval_s, "must be > 0")


def _require(ok: bool, field: str, value: Any, why: str) -> None:
    if not ok:
        raise SettingsError(f"setting {field}={value!r} {why}")


def load(
    cls: type[T],
    service: str,
    toml_path: str | Path | None = None,
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> T:
    env = os.environ if env is None else env
    fields = set(cls.__struct_fields__)
    data: dict[str, Any] = {}
    sources: dict[str, str] = {}
    path = Path(toml_path) if toml_path else (Path(env["DLORA_CONFIG"]) if env.get("DLORA_CONFIG") else None)
    if path is not None:
        try:
            doc = tomllib.loads(path.read_text())
        except (OSError, tomllib.TOMLDecodeError) as e:
            raise SettingsError(f"{path}: {e}") from None
        for k, v in doc.items():
            if not isinstance(v, dict) and k in fields:
                data[k], sources[k] = v, str(path)
        for k, v in (doc.get(service) or {}).items():
            data[k], sources[k] = v, f"{path} [{service}]"
    for field in sorted(fields):
        for name in (f"DLORA_{field.upper()}", f"DLORA_{service.upper()}_{field.upper()}"):
            if name in env:
                data[field], sources[field] = _from_env(env[name]), name
    for k, v in (overrides or {}).items():
        if v is not None:
            data[k], sources[k] = v, "command line"
    try:
        settings = msgspec.convert(data, cls, strict=False)
    except msgspec.ValidationError as e:
        field = str(e).rsplit("$.", 1)[-1].split("`")[0].split("[")[0] if "$." in str(e) else ""
        where = f" (from {sources[field]})" if field in sources else ""
        raise SettingsError(f"{service} settings: {e}{where}") from None
    check = getattr(settings, "check", None)
    if check is not None:
        check()
    return settings


def _from_env(value: str) -> Any:
    # Lists and objects come as JSON; everything else as a string msgspec converts (strict=False).
    if value.startswith(("[", "{")):
        try:
            return msgspec.json.decode(value)
        except msgspec.DecodeError:
            pass
    return value
