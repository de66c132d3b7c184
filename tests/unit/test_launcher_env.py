"""What ``dlora up``'s LocalStack gives its services, read without starting any."""

from __future__ import annotations

from pathlib import Path

import pytest

from dlora.services.servers import free_port


def _spawned(monkeypatch: pytest.MonkeyPatch) -> dict[str, dict[str, str]]:
    """Each service's environment, by name, as LocalStack would start it (none is started, nothing
    registered or waited for)."""
    from dlora.services import launcher
    from dlora.services.launcher import LocalStack

    spawned: dict[str, dict[str, str]] = {}

    async def nothing(*_: object) -> set[str]:
        return set()

    monkeypatch.setattr(launcher, "register_adapters", nothing)
    monkeypatch.setattr(launcher, "ids_in_use", nothing)
    monkeypatch.setattr(launcher, "wait_ready", lambda *_, **__: None)
    monkeypatch.setattr(LocalStack, "_spawn", lambda self, name, args, env: spawned.__setitem__(name, env))
    return spawned


def test_an_admin_key_given_in_env_is_the_one_the_gateway_gets(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """``env=`` wins over this process's environment for every setting the launcher reads (the
    key it prints and probes with among them), but the gateway's own DLORA_GATEWAY_ADMIN_KEY was
    passed on from this process's environment alone: given in both, the gateway took another key
    than the one the launcher said."""
    from dlora.services.launcher import LocalStack

    monkeypatch.setenv("DLORA_GATEWAY_ADMIN_KEY", "key-of-the-shell")
    spawned = _spawned(monkeypatch)
    env = {
        "DLORA_GATEWAY_ADMIN_KEY": "key-in-env",
        "DLORA_NATS_URL": "nats://127.0.0.1:1",  # (none started: nothing is spawned)
        "DLORA_REDIS_URL": "redis://127.0.0.1:1",
    }
    stack = LocalStack(1, str(tmp_path), [], free_port(), None, env=env, migrator=False)
    stack.start()
    assert stack.admin_key == "key-in-env"
    gateway = spawned["gateway"]
    assert gateway.get("DLORA_GATEWAY_ADMIN_KEY", gateway["DLORA_ADMIN_KEY"]) == "key-in-env", gateway


def test_the_services_dlora_up_starts_do_not_each_warn_of_the_unread_dlora_toml(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """``dlora up`` warns once of a dlora.toml in the working directory that no option names; its
    services, started there with no file named either, each warned again (dispatcher, migrator,
    every worker, the gateway, and again at each restart): one warning printed many times."""
    from dlora.common.settings import unread_config
    from dlora.services.launcher import LocalStack

    (tmp_path / "dlora.toml").write_text("[gateway]\nport = 8001\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("DLORA_CONFIG", raising=False)
    spawned = _spawned(monkeypatch)
    env = {"DLORA_NATS_URL": "nats://127.0.0.1:1", "DLORA_REDIS_URL": "redis://127.0.0.1:1"}
    LocalStack(2, str(tmp_path), [], free_port(), None, env=env, migrator=True).start()
    assert unread_config(None, {}, tmp_path) != []  # dlora up's own warning, once
    assert sorted(spawned) == ["dispatcher", "gateway", "migrator", "worker-0", "worker-1"]
    assert {name: unread_config(None, e, tmp_path) for name, e in spawned.items()} == dict.fromkeys(spawned, [])
    (tmp_path / "other.toml").write_text("")  # one named by $DLORA_CONFIG is still the services' file
    named = {**env, "DLORA_CONFIG": "other.toml"}
    LocalStack(1, str(tmp_path), [], free_port(), None, env=named, migrator=False).start()
    assert spawned["gateway"]["DLORA_CONFIG"] == spawned["worker-0"]["DLORA_CONFIG"] == "other.toml"


def test_an_exit_is_said_by_its_signal_where_a_signal_ended_it() -> None:
    """A try-out: ``dlora up`` said a worker SIGKILLed "exited (code -9)", a code of its own."""
    from dlora.services.launcher import exit_said

    assert (exit_said(-9), exit_said(-15), exit_said(3), exit_said(-200)) == (
        "signal SIGKILL",
        "signal SIGTERM",
        "code 3",
        "code -200",  # (no such signal: the code as it came)
    )
