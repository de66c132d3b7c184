"""Typed settings, one object per service, from ``dlora.toml`` and ``DLORA_*`` environment variables.

Each service declares its settings next to its code (``services/<name>/settings.py``), nesting the
config types its pure cores own (the worker's ``[worker.engine]`` is the engine's ``EngineConfig``)
instead of copying their fields. This module holds what they share: the fields every service
reads (``Common``) and the loader.

Precedence (last wins): defaults, the toml file's top-level keys, its ``[service]`` table (nested
tables such as ``[worker.engine.policy]`` included), ``DLORA_<FIELD>``,
``DLORA_<SERVICE>_<FIELD>``, explicit overrides (command-line flags). A nested field's variable
joins the path with a double underscore: ``DLORA_WORKER_ENGINE__MAX_LORAS``. A bad value raises
``SettingsError`` naming the field, the value and where it came from. ``deploy/dlora.example.toml``
lists every setting with its default.
"""

from __future__ import annotations

import difflib
import math
import os
import re
import tomllib
import typing
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, TypeVar

import msgspec

from dlora.common.log import LEVELS as LOG_LEVELS
from dlora.common.urls import SENTINEL_SCHEME, parse_sentinel_url, redacted

T = TypeVar("T", bound=msgspec.Struct)

# What a settings object's ``check`` returns: (dotted field, value, why), one per problem.
Problems = list[tuple[str, object, str]]


class SettingsError(ValueError):
    """A setting has a bad value; the message names it, its value and its source."""


class Common(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    # NATS server URL, or several comma-separated (the seeds of a cluster: the client fails over
    # between its nodes); empty: the launcher starts one.
    nats_url: str = ""
    # Redis URL: redis://host:port/db, or redis+sentinel://host:26379,host:26379/service[/db] to
    # follow the primary the Sentinels name through a failover; empty: the launcher starts one.
    redis_url: str = ""
    # Copies of each JetStream key-value bucket (the adapter registry's and the API keys' durable
    # copy) across a NATS cluster: 3 on a three-node cluster survives one node; at most the
    # number of nodes (JetStream refuses more).
    nats_kv_replicas: int = 1
    # NATS user and password of this service (common/permissions.py: one user per role, each
    # allowed only its own subjects); empty: connect without (a server without authorization).
    nats_user: str = ""
    nats_password: str = ""
    # Redis ACL user and password; empty: Redis's default user.
    redis_username: str = ""
    redis_password: str = ""
    # Log as JSON lines (services) rather than for a terminal.
    log_json: bool = True
    # The least severe records written: debug, info, warning, error or critical, in any case
    # (vLLM's VLLM_LOGGING_LEVEL).
    log_level: str = "info"
    # Key prefix in Redis, to share one Redis between deployments.
    redis_prefix: str = "dlora"
    # Seconds without a worker's stats after which it is gone, for every service alike: its
    # heartbeat key expires, the dispatcher stops choosing it and recovers its requests, the
    # migrator stops counting it. One value, so they cannot disagree. A gateway's background
    # responses hold leases of three times this (``gateway/responses_lease.py``).
    heartbeat_ttl_s: float = 5.0
    # Redis connections this process keeps at most (redis-py's pool); a burst beyond it waits up to
    # redis_pool_timeout_s for one to come free instead of failing.
    redis_max_connections: int = 64
    redis_pool_timeout_s: float = 10.0
    # Prometheus metrics of the dispatcher, the migrator and each worker: GET /metrics on this
    # port (0: not served); the gateway serves its own on its API port. docs/metrics.md lists them.
    metrics_port: int = 0
    metrics_host: str = "0.0.0.0"
    # CPU seconds a structured output's grammar may take to compile, at the gateway and at each
    # worker, before its request is refused as too complex (a 400 naming the field); 0: no bound.
    # vLLM's VLLM_GRAMMAR_COMPILATION_TIMEOUT_S. One value, so a schema the gateway took no worker
    # refuses (a 400 KB schema takes 0.3-0.5 s; 1,000 patternProperties take hours).
    grammar_compilation_timeout_s: float = 10.0
    # MiB of memory a grammar's compile under that bound may take, above what its process holds
    # when it starts (the tokenizer, the compile thread's stack sized to the constraint: a 350 KB
    # schema's compile takes under 128 MiB), before its request is refused as too large (a 400 naming
    # the field); 0: no cap. A schema whose compile takes all it can reach otherwise ends at the
    # host's OOM killer (vLLM #7332). Each compile's own: a worker runs up to half its cores (8 at
    # most) at once, the gateway 4, so a host's worst case is that many times this.
    grammar_compilation_memory_mb: int = 4096

    def check(self) -> Problems:
        """Problems with the values; the loader refuses settings that have any."""
        positive = ("heartbeat_ttl_s", "redis_max_connections", "redis_pool_timeout_s")
        problems = [(f, getattr(self, f), "must be > 0") for f in positive if not getattr(self, f) > 0]
        if not self.grammar_compilation_timeout_s >= 0:
            problems.append(("grammar_compilation_timeout_s", self.grammar_compilation_timeout_s, "must be >= 0"))
        if not self.grammar_compilation_memory_mb >= 0:
            problems.append(("grammar_compilation_memory_mb", self.grammar_compilation_memory_mb, "must be >= 0"))
        if not 0 <= self.metrics_port <= 65535:
            problems.append(("metrics_port", self.metrics_port, "must be a TCP port, or 0 for none"))
        if self.log_level.lower() not in LOG_LEVELS:
            problems.append(("log_level", self.log_level, f"must be one of {', '.join(LOG_LEVELS)}"))
        if not 1 <= self.nats_kv_replicas <= 5:
            problems.append(("nats_kv_replicas", self.nats_kv_replicas, "must be 1 to 5 (JetStream's limit)"))
        if self.redis_url.startswith(f"{SENTINEL_SCHEME}://"):
            try:
                parse_sentinel_url(self.redis_url)
            except ValueError as e:
                problems.append(("redis_url", redacted(self.redis_url), str(e)))
        return problems


def nested_problems(prefix: str, problems: Problems) -> Problems:
    """A nested config's problems with their fields under ``prefix`` (``engine.max_loras``)."""
    return [(f"{prefix}.{field}", value, why) for field, value, why in problems]


def field_paths(cls: type[msgspec.Struct], prefix: str = "") -> Iterator[str]:
    """Every settable field of ``cls`` as a dotted path, nested structs walked (``engine.policy.name``)."""
    hints = typing.get_type_hints(cls)
    for name in cls.__struct_fields__:
        hint = hints[name]
        if isinstance(hint, type) and issubclass(hint, msgspec.Struct):
            yield from field_paths(hint, f"{prefix}{name}.")
        else:
            yield f"{prefix}{name}"


def load(
    cls: type[T],
    service: str,
    toml_path: str | Path | None = None,
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> T:
    """``cls`` from defaults, the toml file (``toml_path``, else ``$DLORA_CONFIG``), the environment
    and ``overrides`` (dotted paths to values; None values are skipped). SettingsError on an
    unreadable file, an unknown key, a value of the wrong type or one its ``check`` refuses."""
    env = os.environ if env is None else env
    paths = set(field_paths(cls))
    data: dict[str, Any] = {}
    sources: dict[str, str] = {}

    def put(path: str, value: Any, source: str) -> None:
        *parents, leaf = path.split(".")
        node = data
        for p in parents:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise SettingsError(f"{service} setting {path}: {source} sets it under a value that is not a table")
        node[leaf] = value
        sources[path] = source

    def put_table(table: Mapping[str, Any], prefix: str, source: str) -> None:
        for k, v in table.items():
            if isinstance(v, dict):
                put_table(v, f"{prefix}{k}.", f"{source[:-1]}.{k}]")
            else:
                put(prefix + k, v, source)

    path = config_path(toml_path, env)
    if path is not None:
        doc = _read(path)
        for k, v in doc.items():  # top-level keys are shared; tables are the services'
            if not isinstance(v, dict) and k in paths:
                put(k, v, str(path))
        put_table(doc.get(service) or {}, "", f"{path} [{service}]")
    for field in sorted(paths):
        var = field.upper().replace(".", "__")
        for name in (f"DLORA_{var}", f"DLORA_{service.upper()}_{var}"):
            if name in env:
                put(field, _from_env(env[name]), name)
    _refuse_unknown_env(env, service, paths)
    for k, v in (overrides or {}).items():
        if v is not None:
            put(k, v, "command line")
    try:
        settings = msgspec.convert(data, cls, strict=False)
    except msgspec.ValidationError as e:
        raise SettingsError(_explain(service, str(e), data, sources, paths)) from None
    if path is not None:
        _refuse_quoted_numbers(service, settings, data, sources, str(path))
    if problems := [*_not_finite(settings), *settings.check()]:  # type: ignore[attr-defined]
        field, value, why = problems[0]
        where = f" (from {sources[field]})" if field in sources else ""
        raise SettingsError(f"{service} setting {field}={value!r} {why}{where}")
    return settings


# Settings whose infinity means "no bound" (AdapterLimits'), the only ones an infinity may be; any
# other number past _LARGEST means nothing either (a TTL of 1e300 s: Redis refused its milliseconds,
# and a worker retried its first heartbeat for ever, blaming Redis).
_UNBOUNDED_OK = {"max_abs_weight", "max_scale"}
_LARGEST = 1e12


def _not_finite(settings: msgspec.Struct, prefix: str = "") -> Problems:
    """Every number of ``settings`` (nested structs walked) that is NaN, or infinite where an
    infinity means nothing: each ``check`` compares with ``<=``, false for NaN, and a NaN lease
    or an infinite heartbeat TTL crashed a service after it said it was ready."""
    problems: Problems = []
    for name in settings.__struct_fields__:
        value = getattr(settings, name)
        if isinstance(value, msgspec.Struct):
            problems += _not_finite(value, f"{prefix}{name}.")
        elif isinstance(value, float) and (math.isnan(value) or math.isinf(value) and name not in _UNBOUNDED_OK):
            problems.append((prefix + name, value, "must be a finite number"))
        elif isinstance(value, float) and math.isfinite(value) and abs(value) > _LARGEST:
            problems.append((prefix + name, value, f"must be at most {_LARGEST:g} in magnitude"))
    return problems


def config_path(toml_path: str | Path | None, env: Mapping[str, str] | None = None) -> Path | None:
    """The toml file settings come from: ``toml_path``, else ``$DLORA_CONFIG``, else none."""
    env = os.environ if env is None else env
    return Path(toml_path) if toml_path else (Path(env["DLORA_CONFIG"]) if env.get("DLORA_CONFIG") else None)


def unread_config(
    toml_path: str | Path | None, env: Mapping[str, str] | None = None, cwd: Path | None = None
) -> list[str]:
    """The warning, if any, where a ``dlora.toml`` lies in the working directory but no settings file is
    chosen (``config_path`` is None): it is not read. A new user who wrote one there, as the
    README's "settings come from dlora.toml" invited, got the defaults without a word (its
    `[gateway] port` ignored, the gateway on 8000; a user's trial). ``$DLORA_CONFIG`` set empty
    chooses none on purpose: ``dlora up`` gives its services that, having warned once itself."""
    env = os.environ if env is None else env
    here = (cwd or Path.cwd()) / "dlora.toml"
    if config_path(toml_path, env) is not None or "DLORA_CONFIG" in env or not here.is_file():
        return []
    return [f"{here} is not read: name it with --config dlora.toml or DLORA_CONFIG=dlora.toml"]


def _read(path: Path) -> dict[str, Any]:
    try:
        return tomllib.loads(path.read_text(encoding="utf-8-sig"))  # a BOM (Notepad's UTF-8) read past
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise SettingsError(f"{path}: {e}") from None
    except UnicodeDecodeError as e:  # TOML is UTF-8 (its spec): say which file and where
        raise SettingsError(f"{path}: not UTF-8 text (byte 0x{e.object[e.start]:02x} at offset {e.start})") from None


def _refuse_quoted_numbers(
    service: str, settings: msgspec.Struct, data: dict[str, Any], sources: dict[str, str], toml: str
) -> None:
    """SettingsError for a number or boolean the toml file gives as a string (``max_loras = "8"``):
    TOML has types, so the file means text there; only the environment's values come as text and
    are converted (``strict=False`` is for them)."""
    for dotted, source in sources.items():
        if not source.startswith(toml):
            continue
        raw: Any = data
        value: Any = settings
        for part in dotted.split("."):
            raw, value = raw[part], getattr(value, part)
        if isinstance(raw, str) and isinstance(value, int | float) and not isinstance(value, str):
            kind = "a boolean" if isinstance(value, bool) else "a number"
            raise SettingsError(f"{service} setting {dotted}={raw!r} must be {kind}, not a string (from {source})")


def check_file(path: Path, services: Mapping[str, type[msgspec.Struct]]) -> None:
    """SettingsError for what in the toml file at ``path`` no service reads: a top-level key that
    is none of ``services``' fields, a table named after none of them. Each service reads only its
    own table and the top-level keys it has, so such a typo (``heartbeat_tll_s``, ``[workerr]``)
    would otherwise be ignored without a word; within a service's table ``load`` refuses it."""
    fields = {f for cls in services.values() for f in cls.__struct_fields__}
    for k, v in _read(path).items():
        if isinstance(v, dict) and k not in services:
            raise SettingsError(
                f"{path}: [{k}] is no service's table (they are {', '.join(f'[{s}]' for s in services)})"
            )
        if not isinstance(v, dict) and k not in fields:
            raise SettingsError(
                f"{path}: {k} (top level) is no service's setting; deploy/dlora.example.toml lists every setting"
            )


# DLORA_ variables that are no service's setting: the file's path, and deploy's NATS server side
# (deploy/nats: its node name and each user's password, DLORA_NATS_<USER>_PASSWORD).
_NOT_SETTINGS = re.compile(r"DLORA_(CONFIG|NATS_NODE|TEST_DEVICE|NATS_[A-Z]+_PASSWORD)")


def unknown_env(env: Mapping[str, str], services: Mapping[str, type[msgspec.Struct]]) -> dict[str, str]:
    """The ``DLORA_*`` variables of ``env`` that no service reads, each with the setting it most
    looks like: the shared form (``DLORA_HEARTBEAT_TLL_S``) cannot be refused by one service (another
    may read it), so a typo there was ignored without a word; vLLM warns of its own likewise."""
    known = {
        f"DLORA_{scope}{path.upper().replace('.', '__')}"
        for name, cls in services.items()
        for path in field_paths(cls)
        for scope in ("", f"{name.upper()}_")
    }
    said = {}
    for var in sorted(env):
        if var.startswith("DLORA_") and var not in known and not _NOT_SETTINGS.fullmatch(var):
            # one of that very setting name elsewhere first (..._ENGINE__MAX_LORA_RANK, vLLM's name,
            # is ..._ENGINE__ADAPTER_LIMITS__MAX_LORA_RANK), else the nearest spelling
            leaf = var.rsplit("__", 1)[-1] if "__" in var else None
            near = sorted(k for k in known if leaf and k.endswith(f"__{leaf}") and k.startswith(var.split("__")[0]))
            near = near or difflib.get_close_matches(var, known, n=1)
            said[var] = f"{var} names no setting of any service" + (f" (did you mean {near[0]}?)" if near else "")
    return said


def _refuse_unknown_env(env: Mapping[str, str], service: str, paths: set[str]) -> None:
    # A misspelt or outdated DLORA_<SERVICE>_... variable would be ignored without a word; the
    # shared form DLORA_<FIELD> cannot be checked here (another service may read it).
    prefix = f"DLORA_{service.upper()}_"
    known = {f"DLORA_{p.upper().replace('.', '__')}" for p in paths}
    for name in env:
        if (
            name.startswith(prefix)
            and name not in known
            and name[len(prefix) :].lower().replace("__", ".") not in paths
        ):
            raise SettingsError(
                f"{service} settings: {name} names no setting (nested fields join with '__', "
                f"e.g. DLORA_WORKER_ENGINE__MAX_LORAS; see deploy/dlora.example.toml)"
            )


def _explain(service: str, error: str, data: dict[str, Any], sources: dict[str, str], paths: set[str]) -> str:
    """msgspec's message (``... - at `$.engine.dtype```) with the field's value and source; for an
    unknown field, the setting of ``paths`` (the service's) it most looks like."""
    unknown = re.match(r"Object contains unknown field `([^`]+)`(?: - at `\$\.?([^`]*)`)?", error)
    if unknown:  # a misspelling, or a setting of an earlier layout: where it came from, and the map
        field = ".".join(p for p in (unknown[2] or "", unknown[1]) if p)
        where = f" (from {sources[field]})" if field in sources else ""
        # one of that very name elsewhere first (engine.max_lora_rank, vLLM's, was taken for
        # engine.max_loras: it is engine.adapter_limits.max_lora_rank)
        like = (
            sorted(p for p in paths if p.rsplit(".", 1)[-1] == unknown[1])
            or difflib.get_close_matches(field, sorted(paths), n=1)
            or difflib.get_close_matches(unknown[1], sorted(paths), n=1, cutoff=0.8)
        )
        return (
            f"{service} setting {field} does not exist{where}"
            + (f"; did you mean {like[0]}?" if like else "")
            + " (nested tables hold the engine's, policy's, trigger's and dispatch costs' settings: "
            "[worker.engine], [worker.engine.policy], [migrator.trigger], [dispatcher.costs]; "
            "deploy/dlora.example.toml lists every setting)"
        )
    if "$." not in error:
        return f"{service} settings: {error}"
    field = error.rsplit("$.", 1)[-1].split("`")[0].split("[")[0]
    value: Any = data
    for part in field.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    where = f" (from {sources[field]})" if field in sources else ""
    return f"{service} setting {field}={value!r}: {error}{where}"


def _from_env(value: str) -> Any:
    # Lists and objects come as JSON; everything else as a string msgspec converts (strict=False).
    if value.startswith(("[", "{")):
        try:
            return msgspec.json.decode(value)
        except msgspec.DecodeError:
            pass
    return value
