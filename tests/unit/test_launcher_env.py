"""What ``dlora up``'s LocalStack gives its services, read without starting any."""

from __future__ import annotations

from pathlib import Path

import pytest

from dlora.services.servers import free_port


def test_an_admin_key_given_in_env_is_the_one_the_gateway_gets(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """``env=`` wins over this process's environment for every setting the launcher reads (the
    key it prints and probes with among them), but the gateway's own DLORA_GATEWAY_ADMIN_KEY was
    passed on from this process's environment alone: given in both, the gateway took another key
    than the one the launcher said."""
    from dlora.services import launcher
    from dlora.services.launcher import LocalStack

    monkeypatch.setenv("DLORA_GATEWAY_ADMIN_KEY", "key-of-the-shell")
    spawned: dict[str, dict[str, str]] = {}

    async def nothing(*_: object) -> set[str]:
        return set()

    monkeypatch.setattr(launcher, "_register", nothing)
    monkeypatch.setattr(launcher, "_ids_in_use", nothing)
    monkeypatch.setattr(launcher, "_wait_ready", lambda *_, **__: None)
    monkeypatch.setattr(LocalStack, "_spawn", lambda self, name, args, env: spawned.__setitem__(name, env))
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
