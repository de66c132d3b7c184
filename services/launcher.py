"""``dlora up``'s stack: the whole of it on one machine, with nothing to set up.

Starts nats-server and redis-server as children unless URLs are configured, makes the tiny demo
model and adapters if no model is given, registers the adapters, starts the dispatcher, N
workers and the gateway as subprocesses (each also runnable alone with ``dlora serve``), starts
a service that fails again as systemd would, and stops everything. The command itself (what it
prints, its signals, its watch over the services) is ``up.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path

import msgspec

from dlora.common.permissions import APP_USER, ROLES
from dlora.common.settings import SettingsError, load, unknown_env
from dlora.common.urls import http_url, redacted
from dlora.model.adapters import parse_lora_args
from dlora.model.config import served_name
from dlora.services.config_file import SERVICES, check_config
from dlora.services.gateway.admin import lora_roots
from dlora.services.gateway.settings import GatewaySettings
from dlora.services.gpus import gpu_of_worker, visible_gpus
from dlora.services.servers import (
    REDIS_USER,
    Server,
    die_with_parent,
    free_port,
    port_is_free,
    start_nats_preferring,
    start_redis,
)
from dlora.services.stack_start import ids_in_use, register_adapters, wait_ready, worker_ids
from dlora.services.stack_stop import StackStop, workers_drain_s
from dlora.services.worker.settings import WorkerSettings

DEMO = Path(".cache/demo")


def _demo() -> tuple[Path, dict[str, str]]:
    from dlora.model.make_tiny import make_tiny

    if not (DEMO / "model" / "config.json").exists():
        make_tiny(DEMO, num_adapters=4)
    # The demo's own (lora-<n>): a folder of other adapters put beside them is not the demo's.
    adapters = sorted(p for p in (DEMO / "adapters").glob("lora-*") if (p / "adapter_config.json").exists())
    return DEMO / "model", {p.name: str(p) for p in adapters}


def configured_model(config: str | None, env: Mapping[str, str] | None = None) -> str | None:
    """The base model the settings (file and environment) name for the gateway and the workers;
    None where they name none. ``dlora up`` passes one model to every service, so without this a
    ``model`` in the file was overridden by the demo model, without a word. SettingsError where
    the two name different ones. ``env``: the environment the services get (None: this process's)."""
    named = set()
    for cls, service in ((GatewaySettings, "gateway"), (WorkerSettings, "worker")):
        with contextlib.suppress(SettingsError):  # none named (a bad value: the full load says)
            named.add(load(cls, service, config, env=env).model)  # type: ignore[attr-defined]
    if len(named) > 1:
        raise SettingsError(
            f"the gateway and the workers name different models ({', '.join(sorted(named))}); dlora up serves one: "
            "name it once, or give --model"
        )
    return next(iter(named), None)


# A worker that ran less than this before it exited, or was started again this often lately, is
# not started again: it would only fail again.
CRASH_LOOP_S = 10.0
MAX_RESTARTS, RESTART_WINDOW_S = 5, 300.0
# Exit codes systemd counts clean (Restart=on-failure does not restart): 0, and ended by these signals.
CLEAN_EXITS = (0, *(-sig for sig in (signal.SIGHUP, signal.SIGINT, signal.SIGTERM, signal.SIGPIPE)))


def on_exit(service: str, code: int) -> str:
    """What ``dlora up`` does when ``service`` exits with ``code``, as systemd's ``Restart=on-failure``
    does for the units: "restart" after a failure (every service is built to be started again: the
    cluster's state is in Redis, a worker's requests go to the others meanwhile); "leave" a worker
    that stopped cleanly (drained on purpose: SIGTERM); "stop" the stack when any other service
    exits cleanly (nothing asked it to). Ended by SIGHUP, SIGINT, SIGTERM or SIGPIPE is a clean
    exit, as systemd counts it: a worker told to stop while its model loads ends so."""
    if code not in CLEAN_EXITS:
        return "restart"
    return "leave" if service.startswith("worker-") else "stop"


def exit_said(code: int) -> str:
    """A child's exit as ``subprocess`` reports it (``returncode``: a negative one is the signal
    that ended it), said as systemd says it: ``code 3``, ``signal SIGKILL`` (a try-out read
    ``code -9`` as a code of the worker's own)."""
    if code < 0:
        with contextlib.suppress(ValueError):
            return f"signal {signal.Signals(-code).name}"
    return f"code {code}"


class LocalStack:
    """The stack as child processes: start() brings it up (raising on failure), stop() takes it
    down, services first. ``dlora up`` and the control-plane benchmark use it."""

    def __init__(
        self,
        workers: int,
        model: str | None,
        lora: list[str],
        port: int | None,
        config: str | None,
        worker_env: dict[str, str] | None = None,
        env: dict[str, str] | None = None,
        migrator: bool = True,
        nats_port: int | None = None,
    ) -> None:
        self.workers, self.model, self.lora, self.config = workers, model, lora, config
        self.nats_port = nats_port  # for the nats-server it starts; None: any free port
        check_config(config, every_service=True)  # what no service reads or takes stops it here
        self.worker_env = worker_env or {}
        self.extra_env = env or {}  # every service's, over this process's
        given = {**os.environ, **self.extra_env}  # as the services read it (a port in env was not waited on)
        self.model = model or configured_model(config, given)  # None: the demo model
        self.base = load(GatewaySettings, "gateway", config, given, {"model": self.model or "x", "port": port})
        self.migrator = migrator
        self.servers: list[Server] = []
        self.procs: list[subprocess.Popen] = []
        self.names: list[str] = []  # each process's service: dispatcher, migrator, worker-<i>, gateway
        self._specs: list[tuple[list[str], dict[str, str], float]] = []  # its command, environment, start
        self._restarts: dict[int, list[float]] = {}  # when each process was started again
        self.up = False  # start() returned: every service ready
        self.stopping: StackStop | None = None
        self.hurried = False  # signalled twice: stop at once
        self.url = http_url(self.base.host, self.base.port)
        # Each service's Prometheus endpoint (docs/metrics.md), by dispatcher, migrator, worker id
        # and gateway.
        self.metrics_urls: dict[str, str] = {}

    def _metrics(self, name: str, service: str) -> dict[str, str]:
        """The environment that serves ``name``'s metrics on a free loopback port of its own, and
        notes the URL: on one host a configured port would be every service's, so it is overridden
        (DLORA_<SERVICE>_*, which comes after the file and DLORA_METRICS_PORT)."""
        port = free_port()
        self.metrics_urls[name] = f"http://127.0.0.1:{port}/metrics"
        prefix = f"DLORA_{service.upper()}_"
        return {f"{prefix}METRICS_PORT": str(port), f"{prefix}METRICS_HOST": "127.0.0.1"}

    def _gpus(self, env: dict[str, str]) -> list[str]:
        """The GPUs to spread the workers over: none when their settings name a device of their own
        (cpu, cuda:1) or are bad (the worker itself then says why, at start)."""
        try:
            device = load(WorkerSettings, "worker", self.config, env=env, overrides={"model": "-"}).engine.device
        except SettingsError:
            return []
        return visible_gpus(env) if device in ("auto", "cuda") else []

    def _spawn(self, name: str, args: list[str], env: dict[str, str]) -> None:
        # Own sessions: Ctrl-C reaches only the launcher, which stops services before servers.
        self.procs.append(subprocess.Popen(args, env=env, start_new_session=True, preexec_fn=die_with_parent()))
        self.names.append(name)
        self._specs.append((args, env, time.monotonic()))

    def exited(self) -> list[tuple[int, str, int]]:
        """(index, service, exit code) of each process that has ended."""
        return [(i, self.names[i], rc) for i, p in enumerate(self.procs) if (rc := p.poll()) is not None]

    def restart(self, i: int) -> bool:
        """Start process ``i`` again as it was started; False (and not restarted) when it ran less
        than ``CRASH_LOOP_S`` or was restarted ``MAX_RESTARTS`` times within ``RESTART_WINDOW_S``
        (it will only fail again: its settings, its model, its memory)."""
        args, env, started = self._specs[i]
        now = time.monotonic()
        recent = [t for t in self._restarts.get(i, []) if now - t < RESTART_WINDOW_S]
        if now - started < CRASH_LOOP_S or len(recent) >= MAX_RESTARTS:
            return False
        name = self.names[i]
        if name in self.metrics_urls and name != "gateway":  # its metrics port may be taken meanwhile
            env = {**env, **self._metrics(name, "worker" if name.startswith("worker-") else name)}
        self.procs[i] = subprocess.Popen(args, env=env, start_new_session=True, preexec_fn=die_with_parent())
        self._specs[i] = (args, env, now)
        self._restarts[i] = [*recent, now]
        return True

    def after_exit(self, i: int, name: str, code: int) -> tuple[str, str]:
        """Handle process ``i`` (``name``) having exited with ``code`` as systemd would its unit:
        start it again after a failure (``restart``), leave out a drained worker, and leave out a
        worker that fails again too soon (a unit at its start limit fails alone: the other workers
        keep serving). Returns what was done ("restarted", "left" or "stop": a service the stack cannot
        do without, the dispatcher, the migrator or the gateway, ended for good) and the line saying
        so."""
        action = on_exit(name, code)
        if action == "leave":
            return "left", f"{name} stopped cleanly (drained); not started again"
        exited = f"{name} exited ({exit_said(code)})"
        if action == "restart" and self.restart(i):
            metrics = f" (metrics {self.metrics_urls[name]})" if name in self.metrics_urls else ""
            return "restarted", f"{exited}; started it again{metrics}"
        if action == "restart" and name.startswith("worker-"):
            alive = sum(n.startswith("worker-") and p.poll() is None for n, p in zip(self.names, self.procs))
            if not alive:  # nothing would serve: the stack stops, saying why, as before
                return "stop", f"{exited} and would only fail again, the last worker; stopping"
            return "left", (
                f"{exited} and would only fail again (it ran under {CRASH_LOOP_S:.0f} s, or "
                f"was started again {MAX_RESTARTS} times in {RESTART_WINDOW_S:.0f} s): left out, "
                f"{alive} worker{'s' * (alive != 1)} still serving"
            )
        return "stop", f"{exited}; stopping everything"

    def start(self) -> None:
        base = self.base
        try:
            socket.getaddrinfo(base.host, base.port, type=socket.SOCK_STREAM)
        except socket.gaierror as e:  # (port_is_free says False for it: "in use", it was said)
            raise SettingsError(f"gateway setting host={base.host!r} does not resolve: {e}") from None
        if not port_is_free(base.port, base.host):  # else another gateway answers the readiness check
            # (`make run` passes no flags: the setting's variable is what its user can give)
            raise RuntimeError(
                f"port {base.port} on {base.host} is in use (another dlora up?): choose another with --port "
                "or the gateway's port setting (DLORA_GATEWAY_PORT=8001 make run)"
            )
        self.nats_url, self.redis_url = base.nats_url, base.redis_url
        # The servers it starts take only the credentials it makes for them: one NATS user per
        # service role and one for applications (common/permissions.py), one Redis ACL user.
        self.nats_passwords: dict[str, str] = {}
        self.role_env: dict[str, dict[str, str]] = {role: {} for role in ROLES}
        if not self.nats_url:
            self.nats_passwords = {name: secrets.token_urlsafe(18) for name in (*ROLES, APP_USER)}
            self.servers.append(start_nats_preferring(self.nats_port, self.nats_passwords, die_with_parent()))
            self.nats_url = self.servers[-1].url
            for role in ROLES:
                self.role_env[role] |= {"DLORA_NATS_USER": role, "DLORA_NATS_PASSWORD": self.nats_passwords[role]}
        redis_env: dict[str, str] = {}
        if not self.redis_url:
            password = secrets.token_urlsafe(18)
            self.servers.append(start_redis(password=password, prefix=base.redis_prefix, preexec=die_with_parent()))
            self.redis_url = self.servers[-1].url
            redis_env = {"DLORA_REDIS_USERNAME": REDIS_USER, "DLORA_REDIS_PASSWORD": password}
        for role in ROLES:
            self.role_env[role] |= redis_env
        self.loras = parse_lora_args(self.lora)
        if self.model is None:
            self.model_dir, demo_loras = _demo()
            self.loras = {**demo_loras, **self.loras}
        else:
            self.model_dir = Path(self.model)
        roots = list(base.adapter_roots) + lora_roots(self.loras.values())
        self.admin_key = base.admin_key or os.environ.get("DLORA_ADMIN_KEY") or secrets.token_hex(12)
        # Made here: printed, the only way to learn it. Given (dlora.toml, the environment): never
        # printed, as vLLM never prints --api-key (the output goes to logs).
        self.admin_key_given = bool(base.admin_key or os.environ.get("DLORA_ADMIN_KEY"))
        as_gateway = self.role_env["gateway"]
        creds = msgspec.structs.replace(
            base,
            nats_url=self.nats_url,
            redis_url=self.redis_url,
            nats_user=as_gateway.get("DLORA_NATS_USER", base.nats_user),
            nats_password=as_gateway.get("DLORA_NATS_PASSWORD", base.nats_password),
            redis_username=as_gateway.get("DLORA_REDIS_USERNAME", base.redis_username),
            redis_password=as_gateway.get("DLORA_REDIS_PASSWORD", base.redis_password),
        )
        served = served_name(self.model_dir, base.served_model_name)
        asyncio.run(register_adapters(creds, self.model_dir, self.loras, roots, served))
        # A Redis given may be another dlora up's, its workers beating: this one's go past them.
        taken = asyncio.run(ids_in_use(creds)) if base.redis_url else set()

        # Each service warned again of a variable no service reads (said once above); one of a
        # service's own form it is left, for that service to refuse.
        scoped = tuple(f"DLORA_{name.upper()}_" for name in SERVICES)
        said = {var for var in unknown_env(os.environ, SERVICES) if not var.startswith(scoped)}
        # The admin key only where it is read: every service's environment had it (a helper's
        # probe of what leaks where: /proc/<pid>/environ of a worker named it).
        keys = ("DLORA_ADMIN_KEY", "DLORA_GATEWAY_ADMIN_KEY")
        given = {**os.environ, **self.extra_env}  # (env='s over this process's, as ``base`` read them)
        admin = {k: v for k, v in given.items() if k in keys} | {"DLORA_ADMIN_KEY": self.admin_key}
        env = {
            **{k: v for k, v in os.environ.items() if k not in said and k not in keys},
            **{k: v for k, v in self.extra_env.items() if k not in keys},  # (under what it settled from them)
            "DLORA_NATS_URL": self.nats_url,
            "DLORA_REDIS_URL": self.redis_url,
            # absolute, its links kept: the services name the model as the launcher says (served_name)
            "DLORA_MODEL": os.path.abspath(self.model_dir),
            # Both spellings: the gateway's own (a user's DLORA_GATEWAY_ADAPTER_ROOTS, read into
            # ``roots`` already) would otherwise win over the merged list and drop the rest.
            "DLORA_ADAPTER_ROOTS": json.dumps(roots),
            "DLORA_GATEWAY_ADAPTER_ROOTS": json.dumps(roots),
            "DLORA_GATEWAY_PORT": str(base.port),
        }
        # empty where none is named (a choice of none): no service warns again of a dlora.toml here
        env["DLORA_CONFIG"] = self.config or env.get("DLORA_CONFIG", "")
        cmd = [sys.executable, "-m", "dlora.services.cli", "serve"]
        roles = self.role_env
        self._spawn(
            "dispatcher",
            [*cmd, "dispatcher"],
            {**env, **roles["dispatcher"], **self._metrics("dispatcher", "dispatcher")},
        )
        if self.migrator:
            self._spawn(
                "migrator", [*cmd, "migrator"], {**env, **roles["migrator"], **self._metrics("migrator", "migrator")}
            )
        gpus = self._gpus({**env, **self.worker_env})
        ids = worker_ids(self.workers, taken)
        for i, name in enumerate(ids):
            worker = {**roles["worker"], **gpu_of_worker(i, gpus), **self.worker_env, **self._metrics(name, "worker")}
            self._spawn(name, [*cmd, "worker"], {**env, **worker, "DLORA_WORKER_ID": name})
        self._spawn("gateway", [*cmd, "gateway"], {**env, **roles["gateway"], **admin})
        self.metrics_urls["gateway"] = f"{self.url}/metrics"
        try:
            own = (lambda: set(ids) <= asyncio.run(ids_in_use(creds))) if taken else None
            wait_ready(self.url, self.workers, self.procs, own=own)
        except BaseException:
            self.stop()  # the services that did start live in their own sessions: stop them here
            raise
        self.up = True

    @property
    def app_nats_url(self) -> str:
        """NATS for applications (loadgen, your own): the URL with the application user's
        credentials when this stack made them (it may read only ``dlora.reply.app.>``)."""
        if APP_USER not in self.nats_passwords:
            return self.nats_url
        return self.nats_url.replace("nats://", f"nats://{APP_USER}:{self.nats_passwords[APP_USER]}@", 1)

    @property
    def redis_login_url(self) -> str:
        """Redis with the credentials this stack made for it (``redis-cli -u`` takes it as it is)."""
        env = self.role_env["gateway"]
        if "DLORA_REDIS_PASSWORD" not in env:
            return self.redis_url
        login = f"{env['DLORA_REDIS_USERNAME']}:{env['DLORA_REDIS_PASSWORD']}@"
        return self.redis_url.replace("redis://", f"redis://{login}", 1)

    def shown_logins(self) -> tuple[str, str]:
        """NATS and Redis as ``dlora up`` prints them: with the credentials this stack made (the
        only way to learn them), a URL it was given without its password (the output goes to
        logs: a given admin key is never printed either)."""
        nats_url = self.app_nats_url if APP_USER in self.nats_passwords else redacted(self.nats_url)
        made_redis = "DLORA_REDIS_PASSWORD" in self.role_env["gateway"]
        return nats_url, self.redis_login_url if made_redis else redacted(self.redis_url)

    def stop(self) -> None:
        """The services in order (``stack_stop``), then NATS and Redis."""
        drain_s = workers_drain_s(self.config, {**self.extra_env, **self.worker_env})
        self.stopping = StackStop(self.procs, self.names, drain_s, self.base.shutdown_timeout_s)
        self.stopping.hurried = self.hurried
        self.stopping.run()
        for s in self.servers:
            s.stop()

    def hurry(self) -> None:
        """A second Ctrl-C or SIGTERM: passed on to the services told to stop (a worker hands its
        requests over at once), or to be when they are."""
        self.hurried = True
        if self.stopping is not None:
            self.stopping.hurry()
