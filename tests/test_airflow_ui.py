"""A real Airflow on PostgreSQL (`essp airflow up|down`: the four processes, started once, stopped by
PID from another process) with the ESSP plugin: the api-server loads it from the repo's plugins/
folder, lists it in the REST API, serves the report pages under /essp, and headless Chromium renders
one (the screenshot is kept as documentation: docs/img/ui-report.png); and essp_train triggered
through the REST API with a param override, run by the scheduler, its report tab screenshotted.

The module-scoped ``airflow_ui`` fixture (the four Airflow processes on a database of their own, with
isolated buckets and prefixes, and a token helper) is meant to be shared by further tests of this
module, e.g. an ``essp_train`` run triggered through the REST API."""

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
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import psycopg2
import pytest
from conftest import _cleanup, free_port_block
from PIL import Image
from reports import write_seeded_report

from essp.settings import SECRETS_FILE, Settings
from essp.stack.airflow import PROCESSES, AirflowStack, api_healthy
from essp.stack.browser import screenshot
from essp.stack.procs import pid_alive
from essp.stack.services import LocalStack, pg_params

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
SCREENSHOT = REPO / "docs" / "img" / "ui-report.png"
SHOT_SIZE = (1400, 1800)
RUN = "ui-demo-run"


@dataclass
class AirflowUI:
    """A running Airflow (api-server, scheduler, dag-processor, triggerer) with ESSP's isolated settings."""

    settings: Settings
    _token: str | None = field(default=None, repr=False)

    @property
    def url(self) -> str:
        return self.settings.airflow_url

    def token(self) -> str:
        """A JWT for the REST API (fetched once)."""
        if self._token is None:
            body = {"username": self.settings.airflow_user, "password": self.settings.secret("airflow_password")}
            self._token = self.call("POST", "/auth/token", body, auth=False)["access_token"]
        return self._token

    def request(self, method: str, path: str, body: dict | None = None, *, auth: bool = True,
                timeout: float = 30) -> tuple[int, dict[str, str], bytes]:
        """status, headers, body of one request (an HTTP error status is returned, not raised)."""
        headers = {"Content-Type": "application/json"}
        if auth:
            headers["Authorization"] = f"Bearer {self.token()}"
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(self.url + path, method=method, data=data, headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=timeout) as response:
                return response.status, dict(response.headers), response.read()
        except urllib.error.HTTPError as exc:
            return exc.code, dict(exc.headers), exc.read()

    def call(self, method: str, path: str, body: dict | None = None, *, auth: bool = True) -> Any:
        """The JSON answer of a REST call; an error status fails the test with the answer."""
        status, _, raw = self.request(method, path, body, auth=auth)
        assert 200 <= status < 300, f"{method} {path} -> {status}: {raw[:2000]!r}"
        return json.loads(raw or b"{}")


@pytest.fixture(scope="module")
def airflow_ui(base_settings, tmp_path_factory) -> Iterator[AirflowUI]:
    state = tmp_path_factory.mktemp("airflow-ui")
    shutil.copy(base_settings.state_dir / SECRETS_FILE, state / SECRETS_FILE)
    tag = "t" + uuid.uuid4().hex[:10]
    settings = Settings(state_dir=state, airflow_port=free_port_block(1), pg_database=f"essp_test_{tag}",
                        topic_prefix=tag, redis_prefix=tag, bucket_videos=f"{tag}-videos",
                        bucket_models=f"{tag}-models", bucket_runs=f"{tag}-runs")
    LocalStack(settings).up(["postgres"])  # creates the database
    stack = AirflowStack(settings)
    try:
        # `essp airflow up` starts the four processes once; again, it finds them running
        assert stack.up() == {p: "started" for p in PROCESSES}
        pids = stack.status()
        assert stack.up() == {p: "already running" for p in PROCESSES} and stack.status() == pids
        yield AirflowUI(settings)
        # `essp airflow down` from another process (the processes rename themselves: the PID files
        # still find them) stops all four
        done = subprocess.run([str(Path(sys.executable).parent / "essp"), "airflow", "down"],
                              env={**os.environ, **settings.as_env()}, capture_output=True, text=True, timeout=180)
        assert done.returncode == 0, done.stderr
        assert all(process in done.stdout for process in PROCESSES)
        deadline = time.monotonic() + 30
        while any(pid_alive(pid) for pid in pids.values() if pid) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not any(pid_alive(pid) for pid in pids.values() if pid) and not api_healthy(settings)
    finally:
        stack.down()
        conn = psycopg2.connect(**pg_params(settings, "postgres"))
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute(f'DROP DATABASE IF EXISTS "{settings.pg_database}" WITH (FORCE)')
        conn.close()
        _cleanup(settings)


def _non_white(region: np.ndarray) -> float:
    return float((region.min(axis=2) < 235).mean())


def _colours(region: np.ndarray) -> int:
    return len(np.unique(region.reshape(-1, 3), axis=0))


def test_plugin_is_served_and_the_report_renders(airflow_ui):
    settings = airflow_ui.settings
    report = write_seeded_report(settings, RUN)

    plugins = airflow_ui.call("GET", "/api/v2/plugins")["plugins"]
    [essp] = [p for p in plugins if p["name"] == "essp"]
    views = {v["destination"]: v for v in essp["external_views"]}
    assert views["nav"]["href"] == "essp/" and views["nav"]["name"] == "ESSP reports"
    assert views["dag_run"]["href"] == "essp/dag-runs/{DAG_ID}/{RUN_ID}"
    assert [a["url_prefix"] for a in essp["fastapi_apps"]] == ["/essp"]
    assert any("WorkerLogsLink" in link for link in essp["operator_extra_links"])
    errors = airflow_ui.call("GET", "/api/v2/plugins/importErrors")["import_errors"]
    assert not [e for e in errors if "essp" in e["source"]], errors

    status, headers, raw = airflow_ui.request("GET", f"/essp/runs/{RUN}", auth=False)
    assert status == 200 and headers["content-type"].startswith("text/html")
    page = raw.decode()
    assert f"<code>{RUN}</code>" in page and 'data-name="stream:rgb"' in page
    status, headers, png = airflow_ui.request("GET", f"/essp/runs/{RUN}/files/fusion.png", auth=False)
    assert status == 200 and headers["content-type"] == "image/png"
    status, _, raw = airflow_ui.request("GET", "/essp/", auth=False)
    assert status == 200 and f'href="./runs/{RUN}"' in raw.decode()
    assert json.loads(airflow_ui.request("GET", f"/essp/runs/{RUN}/report.json", auth=False)[2]) == report

    # What a user sees: headless Chromium on the api-server's page, kept as documentation.
    screenshot(f"{airflow_ui.url}/essp/runs/{RUN}", SCREENSHOT, width=SHOT_SIZE[0], height=SHOT_SIZE[1])
    with Image.open(SCREENSHOT) as image:
        assert image.format == "PNG" and image.size == SHOT_SIZE
        pixels = np.asarray(image.convert("RGB"))
    header = pixels[:60]
    assert (header.mean(axis=2) < 100).mean() > 0.8  # the dark header band
    upper, lower = pixels[150:800], pixels[800:1700]  # cards and the metrics table; the plots
    assert _non_white(upper) > 0.03, "the table area is blank"
    assert _non_white(lower) > 0.05, "the plot area is blank"
    assert _colours(lower) > 500, "the plot area has no plot (too few colours)"
    assert _colours(pixels) > 1000


REST_CONF = {"dataset": "tiny", "rgb_arch": "tiny", "flow_arch": "tiny", "epochs": 1, "samples_per_epoch": 24,
             "length": 4, "size": 32, "batch_size": 8, "lr": 0.05, "snippets": 2, "fusion": "product",
             "replicas": {"decode": 1, "flow": 1, "rgb": 1}, "stop_data_workers": True, "registry": "rest",
             "run": "rest-run"}
DAG_RUN_SCREENSHOT = REPO / "docs" / "img" / "ui-dag-run-report.png"


def test_essp_train_triggered_through_the_rest_api_with_a_fusion_override(airflow_ui, tmp_path):
    from urllib.parse import quote

    from essp.datasets.ingest import ingest_directory
    from essp.datasets.synth import synthesize
    from essp.lifecycle.model_registry import ModelRegistry

    settings = airflow_ui.settings
    synthesize(tmp_path / "videos", classes=3, videos_per_class=4, frames=24, height=48, width=48, keyint=6, seed=3)
    ingest_directory(settings, tmp_path / "videos", "tiny")
    for _ in range(60):  # the dag-processor parses the DAG folder at start
        if airflow_ui.request("GET", "/api/v2/dags/essp_train")[0] == 200:
            break
        time.sleep(2)

    # a param outside its schema is refused at trigger time, naming it
    status, _, raw = airflow_ui.request("POST", "/api/v2/dags/essp_train/dagRuns",
                                        {"logical_date": None, "conf": {**REST_CONF, "fusion": "best"}})
    assert status == 400 and b"fusion" in raw and b"best" in raw, raw[:1000]

    from essp.stack.airflow import AirflowClient

    client = AirflowClient(settings)
    run = client.trigger("essp_train", REST_CONF)
    final = client.wait("essp_train", run["dag_run_id"], timeout_s=900, poll_s=2)
    tasks = {(t["task_id"], t.get("map_index", -1)): t["state"] for t in client.tasks("essp_train", run["dag_run_id"])}
    assert final["state"] == "success", tasks
    assert set(tasks.values()) == {"success"} and ("train", 1) in tasks, tasks
    production = ModelRegistry(settings, "rest").production()
    assert production.run == "rest-run" and production.fusion["strategy"] == "product"

    # the DAG run's report tab, as the UI embeds it, and what a user sees there
    path = f"/essp/dag-runs/essp_train/{quote(run['dag_run_id'], safe='')}"
    status, _, raw = airflow_ui.request("GET", path, auth=False)
    page = raw.decode()
    assert status == 200 and "rest-run" in page and "product" in page
    status, _, raw = airflow_ui.request("GET", path + "/workers", auth=False)
    assert status == 200 and "trainer-rest-run-rgb" in raw.decode()
    screenshot(airflow_ui.url + path, DAG_RUN_SCREENSHOT, width=SHOT_SIZE[0], height=SHOT_SIZE[1])
    with Image.open(DAG_RUN_SCREENSHOT) as image:
        pixels = np.asarray(image.convert("RGB"))
    assert _non_white(pixels[150:800]) > 0.03 and _colours(pixels[800:1700]) > 500
