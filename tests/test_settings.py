from __future__ import annotations

import os
import stat

import pytest
from pydantic import ValidationError

from essp.settings import ENV_PREFIX, LOCAL_SECRETS, MissingSetting, Settings, ensure_local_secrets


def test_env_prefix_overrides_defaults(monkeypatch, tmp_path):
    monkeypatch.setenv("ESSP_STATE_DIR", str(tmp_path))
    monkeypatch.setenv("ESSP_REDIS_PORT", "6390")
    monkeypatch.setenv("ESSP_KAFKA_HOST", "kafka.example")
    s = Settings()
    assert s.redis_port == 6390
    assert s.kafka_bootstrap == "kafka.example:19092"
    assert s.state_dir == tmp_path


def test_credentials_have_no_default_and_the_error_says_how_to_get_them(monkeypatch, tmp_path):
    monkeypatch.setenv("ESSP_STATE_DIR", str(tmp_path))
    for name in LOCAL_SECRETS:
        monkeypatch.delenv(f"{ENV_PREFIX}{name.upper()}", raising=False)
    s = Settings()
    with pytest.raises(MissingSetting, match="ESSP_S3_SECRET_KEY is not set.*essp infra up"):
        s.secret("s3_secret_key")


def test_local_secrets_are_generated_once_private_and_loaded(monkeypatch, tmp_path):
    monkeypatch.setenv("ESSP_STATE_DIR", str(tmp_path))
    for name in LOCAL_SECRETS:
        monkeypatch.delenv(f"{ENV_PREFIX}{name.upper()}", raising=False)
    path = ensure_local_secrets(tmp_path)
    first = path.read_text()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert ensure_local_secrets(tmp_path).read_text() == first  # idempotent
    s = Settings()
    assert s.secret("s3_secret_key") and s.secret("airflow_password")
    assert f"ESSP_S3_SECRET_KEY={s.secret('s3_secret_key')}" in first
    # An environment variable wins over the generated file.
    monkeypatch.setenv("ESSP_S3_SECRET_KEY", "from-env")
    assert Settings().secret("s3_secret_key") == "from-env"


def test_state_dir_given_explicitly_reads_its_own_secrets(tmp_path):
    ensure_local_secrets(tmp_path)
    s = Settings(state_dir=tmp_path)
    assert s.secret("s3_access_key") in (tmp_path / "secrets.env").read_text()


def test_bad_values_are_refused_with_the_variable_named(monkeypatch):
    monkeypatch.setenv("ESSP_REDIS_PORT", "70000")
    with pytest.raises(ValidationError, match="ESSP_REDIS_PORT=70000 is not a TCP port"):
        Settings()
    monkeypatch.setenv("ESSP_REDIS_PORT", "6379")
    monkeypatch.setenv("ESSP_STAGE_MODE", "docker")
    with pytest.raises(ValidationError, match="stage_mode"):
        Settings()


def test_as_env_round_trips(tmp_path):
    s = Settings(state_dir=tmp_path, redis_port=6391, s3_secure=True, topic_prefix="x1")
    env = s.as_env()
    assert env["ESSP_REDIS_PORT"] == "6391" and env["ESSP_S3_SECURE"] == "true"
    rebuilt = Settings(**{k[len(ENV_PREFIX):].lower(): v for k, v in env.items()})
    assert rebuilt.model_dump() == s.model_dump()


def test_secret_files_are_private_from_their_first_byte(monkeypatch, tmp_path):
    """Every byte of a secret is written to a file already 0600 (never written, then chmod-ed), whatever
    the umask, and a stale temporary file with a wider mode is not reused as it is."""
    from essp.settings import write_private

    modes = []
    real_write = os.write

    def spying_write(fd, data):
        modes.append(stat.S_IMODE(os.fstat(fd).st_mode))
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", spying_write)
    old_umask = os.umask(0)
    try:
        stale = tmp_path / f".secrets.env.{os.getpid()}.tmp"
        stale.write_text("old")
        stale.chmod(0o666)
        monkeypatch.setenv("ESSP_STATE_DIR", str(tmp_path))
        for name in LOCAL_SECRETS:
            monkeypatch.delenv(f"{ENV_PREFIX}{name.upper()}", raising=False)
        path = ensure_local_secrets(tmp_path)
        write_private(tmp_path / "passwords.json", '{"admin": "x"}')
    finally:
        os.umask(old_umask)
    assert modes and set(modes) == {0o600}
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "passwords.json").stat().st_mode) == 0o600
    assert (tmp_path / "passwords.json").read_text() == '{"admin": "x"}'
    assert not list(tmp_path.glob(".*.tmp"))
