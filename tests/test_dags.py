"""The DAG folder, loaded and run by Airflow itself (a SQLite metadata DB of the test's own)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from essp.stack.airflow import airflow_env

pytestmark = pytest.mark.slow

RUN_DAG = r"""
import json, sys
from airflow.dag_processing.dagbag import DagBag
from airflow.utils.state import DagRunState

bag = DagBag(dag_folder=sys.argv[1])
out = {"dags": sorted(bag.dag_ids), "import_errors": {k: str(v) for k, v in bag.import_errors.items()}}
if len(sys.argv) > 2:
    run = bag.get_dag(sys.argv[2]).test()
    out["state"] = str(run.state)
    from airflow.models.taskinstance import TaskInstance
    from airflow.utils.session import create_session
    with create_session() as session:
        tis = session.query(TaskInstance).filter_by(dag_id=run.dag_id, run_id=run.run_id).all()
        out["tasks"] = {ti.task_id: str(ti.state) for ti in tis}
print("RESULT " + json.dumps(out))
"""


@pytest.fixture(scope="module")
def sqlite_airflow(base_settings, tmp_path_factory):
    home = tmp_path_factory.mktemp("airflow")
    env = airflow_env(base_settings, sql_alchemy_conn=f"sqlite:///{home}/airflow.db", home=home)
    done = subprocess.run([sys.executable, "-m", "airflow", "db", "migrate"], env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return env


def _airflow_python(env: dict, *args: str, timeout: int = 600) -> dict:
    done = subprocess.run([sys.executable, "-c", RUN_DAG, *args], env=env, capture_output=True,
                          text=True, timeout=timeout)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    assert lines, done.stdout[-3000:] + done.stderr[-3000:]
    return json.loads(lines[-1][len("RESULT "):])


def test_dag_folder_imports_without_errors(sqlite_airflow, base_settings):
    result = _airflow_python(sqlite_airflow, str(base_settings.dags_folder))
    assert result["import_errors"] == {}
    assert "essp_smoke" in result["dags"]


def test_essp_smoke_runs_end_to_end_through_the_stage_operator(sqlite_airflow, base_settings):
    result = _airflow_python(sqlite_airflow, str(base_settings.dags_folder), "essp_smoke")
    assert result["state"] == "success", result
    assert result["tasks"] == {"smoke_kafka": "success", "smoke_redis": "success",
                               "smoke_s3": "success", "summary": "success"}


def test_essp_smoke_fails_when_a_service_is_down(sqlite_airflow, base_settings, closed_port):
    broken = base_settings.model_copy(update={"s3_port": closed_port})
    env = {**sqlite_airflow, **airflow_env(broken, sql_alchemy_conn=sqlite_airflow[
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"], home=base_settings.state_dir / "unused-airflow-home")}
    env["AIRFLOW_HOME"] = sqlite_airflow["AIRFLOW_HOME"]
    result = _airflow_python(env, str(base_settings.dags_folder), "essp_smoke")
    assert result["state"] == "failed"
    assert result["tasks"]["smoke_s3"] == "failed"
    assert result["tasks"]["smoke_redis"] == "success"
