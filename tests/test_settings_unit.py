"""Settings parsing: defaults, then a file, then EVC_* variables, then keyword overrides; typed
coercion and the errors a bad value or an unknown name gives (pure: no services)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from evc.errors import ConfigError
from evc.settings import Settings, load_settings, settings_env


def test_defaults_without_file_or_environment() -> None:
    s = load_settings(env={})
    assert s == Settings()
    assert s.api_url == "http://127.0.0.1:8080"
    assert s.key_path == s.data_dir / "ssh" / "id_ed25519"


def test_environment_values_are_coerced_to_the_field_types(tmp_path: Path) -> None:
    s = load_settings(
        env={
            "EVC_SSH_RETRIES": "5",
            "EVC_JOB_LEASE_S": "12.5",
            "EVC_DATA_DIR": "~/evc-data",
            "EVC_PUBLIC_URL": "https://evc.example/",
            "OTHER": "ignored",
        }
    )
    assert s.ssh_retries == 5 and isinstance(s.ssh_retries, int)
    assert s.job_lease_s == 12.5
    assert s.data_dir == Path("~/evc-data").expanduser()
    assert s.api_url == "https://evc.example"  # no trailing slash


def test_file_then_environment_then_overrides(tmp_path: Path) -> None:
    f = tmp_path / "evc.json"
    f.write_text(json.dumps({"ssh_retries": 7, "ansible_forks": 3, "key_prefix": "file"}))
    env = {"EVC_CONFIG": str(f), "EVC_ANSIBLE_FORKS": "9", "EVC_KEY_PREFIX": "env"}
    s = load_settings(env=env, key_prefix="kw")
    assert (s.ssh_retries, s.ansible_forks, s.key_prefix) == (7, 9, "kw")
    assert load_settings(f, env={}).ansible_forks == 3  # a file given directly


def test_toml_files(tmp_path: Path) -> None:
    f = tmp_path / "evc.toml"
    f.write_text('redis_url = "redis://r:6379/2"\nhealth_interval_s = 30\n')
    s = load_settings(f, env={})
    assert s.redis_url == "redis://r:6379/2" and s.health_interval_s == 30.0


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"EVC_SSH_RETRIES": "many"}, "setting ssh_retries: cannot read 'many' as int"),
        ({"EVC_JOB_LEASE_S": "soon"}, "setting job_lease_s: cannot read 'soon' as float"),
    ],
)
def test_bad_values_say_which_setting(env: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_settings(env=env)


def test_unknown_names_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="unknown settings: bogus, other"):
        load_settings(env={}, bogus=1, other=2)
    f = tmp_path / "evc.json"
    f.write_text(json.dumps({"redis_ulr": "x"}))
    with pytest.raises(ConfigError, match="unknown settings: redis_ulr"):
        load_settings(f, env={})


def test_bad_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read settings file"):
        load_settings(tmp_path / "missing.json", env={})
    f = tmp_path / "list.json"
    f.write_text("[1, 2]")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        load_settings(f, env={})


def test_settings_env_reproduces_the_settings_in_a_child(tmp_path: Path) -> None:
    s = load_settings(env={}, data_dir=tmp_path, ssh_retries=4, job_lease_s=7.5, redis_url="redis://x/1")
    env = settings_env(s)
    assert env["EVC_SSH_RETRIES"] == "4" and env["EVC_DATA_DIR"] == str(tmp_path)
    assert load_settings(env=env) == s


def test_replace_and_extra_playbook_dirs(tmp_path: Path) -> None:
    s = load_settings(env={}).replace(playbook_dirs=f"{tmp_path / 'a'}:{tmp_path / 'b'}:")
    assert s.extra_playbook_dirs() == [tmp_path / "a", tmp_path / "b"]
    with pytest.raises(Exception):  # noqa: B017 - frozen
        s.ssh_retries = 1  # type: ignore[misc]
