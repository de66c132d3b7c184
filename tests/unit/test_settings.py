from pathlib import Path

import pytest

from dlora.common.settings import GatewaySettings, MigratorSettings, SettingsError, WorkerSettings, load


def test_precedence_defaults_toml_env_overrides(tmp_path: Path) -> None:
    toml = tmp_path / "dlora.toml"
    toml.write_text('model = "/m"\nnats_url = "nats://a"\n[worker]\nmax_loras = 3\npolicy = "merged-only"\n')
    env = {"DLORA_NATS_URL": "nats://b", "DLORA_WORKER_POLICY": "unmerged-only", "DLORA_GATEWAY_PORT": "1"}
    s = load(WorkerSettings, "worker", toml, env=env, overrides={"worker_id": "w7", "max_loras": None})
    assert (s.model, s.nats_url, s.max_loras, s.policy, s.worker_id) == ("/m", "nats://b", 3, "unmerged-only", "w7")
    assert s.stats_interval_s == 0.5  # default


def test_lists_come_from_json_in_env() -> None:
    s = load(GatewaySettings, "gateway", env={"DLORA_MODEL": "/m", "DLORA_ADAPTER_ROOTS": '["/a", "/b"]'})
    assert s.adapter_roots == ["/a", "/b"]


@pytest.mark.parametrize(
    "env,fragment",
    [
        ({"DLORA_MODEL": "/m", "DLORA_WORKER_MAX_LORAS": "four"}, "max_loras"),
        ({"DLORA_MODEL": "/m", "DLORA_WORKER_MAX_LORAS": "0"}, "max_loras=0"),
        ({"DLORA_MODEL": "/m", "DLORA_WORKER_ID": "a.b"}, "worker_id"),
        ({"DLORA_MODEL": "/m", "DLORA_WORKER_POLICY": "dLoRA"}, "policy='dLoRA'"),
        ({"DLORA_MODEL": "/m", "DLORA_WORKER_DTYPE": "fp8"}, "dtype='fp8'"),
        ({}, "model"),
    ],
)
def test_bad_values_name_the_setting(env: dict, fragment: str) -> None:
    with pytest.raises(SettingsError, match=fragment):
        load(WorkerSettings, "worker", env=env)


def test_unknown_keys_in_toml_are_refused(tmp_path: Path) -> None:
    toml = tmp_path / "dlora.toml"
    toml.write_text('[gateway]\nmodel = "/m"\nprot = 80\n')
    with pytest.raises(SettingsError, match="prot"):
        load(GatewaySettings, "gateway", toml, env={})
    toml.write_text("[gateway\n")
    with pytest.raises(SettingsError, match=str(toml)):
        load(GatewaySettings, "gateway", toml, env={})


@pytest.mark.parametrize("env,fragment", [({"DLORA_KV_PRESSURE": "1.5"}, "kv_pressure=1.5"),
                                          ({"DLORA_REQUEST_EXCESS": "-1"}, "request_excess=-1"),
                                          ({"DLORA_IMBALANCE": "-0.1"}, "imbalance")])
def test_bad_migrator_bounds_name_the_setting(env: dict, fragment: str) -> None:
    with pytest.raises(SettingsError, match=fragment):
        load(MigratorSettings, "migrator", env=env)


def test_a_migrator_bound_is_turned_off_by_null() -> None:
    s = load(MigratorSettings, "migrator", env={"DLORA_MIGRATOR_KV_PRESSURE": "null", "DLORA_REQUEST_EXCESS": "4"})
    assert s.kv_pressure is None and s.request_excess == 4
