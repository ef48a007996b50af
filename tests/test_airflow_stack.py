"""`essp airflow up|down` for real: the four processes on PostgreSQL (a database of the test's own),
a run of essp_smoke triggered through the REST API and executed by the scheduler, and a clean stop."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import psycopg2
import pytest
from conftest import free_port_block

from essp.airflow_stack import PROCESSES, AirflowStack, api_healthy
from essp.infra import LocalStack, pg_params
from essp.procs import pid_alive
from essp.settings import SECRETS_FILE, Settings

pytestmark = pytest.mark.slow


@pytest.fixture
def airflow_settings(base_settings, tmp_path):
    shutil.copy(base_settings.state_dir / SECRETS_FILE, tmp_path / SECRETS_FILE)
    settings = Settings(state_dir=tmp_path, airflow_port=free_port_block(1),
                        pg_database=f"essp_test_{uuid.uuid4().hex[:8]}")
    LocalStack(settings).up(["postgres"])  # creates the database
    yield settings
    AirflowStack(settings).down()
    conn = psycopg2.connect(**pg_params(settings, "postgres"))
    conn.autocommit = True
    with conn.cursor() as cur:
        cur.execute(f'DROP DATABASE IF EXISTS "{settings.pg_database}" WITH (FORCE)')
    conn.close()


def _call(settings: Settings, method: str, path: str, body: dict | None = None, token: str | None = None):
    headers = {"Content-Type": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(settings.airflow_url + path, method=method, data=data, headers=headers)
    with urllib.request.urlopen(req, timeout=30) as response:
        return json.loads(response.read() or b"{}")


def test_airflow_up_runs_a_triggered_dag_and_down_stops_every_process(airflow_settings):
    settings = airflow_settings
    stack = AirflowStack(settings)
    assert stack.up() == {p: "started" for p in PROCESSES}
    pids = stack.status()
    assert stack.up() == {p: "already running" for p in PROCESSES}
    assert stack.status() == pids

    token = _call(settings, "POST", "/auth/token",
                  {"username": settings.airflow_user, "password": settings.secret("airflow_password")})["access_token"]
    deadline = time.monotonic() + 120
    while True:  # the dag-processor parses the folder shortly after it starts
        try:
            _call(settings, "GET", "/api/v2/dags/essp_smoke", token=token)
            break
        except urllib.error.HTTPError:
            assert time.monotonic() < deadline, "essp_smoke never appeared in the API"
            time.sleep(2)
    run = _call(settings, "POST", "/api/v2/dags/essp_smoke/dagRuns", {"logical_date": None}, token)
    path = f"/api/v2/dags/essp_smoke/dagRuns/{run['dag_run_id']}"
    deadline = time.monotonic() + 240
    while (state := _call(settings, "GET", path, token=token)["state"]) not in ("success", "failed"):
        assert time.monotonic() < deadline, f"run still {state}"
        time.sleep(2)
    tasks = _call(settings, "GET", path + "/taskInstances", token=token)["task_instances"]
    assert state == "success", {t["task_id"]: t["state"] for t in tasks}
    assert {t["task_id"] for t in tasks} == {"roundtrip_kafka", "roundtrip_redis", "roundtrip_s3", "summary"}

    # `essp airflow down` from another process (the processes rename themselves: PID files still
    # find them) stops all four.
    done = subprocess.run([str(Path(sys.executable).parent / "essp"), "airflow", "down"],
                          env={**os.environ, **settings.as_env()}, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr
    for process in PROCESSES:
        assert process in done.stdout
    deadline = time.monotonic() + 30
    while any(pid_alive(pid) for pid in pids.values() if pid) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not any(pid_alive(pid) for pid in pids.values() if pid)
    assert not api_healthy(settings)
    assert stack.down() == []
