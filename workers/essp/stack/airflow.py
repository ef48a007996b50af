"""Airflow on the local stack: its environment, its database, and its four processes.

``essp airflow up`` runs api-server, scheduler, dag-processor and triggerer as separate processes
(LocalExecutor, metadata in PostgreSQL), each with the environment built here: AIRFLOW_HOME under
the state folder, the repo's dags/ and plugins/ folders, the login from the settings, and the
``essp_redis`` / ``essp_kafka`` / ``essp_s3`` connections made from the settings.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from essp.connections import connection_env_vars
from essp.errors import EsspError
from essp.settings import Settings, write_private
from essp.stack.procs import ProcessTable
from essp.stack.services import venv_binary

PROCESSES = ("api-server", "scheduler", "dag-processor", "triggerer")
START_TIMEOUT_S = 180.0


class AirflowError(EsspError):
    pass


def metadata_url(settings: Settings) -> str:
    password = f":{settings.pg_password.get_secret_value()}" if settings.pg_password else ""
    return (f"postgresql+psycopg2://{settings.pg_user}{password}@{settings.pg_host}:{settings.pg_port}"
            f"/{settings.pg_database}")


def airflow_env(settings: Settings, *, sql_alchemy_conn: str | None = None,
                home: Path | None = None) -> dict[str, str]:
    """The environment every Airflow process of the local stack runs with."""
    home = home or settings.airflow_home
    home.mkdir(parents=True, exist_ok=True)
    passwords = home / "simple_auth_manager_passwords.json"
    write_private(passwords, json.dumps({settings.airflow_user: settings.secret("airflow_password")}))
    jwt_secret = settings.secret("airflow_jwt_secret")
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("AIRFLOW")},
        **settings.as_env(),
        **connection_env_vars(settings),
        "AIRFLOW_HOME": str(home),
        "AIRFLOW__CORE__DAGS_FOLDER": str(settings.dags_folder),
        "AIRFLOW__CORE__PLUGINS_FOLDER": str(settings.plugins_folder),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__CORE__EXECUTOR": "LocalExecutor",
        "AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION": "False",
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": f"{settings.airflow_user}:admin",
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE": str(passwords),
        "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"{settings.airflow_url}/execution/",
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": sql_alchemy_conn or metadata_url(settings),
        "AIRFLOW__API__HOST": "127.0.0.1",
        "AIRFLOW__API__PORT": str(settings.airflow_port),
        "AIRFLOW__API__BASE_URL": settings.airflow_url,
        "AIRFLOW__API__SECRET_KEY": jwt_secret,
        "AIRFLOW__API_AUTH__JWT_SECRET": jwt_secret,
        "AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL": "30",
        "AIRFLOW__LOGGING__BASE_LOG_FOLDER": str(home / "logs"),
        "AIRFLOW__SCHEDULER__ENABLE_HEALTH_CHECK": "False",
        "PYTHONUNBUFFERED": "1",
    }
    return env


def airflow_cli(settings: Settings, *args: str, env: dict[str, str] | None = None,
                timeout: float = 600) -> subprocess.CompletedProcess:
    """Run `airflow ARGS` with the stack's environment; raise with its output if it fails."""
    env = env or airflow_env(settings)
    done = subprocess.run([venv_binary("airflow"), *args], env=env, capture_output=True, text=True,
                          timeout=timeout)
    if done.returncode != 0:
        out = (done.stdout + done.stderr).strip().splitlines()[-30:]
        raise AirflowError(f"`airflow {' '.join(args)}` exited {done.returncode}:\n" + "\n".join(out))
    return done


def migrate(settings: Settings, env: dict[str, str] | None = None) -> None:
    airflow_cli(settings, "db", "migrate", env=env)


def api_healthy(settings: Settings) -> bool:
    try:
        with urllib.request.urlopen(f"{settings.airflow_url}/api/v2/monitor/health", timeout=3) as r:
            return r.status == 200
    except (urllib.error.URLError, OSError):
        return False


class AirflowStack:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.table = ProcessTable(settings.state_dir)

    @staticmethod
    def _name(process: str) -> str:
        return f"airflow-{process}"

    def status(self) -> dict[str, int | None]:
        out = {}
        for process in PROCESSES:
            record = self.table.record(self._name(process))
            out[process] = record.pid if record else None
        return out

    def up(self) -> dict[str, str]:
        """Migrate the database and start the processes that are not running yet."""
        dags = self.settings.dags_folder
        if dags is None or not (dags / "essp_train.py").is_file():
            raise AirflowError(f"no ESSP DAGs in {dags}: run from the checkout's root, or set ESSP_PROJECT_DIR (the "
                               "folder holding dags/ and plugins/) or ESSP_DAGS_FOLDER")
        env = airflow_env(self.settings)
        migrate(self.settings, env)
        actions = {}
        for process in PROCESSES:
            name = self._name(process)
            if self.table.record(name) is not None:
                actions[process] = "already running"
                continue
            if process == "api-server" and api_healthy(self.settings):
                raise AirflowError(f"port {self.settings.airflow_port} already serves an Airflow API "
                                   "that this state folder did not start; set ESSP_AIRFLOW_PORT")
            self.table.spawn(name, [venv_binary("airflow"), process], env=env,
                             cwd=self.settings.airflow_home)
            actions[process] = "started"
        self._wait_api()
        return actions

    def _wait_api(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        name = self._name("api-server")
        while time.monotonic() < deadline:
            if api_healthy(self.settings):
                return
            if self.table.record(name) is None:
                break
            time.sleep(1)
        raise AirflowError(f"the Airflow API did not answer on {self.settings.airflow_url}; last lines "
                           f"of {self.table.log(name)}:\n{self.table.tail(name)}")

    def down(self) -> list[str]:
        return [p for p in reversed(PROCESSES) if self.table.stop(self._name(p), timeout_s=45)]

    def stop(self, process: str) -> bool:
        """Stop one of the processes (e.g. the triggerer, to restart it with :meth:`up`); False if it was
        not running."""
        if process not in PROCESSES:
            raise AirflowError(f"{process!r} is not one of Airflow's processes ({', '.join(PROCESSES)})")
        return self.table.stop(self._name(process), timeout_s=45)


class AirflowClient:
    """The REST API of a running api-server (`essp airflow up`): log in, trigger a DAG, follow a run."""

    def __init__(self, settings: Settings, timeout_s: float = 30) -> None:
        self.settings = settings
        self.timeout_s = timeout_s
        self._token: str | None = None

    def call(self, method: str, path: str, body: dict | None = None) -> Any:
        headers = {"Content-Type": "application/json"}
        if not path.startswith("/auth/"):
            headers["Authorization"] = f"Bearer {self.token()}"
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(self.settings.airflow_url + path, method=method, data=data, headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                return json.loads(response.read() or b"{}")
        except urllib.error.HTTPError as exc:
            detail = exc.read().decode(errors="replace")
            try:
                detail = json.dumps(json.loads(detail).get("detail", detail))
            except ValueError:
                pass
            raise AirflowError(f"{method} {path}: HTTP {exc.code}: {detail}") from None
        except OSError as exc:
            raise AirflowError(f"the Airflow API at {self.settings.airflow_url} does not answer ({exc}); start it "
                               "with `essp airflow up`") from None

    def token(self) -> str:
        if self._token is None:
            self._token = self.call("POST", "/auth/token", {"username": self.settings.airflow_user,
                                                           "password": self.settings.secret("airflow_password")})[
                "access_token"]
        return self._token

    def wait_for_dag(self, dag_id: str, timeout_s: float = 90) -> None:
        """Until the dag-processor has parsed ``dag_id`` (right after `essp airflow up` it may not have)."""
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                self.call("GET", f"/api/v2/dags/{dag_id}")
                return
            except AirflowError as exc:
                if "HTTP 404" not in str(exc) or time.monotonic() > deadline:
                    raise
            time.sleep(2)

    def trigger(self, dag_id: str, conf: dict[str, Any]) -> dict[str, Any]:
        """A new run of ``dag_id`` with ``conf`` (its params); Airflow refuses params outside their schema."""
        self.wait_for_dag(dag_id)
        return self.call("POST", f"/api/v2/dags/{dag_id}/dagRuns", {"logical_date": None, "conf": conf})

    def run(self, dag_id: str, run_id: str) -> dict[str, Any]:
        from urllib.parse import quote

        return self.call("GET", f"/api/v2/dags/{dag_id}/dagRuns/{quote(run_id, safe='')}")

    def tasks(self, dag_id: str, run_id: str) -> list[dict[str, Any]]:
        from urllib.parse import quote

        return self.call("GET", f"/api/v2/dags/{dag_id}/dagRuns/{quote(run_id, safe='')}/taskInstances")[
            "task_instances"]

    def wait(self, dag_id: str, run_id: str, timeout_s: float = 3600, poll_s: float = 3) -> dict[str, Any]:
        deadline = time.monotonic() + timeout_s
        while True:
            run = self.run(dag_id, run_id)
            if run["state"] in ("success", "failed"):
                return run
            if time.monotonic() > deadline:
                raise AirflowError(f"{dag_id} run {run_id} still {run['state']} after {timeout_s:.0f}s")
            time.sleep(poll_s)
