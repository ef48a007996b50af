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


def _foreign_scripts(body: str) -> list[str]:
    """Script tags other than the app's own (static/essp.js, the one script its CSP allows)."""
    return [tag for tag in re.findall(r"<script[^>]*>", body, re.I)
            if not re.fullmatch(r'<script src="(\./|(\.\./)+)static/essp\.js" defer>', tag)]


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
    assert not _foreign_scripts(body)
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
    assert not _foreign_scripts(body) and "alert('essp')" not in body
    escaped = "&lt;script&gt;alert(&#x27;essp&#x27;)&lt;/script&gt;"
    assert f'data-name="{escaped}"' in body and f'data-stream="{escaped}"' in body
    assert f"<h3>{escaped}</h3>" in body and f"<th>{escaped}</th>" in body
    assert f'<div class="note">{escaped}</div>' in body
    assert f"<strong>{escaped}</strong>" in body and f"report written {escaped}" in body
    assert f"DAG run <code>{escaped}</code> of <code>{escaped}</code>" in body
    assert f'href="./dag-runs/{quote(HOSTILE, safe="")}/{quote(HOSTILE, safe="")}/workers"' in body

    # Error pages escape what the URL carries.
    unknown = client.get(f"/dag-runs/{quote(HOSTILE[:-9], safe='')}/nope")
    assert unknown.status_code == 200 and not _foreign_scripts(unknown.text)
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

    # a DAG run whose first task has not run yet: said in words, and the page reloads until it has
    not_yet = quote("manual__2026-01-01T00:00:00+00:00", safe="")
    for path in (f"/dag-runs/{DAG}/{not_yet}", f"/dag-runs/{DAG}/nope/workers"):
        unknown = client.get(path)
        assert unknown.status_code == 200 and "has not started an ESSP run yet" in unknown.text, path
        assert "its first task records the run it trains" in unknown.text and 'http-equiv="refresh"' in unknown.text


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
    assert '<div class="msg phase" data-phase="training"><strong>Training epoch 1 of 5.</strong>' in body
    assert "The report (every stream and fusion scored, the plots) appears here when the run finishes" in body
    rgb = re.search(r'<tr data-stream="rgb">(.*?)</tr>', body, re.S).group(1)
    assert "training" in rgb and "2 / 5" in rgb and "train-rgb-host-&lt;1&gt;" in rgb
    flow = re.search(r'<tr data-stream="flow">(.*?)</tr>', body, re.S).group(1)
    assert "not started" in flow
    # where the epoch stands, as the trigger and the pipeline judge it: flow has not finished epoch 0
    assert re.search(r"<p data-progress>training epoch 1 of 5</p>", body)
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
    views = {(v["destination"], v["name"]): v for v in plugin.external_views}
    assert set(views) == {("nav", "ESSP"), ("dag_run", "ESSP report"), ("dag_run", "Worker logs"),
                          ("task_instance", "Worker logs")}
    assert all(not v["href"].startswith("/") for v in plugin.external_views)
    assert len({v["url_route"] for v in plugin.external_views}) == len(plugin.external_views)
    assert views["nav", "ESSP"]["href"] == "essp/"
    assert views["dag_run", "ESSP report"]["href"] == "essp/dag-runs/{DAG_ID}/{RUN_ID}"
    for where in ("dag_run", "task_instance"):  # the worker logs, inside the UI, from the run and from a task
        assert views[where, "Worker logs"]["href"] == "essp/dag-runs/{DAG_ID}/{RUN_ID}/workers"
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
    assert len(routes) == 7 and all(r.dependencies for r in routes)
    anonymous = TestClient(app)
    for path in ("/", "/static/essp.js", f"/runs/{RUN}", f"/runs/{RUN}/report.json", f"/runs/{RUN}/files/loss.png",
                 f"/dag-runs/{DAG}/{quote(DAG_RUN, safe='')}", f"/dag-runs/{DAG}/{quote(DAG_RUN, safe='')}/workers"):
        response = anonymous.get(path)
        assert response.status_code == 401, (path, response.status_code, response.text[:200])
        assert RUN not in response.text


# --- a run in progress: phases, curves, figures, scoring -------------------------------------------------
def _training_run(settings, run: str, dag_run: str, *, epochs: int, done: dict[str, int]) -> str:
    """A run of ``epochs`` whose streams have finished ``done[stream]`` epochs: spec, DAG-run link, trainer
    states in Redis and checkpoint pointers carrying each stream's per-epoch figures (as save_checkpoint writes
    them); returns the DAG run's report path."""
    from essp.lifecycle.params import RunParams

    spec = RunParams(run=run, dataset="synth", epochs=epochs)
    runs = RunStore(settings, run)
    runs.save_json("spec.json", {"spec": spec.model_dump(mode="json")})
    save_link(settings, DAG, dag_run, run)
    for stream, finished in done.items():
        history = [{"epoch": e, "loss": 2.0 / (e + 1), "accuracy": 0.2 + 0.1 * e, "samples_per_s": 40.0 + e,
                    "data_wait": 0.05, "val_loss": 2.5 / (e + 1), "val_top1": 0.1 + 0.1 * e}
                   for e in range(finished)]
        runs.save_json(f"checkpoints/{stream}/latest.json", {"uri": "s3://x/y.pt", "epoch": finished,
                                                              "iteration": 10 * finished, "finished_epoch": True,
                                                              "history": history})
        state = {"status": "epoch_done", "epoch_done": finished - 1, "iteration": 10 * finished,
                 "updated_at": time.time(), "stats": history[-1] if history else {}}
        redis_client(settings).set(RedisKeys(settings.redis_prefix).trainer(run, stream), json.dumps(state), ex=600)
    return f"/dag-runs/{DAG}/{quote(dag_run, safe='')}"


def _phase(body: str) -> tuple[str, str]:
    found = re.search(r'data-phase="([a-z]+)"><strong>(.*?)</strong>', body, re.S)
    return found.group(1), _text(found.group(2))


def test_a_training_run_shows_its_curves_growing_and_its_figures_per_stream(client, ui_settings):
    path = _training_run(ui_settings, "ui-live-1", "manual__2026-05-03T00:00:00+00:00", epochs=6,
                         done={"rgb": 3, "flow": 2})
    body = client.get(path).text
    assert _phase(body) == ("training", "Training epoch 3 of 6.")
    for key in ("loss", "accuracy"):
        svg = re.search(rf'<svg [^>]*data-curve="{key}".*?</svg>', body, re.S).group(0)
        lines = {s: p for p, s in re.findall(r'<polyline points="([^"]+)"[^>]*data-stream="([a-z]+)"/>', svg)}
        assert {s: len(p.split()) for s, p in lines.items()} == {"rgb": 3, "flow": 2}, key  # a point per epoch
        # and the validation curve beside it, dashed, a point per epoch too
        held = dict(re.findall(r'<polyline points="([^"]+)"[^>]*stroke-dasharray="5 3" data-stream="([a-z]+)"', svg))
        assert sorted(len(p.split()) for p in held) == [2, 3], key
        assert svg.count("<circle") == 10
    rgb = re.search(r'<tr data-figures="rgb">(.*?)</tr>', body, re.S).group(1)
    cells = [_text(c) for c in re.findall(r"<td[^>]*>(.*?)</td>", rgb, re.S)]
    assert cells == ["rgb", "3 / 6", "0.667", "40.0%", "42.0", "41.0", "5.0%", "0.833", "30.0%"]

    # one more epoch of flow: the page (reloaded) shows it
    _training_run(ui_settings, "ui-live-1", "manual__2026-05-03T00:00:00+00:00", epochs=6, done={"rgb": 3, "flow": 3})
    again = client.get(path).text
    flow = re.search(r'<svg [^>]*data-curve="loss".*?</svg>', again, re.S).group(0)
    assert len(re.search(r'<polyline points="([^"]+)"[^>]*data-stream="flow"', flow).group(1).split()) == 3
    assert _phase(again) == ("training", "Training epoch 4 of 6.")


def test_the_phase_is_said_in_words_paused_stopped_scoring_and_reporting(client, ui_settings):
    from essp.lifecycle.progress import ScoringRecorder

    path = _training_run(ui_settings, "ui-live-2", "manual__2026-05-04T00:00:00+00:00", epochs=2,
                         done={"rgb": 1, "flow": 1})
    key = RedisKeys(ui_settings.redis_prefix).run_state("ui-live-2")
    redis_client(ui_settings).set(key, "paused", ex=600)
    assert _phase(client.get(path).text) == ("paused", "Paused at epoch 2 of 2: essp_control resume goes on.")
    redis_client(ui_settings).set(key, "stopped", ex=600)
    assert _phase(client.get(path).text)[0] == "stopped"
    redis_client(ui_settings).set(key, "running", ex=600)

    _training_run(ui_settings, "ui-live-2", "manual__2026-05-04T00:00:00+00:00", epochs=2, done={"rgb": 2, "flow": 2})
    body = client.get(path).text
    assert _phase(body) == ("scoring", "All 2 epochs trained: scoring the videos comes next.")
    assert "no report yet" not in body and "buckets" not in body  # no words of an error for a run at work
    test = ScoringRecorder(ui_settings, "ui-live-2", "test")
    test(12, 30)
    body = client.get(path).text
    assert _phase(body) == ("scoring", "Scoring the test videos: 12 of 30 scored.")
    row = re.search(r'<tr data-split="test">(.*?)</tr>', body, re.S).group(1)
    assert "12 of 30" in row and 'style="width: 40%"' in row
    test(30, 30, finished=True)
    ScoringRecorder(ui_settings, "ui-live-2", "val")(5, 60)
    assert _phase(client.get(path).text) == ("scoring", "Scoring the validation videos: 5 of 60 scored.")
    ScoringRecorder(ui_settings, "ui-live-2", "val")(60, 60, finished=True)
    assert _phase(client.get(path).text) == ("reporting", "Fusing the streams and writing the report.")


# --- the registration card, and the links between a report and its DAG run ------------------------------
def test_the_report_says_what_the_registry_did_and_links_to_its_dag_run(ui_settings, report):
    from essp.lifecycle.progress import REGISTRATION_FILE

    outer = FastAPI()
    outer.mount("/essp", create_app(lambda: ui_settings))
    mounted = TestClient(outer)
    runs = RunStore(ui_settings, RUN)

    def card(page: str) -> str:
        return _text(re.search(r"<div class=\"card[^\"]*\" data-registration>(.*?)</div>\s*<div class=\"card", page,
                               re.S).group(1))

    assert card(mounted.get(f"/essp/runs/{RUN}").text).startswith("model registrynot registered (yet)")
    runs.save_json(REGISTRATION_FILE, {"registry": "ui-reg", "version": 3, "promoted": False, "metric": "top1",
                                       "reason": "top1 0.50 is not better than production v2's 0.61"})
    page = mounted.get(f"/essp/runs/{RUN}").text
    assert card(page) == ("model registryv3 of ui-reg: not promotedproduction stays: top1 0.50 is not better than "
                          "production v2&#x27;s 0.61")
    runs.save_json(REGISTRATION_FILE, {"registry": "ui-reg", "version": 4, "promoted": True, "reason": "first"})
    dag_page = mounted.get(f"/essp/dag-runs/{DAG}/{quote(DAG_RUN, safe='')}").text
    assert card(dag_page).startswith("model registryv4 of ui-reg: promoted")

    # the report links to its DAG run in the Airflow UI (one level above the plugin's /essp), and back
    page_path = f"/essp/runs/{RUN}"
    page = mounted.get(page_path).text
    [airflow] = re.findall(r'<a href="([^"]+)" data-top target="_top">DAG run', page)
    assert urlsplit(urljoin("http://testserver" + page_path, airflow)).path == \
        f"/dags/{DAG}/runs/{quote(DAG_RUN, safe='')}"
    index = mounted.get("/essp/").text
    row = re.search(rf'<tr data-run="{RUN}">(.*?)</tr>', index, re.S).group(1)
    assert "v4 of ui-reg" in row and "promoted" in row
    link = re.search(r'<a href="([^"]+)" data-top target="_top">essp_train</a>', row).group(1)
    assert urlsplit(urljoin("http://testserver/essp/", link)).path == f"/dags/{DAG}/runs/{quote(DAG_RUN, safe='')}"
    script = mounted.get("/essp/static/essp.js")
    assert script.status_code == 200 and "a[data-top]" in script.text
    assert "script-src 'self'" in script.headers["content-security-policy"]


# --- DAG runs that train no ESSP run ---------------------------------------------------------------------
def test_the_tab_of_a_dag_run_that_trains_no_run_says_what_it_did(client, ui_settings, report):
    from essp.clients.s3 import ObjectStore
    from essp.orchestration.links import save_dag_run_record

    def page(dag_id: str, dag_run_id: str) -> tuple[str, str]:
        body = client.get(f"/dag-runs/{dag_id}/{quote(dag_run_id, safe='')}").text
        return _text(re.search(r"<h1>(.*?)</h1>", body, re.S).group(1)), body

    save_dag_run_record(ui_settings, "essp_control", "manual__c1", control={
        "run": RUN, "command": "stop", "before": "running", "state": "stopped", "trainers": {"rgb": "stopped"},
        "message": f"run {RUN} is now stopped (it was running): its trainers checkpoint and stop"})
    title, body = page("essp_control", "manual__c1")
    assert title == f"stop sent to run {RUN}" and f"Run {RUN} is now stopped (it was running)" in body
    assert "<th>trainer rgb</th><td><code>stopped</code>" in body
    assert f'href="../../dag-runs/{DAG}/{quote(DAG_RUN, safe="")}"' in body  # that run, as its DAG run shows it

    save_dag_run_record(ui_settings, "essp_control", "manual__c2", error="run: there is no run 'ui-reprot-1'; "
                        "did you mean ui-report-1?", control={"run": "ui-reprot-1", "command": "stop"})
    title, body = page("essp_control", "manual__c2")
    assert title == "Refused" and "essp_control refused the command: run: there is no run" in body

    json_key = "predictions/ui-reg/t1/predictions.json"
    ObjectStore(ui_settings).put_json(ui_settings.bucket_runs, json_key, {"videos": [
        {"video": "s3://v/a.mp4", "top": [{"class": "biking", "score": 0.91}]},
        {"video": "s3://v/b.mp4", "error": "video b.mp4: 3 frames, fewer than the 6 of one stack"}]})
    save_dag_run_record(ui_settings, "essp_predict", "manual__p1", predictions={
        "prefix": "new/", "registry": "ui-reg", "version": 4, "fusion": "product", "videos": 2,
        "failed": ["s3://v/b.mp4"], "json": f"s3://{ui_settings.bucket_runs}/{json_key}", "csv": "s3://x/p.csv"})
    title, body = page("essp_predict", "manual__p1")
    assert title == "Predictions"
    assert "Scored 2 video(s) under new/ with ui-reg v4 (product fusion); 1 could not be read." in body
    assert "<td>biking</td><td class=\"num\">0.910</td>" in body and "fewer than the 6 of one stack" in body

    save_dag_run_record(ui_settings, "essp_nightly_retrain", "scheduled__n1",
                        skipped={"registry": "synth-demo", "reason": "no new video since the last retrain"})
    title, body = page("essp_nightly_retrain", "scheduled__n1")
    assert title == "Nothing to train tonight"
    assert "This nightly run skipped training: no new video since the last retrain." in body
    assert "has not started" not in body

    save_dag_run_record(ui_settings, DAG, "manual__e1", error="fusion_weights: must name each stream exactly once")
    title, body = page(DAG, "manual__e1")
    assert title == "Refused" and "The run was refused before it started: fusion_weights: must name" in body

    title, body = page("essp_predict", "manual__p2")  # its task has not run yet
    assert title == "Not done yet" and 'http-equiv="refresh"' in body
    title, body = page("essp_smoke", "manual__s1")
    assert title == "No ESSP run" and "essp_smoke trains no ESSP run" in body
