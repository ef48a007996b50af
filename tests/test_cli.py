from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ESSP = str(Path(sys.executable).parent / "essp")


def _run(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([ESSP, *args], capture_output=True, text=True, env=env, timeout=120)


def test_infra_status_lists_every_service(base_settings):
    done = _run("infra", "status")
    assert done.returncode == 0, done.stdout + done.stderr
    for name in ("postgres", "redis", "s3", "kafka"):
        assert name in done.stdout
    assert "down" not in done.stdout


def test_stage_runs_and_prints_json(settings):
    env = {**settings.as_env(), "PATH": "/usr/bin:/bin"}
    done = _run("stage", "smoke-redis", "--param", "token=cli", env=env)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["key"] == f"{settings.redis_prefix}:smoke:cli"


def test_unknown_stage_and_bad_params_are_refused_clearly(base_settings):
    done = _run("stage", "no-such-stage")
    assert done.returncode == 2
    assert "unknown stage 'no-such-stage'" in done.stderr and "smoke-kafka" in done.stderr
    done = _run("stage", "smoke-redis", "--params-json", "{broken")
    assert done.returncode != 0 and "--params-json is not JSON" in done.stderr


def test_airflow_trigger_refuses_bad_input_and_names_a_missing_api(base_settings, closed_port):
    import os

    env = {**os.environ, **base_settings.as_env(), "ESSP_AIRFLOW_PORT": str(closed_port)}
    done = _run("airflow", "trigger", "essp_train", "--set", "no-equals-sign", env=env)
    assert done.returncode != 0 and "expected PARAM=VALUE" in done.stdout + done.stderr
    done = _run("airflow", "trigger", "essp_train", "--conf", "{broken", env=env)
    assert done.returncode != 0 and "--conf is not JSON" in done.stdout + done.stderr
    done = _run("airflow", "trigger", "essp_train", "--demo", "--set", "fusion=max", env=env)
    assert done.returncode == 2
    assert f"127.0.0.1:{closed_port} does not answer" in done.stdout and "essp airflow up" in done.stdout
