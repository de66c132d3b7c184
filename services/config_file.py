"""Every service's settings class by its name, and a whole ``dlora.toml`` checked against them
(``common.settings.check_file``): ``dlora serve`` and ``dlora up`` refuse a key or table no
service reads before any service starts."""

from __future__ import annotations

from collections.abc import Mapping

import msgspec

from dlora.common.settings import check_file, config_path, load
from dlora.services.dispatcher.settings import DispatcherSettings
from dlora.services.gateway.settings import GatewaySettings
from dlora.services.migrator.settings import MigratorSettings
from dlora.services.worker.settings import WorkerSettings

SERVICES: dict[str, type[msgspec.Struct]] = {
    "gateway": GatewaySettings,
    "dispatcher": DispatcherSettings,
    "worker": WorkerSettings,
    "migrator": MigratorSettings,
}


def check_config(toml_path: str | None, env: Mapping[str, str] | None = None, every_service: bool = False) -> None:
    """SettingsError for a key or table in the settings file (``toml_path``, else ``$DLORA_CONFIG``)
    that no service reads; with ``every_service`` (``dlora up``, which starts them all with one
    environment), also for a value any service refuses (a misspelt ``[worker.engine]`` key stopped
    only the worker, after the rest had started). Nothing to check without a file."""
    if (path := config_path(toml_path, env)) is None:
        return
    check_file(path, SERVICES)
    for name, cls in SERVICES.items() if every_service else ():  # the model may come later (the command line)
        load(cls, name, path, env, overrides={"model": "-"} if "model" in cls.__struct_fields__ else None)
