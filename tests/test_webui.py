"""The ESSP pages (essp.orchestration.webui) on a real report in the real S3: the index, the report page with its
metrics, plots and escaping, the files and JSON routes, DAG-run links, the status page of a run that
is still training, the workers page over a real process table, and the plugin module itself."""

from __future__ import annotations

import importlib.util
import io
import json
import re
import shutil
import time
import uuid
from pathlib import Path
from types import SimpleNamespace
from urllib.parse import quote, unquote, urljoin, urlsplit

import pytest
from conftest import _cleanup
from fastapi import FastAPI
from fastapi.testclient import TestClient
from PIL import Image
from reports import HOSTILE, STREAMS, write_seeded_report

from essp.clients.redis import redis_client
from essp.contract import RedisKeys
from essp.evaluation.report import PLOTS, PNG_SIGNATURE, read_report, summary_markdown
from essp.orchestration.links import save_link
from essp.orchestration.webui import create_app, dag_run_context, render_report
from essp.stack.procs import ProcessTable
from essp.stack.services import isolated_settings
from essp.training.artifacts import RunStore

REPO = Path(__file__).resolve().parents[1]
RUN = "ui-report-1"
PENDING = "ui-pending-1"
DAG = "essp_train"
DAG_RUN = "manual__2026-05-01T10:00:00.123456+00:00"
PENDING_DAG_RUN = "manual__2026-05-02T08:30:00+00:00"


@pytest.fixture(scope="module")
def ui_settings(base_settings, tmp_path_factory):
    """Isolated buckets and prefixes, and a state folder of our own (the process table)."""
    state = tmp_path_factory.mktemp("webui-state")
    settings = isolated_settings(base_settings, "t" + uuid.uuid4().hex[:10]).model_copy(update={"state_dir": state})
    yield settings
    _cleanup(settings)
    shutil.rmtree(state, ignore_errors=True)


@pytest.fixture(scope="module")
def report(ui_settings):
    written = write_seeded_report(ui_settings, RUN)
    save_link(ui_settings, DAG, DAG_RUN, RUN, params={"run": RUN})
    return written


@pytest.fixture(scope="module")
def client(ui_settings, report):
    return TestClient(create_app(lambda: ui_settings))


def _pct(value):
    return "n/a" if value is None else f"{100 * value:.1f}%"


def _text(fragment: str) -> str:
    return re.sub(r"<[^>]+>", "", fragment).strip()


def _metric_rows(body: str) -> dict[str, tuple[str, list[str]]]:
    """Rows of the metrics table: data-name -> (class attribute, cell texts)."""
    table = re.search(r'<table class="metrics">(.*?)</table>', body, re.S).group(1)
    rows = {}
    for classes, name, cells in re.findall(r'<tr class="([^"]*)" data-name="([^"]*)">(.*?)</tr>', table, re.S):
        rows[name] = (classes, [_text(c) for c in re.findall(r"<td[^>]*>(.*?)</td>", cells, re.S)])
    return rows


def _img_sources(body: str) -> list[str]:
    return re.findall(r'<img src="([^"]+)"', body)


def test_index_lists_runs_with_a_report(client, ui_settings, report):
    RunStore(ui_settings, "no-report-yet").save_json("spec.json", {"spec": {}})  # a run without report
    response = client.get("/")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/html")
    body = response.text
    assert f'href="./runs/{RUN}"' in body  # relative: the app sits behind /essp
    assert "no-report-yet" not in body and "_airflow" not in body
    assert report["summary"]["selected"] in body and _pct(report["summary"]["selected_top1"]) in body


def test_report_page_metrics_plots_and_escaping(client, report):
    response = client.get(f"/runs/{RUN}")
    assert response.status_code == 200
    body = response.text
    assert f"<code>{RUN}</code>" in body
    data = client.get(f"/runs/{RUN}/report.json").json()
    assert data == report

    # One row per stream and per fusion strategy, with the report's own figures.
    rows = _metric_rows(body)
    expected = {f"stream:{s}" for s in STREAMS} | set(data["evaluation"]["fusion"])
    assert set(rows) == expected
    for row in data["fusion_table"]:
        classes, cells = rows[row["name"]]
        if row["skipped"] is not None:
            assert "skipped" in classes and cells[2] == f"skipped: {row['skipped']}"
            continue
        assert cells[2:6] == [_pct(row[k]) for k in ("top1", "top5", "mean_class_accuracy", "mAP")], row["name"]
        assert cells[6] == str(row["videos"])
        assert ("selected" in classes.split()) == row["selected"]
    assert [n for n, (c, _) in rows.items() if "selected" in c.split()] == [data["selected"]]
    assert "sequence" in rows and "skipped" in rows["sequence"][0]  # no snippet features: skipped, says why

    # Summary lines, the per-epoch history, the params.
    assert "at least as good: yes" in body
    for stream in STREAMS:
        history = re.search(rf'<table class="history" data-stream="{stream}">(.*?)</table>', body, re.S).group(1)
        assert history.count("<tr>") == len(data["history"][stream]) + 1
        assert _pct(data["history"][stream][-1]["accuracy"]) in history

    # Every value is escaped: the hostile param shows as text, never as markup.
    assert "<script" not in body
    assert json.dumps(data["params"]["manifest"]) not in body
    assert "synth&lt;script&gt;alert(&#x27;essp&#x27;)&lt;/script&gt;" in body
    assert HOSTILE in data["params"]["manifest"]

    # Plots as <img> with relative paths that resolve to the files route.
    sources = _img_sources(body)
    assert len(sources) == len(PLOTS) and all(not s.startswith("/") for s in sources)
    page_url = f"http://testserver/runs/{RUN}"
    for source, name in zip(sources, PLOTS, strict=True):
        assert source.endswith(f"/files/{name}")
        png = client.get(urlsplit(urljoin(page_url, source)).path)
        assert png.status_code == 200 and png.content.startswith(PNG_SIGNATURE), source


def test_every_report_value_is_escaped_on_the_report_page(client, report):
    """The templates autoescape what a report and a DAG run carry, wherever a page shows it (text and attributes)."""
    hostile = json.loads(json.dumps(report))
    hostile["created_at"] = HOSTILE
    hostile["summary"].update(selected=HOSTILE, best_stream=HOSTILE)
    hostile["fusion_table"][0]["name"] = HOSTILE
    hostile["evaluation"]["fusion"][HOSTILE] = {"note": HOSTILE}
    hostile["history"][HOSTILE] = hostile["history"].pop("rgb")
    hostile["streams"][HOSTILE] = hostile["streams"].pop("rgb")
    hostile["params"][HOSTILE] = HOSTILE
    context = dag_run_context(HOSTILE, HOSTILE, RUN, "./")
    body = render_report(hostile, "./", context=context).body.decode()
    assert "<script" not in body and "alert('essp')" not in body
    escaped = "&lt;script&gt;alert(&#x27;essp&#x27;)&lt;/script&gt;"
    assert f'data-name="{escaped}"' in body and f'data-stream="{escaped}"' in body
    assert f"<h3>{escaped}</h3>" in body and f"<th>{escaped}</th>" in body
    assert f'<div class="note">{escaped}</div>' in body
    assert f"<strong>{escaped}</strong>" in body and f"report written {escaped}" in body
    assert f"DAG run <code>{escaped}</code> of <code>{escaped}</code>" in body
    assert f'href="./dag-runs/{quote(HOSTILE, safe="")}/{quote(HOSTILE, safe="")}/workers"' in body

    # Error pages escape what the URL carries.
    unknown = client.get(f"/dag-runs/{quote(HOSTILE[:-9], safe='')}/nope")
    assert unknown.status_code == 404 and "<script" not in unknown.text
    assert "&lt;script&gt;alert(&#x27;essp&#x27;)" in unknown.text

def test_files_route(client, ui_settings, report):
    response = client.get(f"/runs/{RUN}/files/confusion.png")
    assert response.status_code == 200 and response.headers["content-type"] == "image/png"
    with Image.open(io.BytesIO(response.content)) as image:
        assert image.format == "PNG" and image.size == (600, 400)
    summary = client.get(f"/runs/{RUN}/files/summary.md")
    assert summary.status_code == 200 and summary.headers["content-type"].startswith("text/markdown")
    assert summary.text == summary_markdown(read_report(ui_settings, RUN))
    for name in ("spec.json", "report.json", "secrets.env", "..%2Fspec.json"):
        assert client.get(f"/runs/{RUN}/files/{name}").status_code == 404, name
    missing = client.get("/runs/never-ran/files/loss.png")
    assert missing.status_code == 404 and "never-ran has no loss.png" in missing.text


def test_bad_run_id_and_missing_report(client):
    for bad in ("bad.id", "-dash-first", "x" * 65):
        response = client.get(f"/runs/{bad}")
        assert response.status_code == 400, bad
        assert "is not valid" in response.text
    assert client.get("/runs/bad.id/report.json").status_code == 400
    missing = client.get("/runs/never-ran")
    assert missing.status_code == 404
    assert "run never-ran has no report yet:" in missing.text and "never-ran/report/report.json" in missing.text
    missing_json = client.get("/runs/never-ran/report.json")
    assert missing_json.status_code == 404 and "has no report yet" in missing_json.json()["detail"]


def test_dag_run_resolves_its_link(client, report):
    path = f"/dag-runs/{DAG}/{quote(DAG_RUN, safe='')}"
    response = client.get(path)
    assert response.status_code == 200
    body = response.text
    assert f"<code>{RUN}</code>" in body and DAG_RUN in body
    assert set(_metric_rows(body)) == {r["name"] for r in report["fusion_table"]}
    page_url = "http://testserver" + path
    for source in _img_sources(body):
        resolved = urlsplit(urljoin(page_url, source)).path
        assert resolved.startswith(f"/runs/{RUN}/files/"), source
        assert client.get(resolved).content.startswith(PNG_SIGNATURE)
    workers = re.search(r'<a href="([^"]+/workers)"', body).group(1)
    assert unquote(urlsplit(urljoin(page_url, workers)).path) == f"/dag-runs/{DAG}/{DAG_RUN}/workers"

    unknown = client.get(f"/dag-runs/{DAG}/{quote('manual__2026-01-01T00:00:00+00:00', safe='')}")
    assert unknown.status_code == 404 and "has not started an ESSP run" in unknown.text
    assert client.get(f"/dag-runs/{DAG}/nope/workers").status_code == 404


def test_links_resolve_under_the_plugin_prefix(ui_settings, report):
    outer = FastAPI()
    outer.mount("/essp", create_app(lambda: ui_settings))
    mounted = TestClient(outer)
    index = mounted.get("/essp/")
    link = re.search(rf'<a href="([^"]*{RUN})"', index.text).group(1)
    page_path = urlsplit(urljoin("http://testserver/essp/", link)).path
    assert page_path == f"/essp/runs/{RUN}"
    page = mounted.get(page_path)
    assert page.status_code == 200
    for source in _img_sources(page.text):
        resolved = urlsplit(urljoin("http://testserver" + page_path, source)).path
        assert resolved.startswith(f"/essp/runs/{RUN}/files/")
        assert mounted.get(resolved).status_code == 200
    back = re.search(r'<nav class="crumbs"><a href="([^"]+)"', page.text).group(1)
    assert urlsplit(urljoin("http://testserver" + page_path, back)).path == "/essp/"


@pytest.fixture
def pending_run(ui_settings):
    """A DAG run whose ESSP run is training: spec written, the rgb trainer's state in Redis, no report."""
    from essp.lifecycle.params import RunParams

    spec = RunParams(run=PENDING, dataset="synth", epochs=5)
    RunStore(ui_settings, PENDING).save_json("spec.json", {"spec": spec.model_dump(mode="json")})
    save_link(ui_settings, DAG, PENDING_DAG_RUN, PENDING)
    key = RedisKeys(ui_settings.redis_prefix).trainer(PENDING, "rgb")
    state = {"status": "training", "epoch_done": 1, "iteration": 40, "worker": "train-rgb-host-<1>",
             "updated_at": time.time(), "stats": {"loss": 0.75, "accuracy": 0.5}}
    redis_client(ui_settings).set(key, json.dumps(state), ex=600)
    return f"/dag-runs/{DAG}/{quote(PENDING_DAG_RUN, safe='')}"


def test_dag_run_without_report_shows_trainer_states(client, pending_run):
    response = client.get(pending_run)
    assert response.status_code == 200
    body = response.text
    assert f"Run <code>{PENDING}</code> has no report yet" in body and "shows the report when the run finishes" in body
    rgb = re.search(r'<tr data-stream="rgb">(.*?)</tr>', body, re.S).group(1)
    assert "training" in rgb and "2 / 5" in rgb and "train-rgb-host-&lt;1&gt;" in rgb
    flow = re.search(r'<tr data-stream="flow">(.*?)</tr>', body, re.S).group(1)
    assert "not started" in flow
    # where the epoch stands, as the trigger and the pipeline judge it: flow has not finished epoch 0
    assert re.search(r"<p data-progress>epoch 0 of 5: training</p>", body)
    assert 'http-equiv="refresh"' in body


def test_workers_page_shows_the_process_table(client, ui_settings, pending_run, monkeypatch):
    table = ProcessTable(ui_settings.state_dir)
    name = f"trainer-{PENDING}-rgb"
    record = table.spawn(name, ["sh", "-c", "echo 'epoch 1 <b>done</b>'; exec sleep 30"])
    try:
        table.log_dir.mkdir(parents=True, exist_ok=True)
        (table.log_dir / "worker-decode-0.log").write_text("decoded v_001\n")
        (table.log_dir / "trainer-other-run-rgb.log").write_text("not this run\n")
        (table.log_dir / "postgres.log").write_text("not a worker\n")
        deadline = time.monotonic() + 10
        while "done" not in table.log(name).read_text() and time.monotonic() < deadline:
            time.sleep(0.1)

        response = client.get(f"{pending_run}/workers")
        assert response.status_code == 200
        body = response.text
        row = re.search(rf'<tr data-name="{name}">(.*?)</tr>', body, re.S).group(1)
        assert str(record.pid) in row and "running" in row and "not running" not in row
        assert str(table.log(name)) in row
        assert "epoch 1 &lt;b&gt;done&lt;/b&gt;" in body and "<b>done</b>" not in body
        assert "worker-decode-0" in body and "decoded v_001" in body
        assert f"trainer-{PENDING}-flow" in body  # a stream of the spec without a process: listed, no log
        assert "not this run" not in body and "not a worker" not in body
    finally:
        table.stop(name, timeout_s=10)
    after = client.get(f"{pending_run}/workers").text
    row = re.search(rf'<tr data-name="{name}">(.*?)</tr>', after, re.S).group(1)
    assert "not running" in row

    monkeypatch.setenv("KUBECONFIG", "/nonexistent/kubeconfig")  # no cluster: the page says so
    kube = TestClient(create_app(lambda: ui_settings.model_copy(update={"stage_mode": "kubernetes"})))
    body = kube.get(f"{pending_run}/workers").text
    assert f"essp/run={PENDING}" in body
    assert f"kubectl -n {ui_settings.k8s_namespace} logs -l essp/run={PENDING} --all-containers" in body
    assert "The pods could not be read through the Kubernetes API" in body  # no cluster configured here
    assert "epoch 1" not in body


def test_plugin_module_and_worker_logs_link(monkeypatch):
    spec = importlib.util.spec_from_file_location("essp_plugin_under_test", REPO / "plugins" / "essp_plugin.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    plugin = module.EsspPlugin
    assert plugin.name == "essp"
    [app] = plugin.fastapi_apps
    assert app["url_prefix"] == "/essp" and isinstance(app["app"], FastAPI)
    views = {v["destination"]: v for v in plugin.external_views}
    assert set(views) == {"nav", "dag_run"}
    assert all(not v["href"].startswith("/") for v in plugin.external_views)
    assert views["nav"]["href"] == "essp/"
    assert views["dag_run"]["href"] == "essp/dag-runs/{DAG_ID}/{RUN_ID}"
    [link] = plugin.operator_extra_links
    assert link.name == "Worker logs"

    key = SimpleNamespace(dag_id=DAG, run_id=DAG_RUN, task_id="train_epoch", map_index=-1, try_number=1)
    encoded = quote(DAG_RUN, safe="")
    monkeypatch.delenv("AIRFLOW__API__BASE_URL", raising=False)
    assert link.get_link(None, ti_key=key) == f"essp/dag-runs/{DAG}/{encoded}/workers"
    monkeypatch.setenv("AIRFLOW__API__BASE_URL", "http://airflow.example:8080/")
    assert link.get_link(None, ti_key=key) == f"http://airflow.example:8080/essp/dag-runs/{DAG}/{encoded}/workers"


def test_every_route_of_the_plugin_app_asks_for_airflows_login(report):
    """Each route the plugin mounts carries Airflow's auth check (a route added without one fails here); with
    no token at all it answers 401 before reading anything (the real api-server: tests/test_airflow_ui.py)."""
    from fastapi.routing import APIRoute

    spec = importlib.util.spec_from_file_location("essp_plugin_auth", REPO / "plugins" / "essp_plugin.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    app = module.EsspPlugin.fastapi_apps[0]["app"]
    routes = [r for r in app.routes if isinstance(r, APIRoute)]
    assert len(routes) == 6 and all(r.dependencies for r in routes)
    anonymous = TestClient(app)
    for path in ("/", f"/runs/{RUN}", f"/runs/{RUN}/report.json", f"/runs/{RUN}/files/loss.png",
                 f"/dag-runs/{DAG}/{quote(DAG_RUN, safe='')}", f"/dag-runs/{DAG}/{quote(DAG_RUN, safe='')}/workers"):
        response = anonymous.get(path)
        assert response.status_code == 401, (path, response.status_code, response.text[:200])
        assert RUN not in response.text
