"""A real Airflow on PostgreSQL (`essp airflow up|down`: the four processes, started once, stopped by
PID from another process) with the ESSP plugin: the api-server loads it from the repo's plugins/
folder, lists it in the REST API, serves the report pages under /essp behind Airflow's own login (401
without a token, 403 with a forged one), and headless Chromium, signed in, renders
one (the screenshot is kept as documentation: docs/img/ui-report.png); essp_train triggered
through the REST API with a param override, run by the scheduler, its report tab screenshotted; and
the trigger forms of essp_train and essp_predict as a new user meets them in Chromium (driven over
CDP, tests/cdp.py): signed in on the real login page, Trigger works at the defaults, and an
out-of-range value is refused with its reason rather than changed.

The module-scoped ``airflow_ui`` and ``browser`` fixtures are tests/airflowkit.py's (the walk of
tests/test_ui_walk.py uses them too)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any
from urllib.parse import quote

import airflowkit
import numpy as np
import pytest
from airflowkit import FORM_TIMEOUT_S, SHOT_SIZE, AirflowUI, screenshot
from cdp import Browser
from PIL import Image
from reports import write_seeded_report

from essp.settings import Settings
from essp.stack.airflow import AirflowStack

pytestmark = pytest.mark.slow
airflow_ui, browser = airflowkit.airflow_ui, airflowkit.browser  # the module's fixtures

REPO = Path(__file__).resolve().parents[1]
SCREENSHOT = REPO / "docs" / "img" / "ui-report.png"
RUN = "ui-demo-run"


def _non_white(region: np.ndarray) -> float:
    return float((region.min(axis=2) < 235).mean())


def _colours(region: np.ndarray) -> int:
    return len(np.unique(region.reshape(-1, 3), axis=0))


def test_plugin_is_served_behind_airflows_login_and_the_report_renders(airflow_ui, browser):
    settings = airflow_ui.settings
    report = write_seeded_report(settings, RUN)

    plugins = airflow_ui.call("GET", "/api/v2/plugins")["plugins"]
    [essp] = [p for p in plugins if p["name"] == "essp"]
    views = {(v["destination"], v["name"]): v for v in essp["external_views"]}
    assert views["nav", "ESSP"]["href"] == "essp/"
    assert views["dag_run", "ESSP report"]["href"] == "essp/dag-runs/{DAG_ID}/{RUN_ID}"
    assert views["task_instance", "Worker logs"]["href"] == "essp/dag-runs/{DAG_ID}/{RUN_ID}/workers"
    assert [a["url_prefix"] for a in essp["fastapi_apps"]] == ["/essp"]
    assert any("WorkerLogsLink" in link for link in essp["operator_extra_links"])
    errors = airflow_ui.call("GET", "/api/v2/plugins/importErrors")["import_errors"]
    assert not [e for e in errors if "essp" in e["source"]], errors

    # Airflow's own login guards the pages: no token 401, a forged one 403; the REST API's token (or the UI's
    # cookie, below) gets them
    for path in ("/essp/", f"/essp/runs/{RUN}", f"/essp/runs/{RUN}/report.json", f"/essp/runs/{RUN}/files/loss.png"):
        status, _, raw = airflow_ui.request("GET", path, auth=False)
        assert status == 401 and RUN.encode() not in raw, (path, status, raw[:300])
    forged = urllib.request.Request(f"{airflow_ui.url}/essp/runs/{RUN}/report.json",
                                    headers={"Authorization": "Bearer " + airflow_ui.token()[:-4] + "AAAA"})
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(forged, timeout=30)
    assert refused.value.code == 403
    status, headers, raw = airflow_ui.request("GET", f"/essp/runs/{RUN}")
    assert status == 200 and headers["content-type"].startswith("text/html")
    page = raw.decode()
    assert f"<code>{RUN}</code>" in page and 'data-name="stream:rgb"' in page
    status, headers, png = airflow_ui.request("GET", f"/essp/runs/{RUN}/files/fusion.png")
    assert status == 200 and headers["content-type"] == "image/png"
    status, _, raw = airflow_ui.request("GET", "/essp/")
    assert status == 200 and f'href="./runs/{RUN}"' in raw.decode()
    assert json.loads(airflow_ui.request("GET", f"/essp/runs/{RUN}/report.json")[2]) == report

    # What a user sees: headless Chromium, signed in on Airflow's login page, on the api-server's page (kept
    # as documentation): the UI's session cookie is what its iframe sends
    screenshot(browser, f"{airflow_ui.url}/essp/runs/{RUN}", SCREENSHOT)
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


@pytest.mark.e2e
def test_essp_train_triggered_through_the_rest_api_with_a_fusion_override(airflow_ui, browser, tmp_path):
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
    status, _, raw = airflow_ui.request("GET", path)
    page = raw.decode()
    assert status == 200 and "rest-run" in page and "product" in page
    assert airflow_ui.request("GET", path + "/workers", auth=False)[0] == 401
    status, _, raw = airflow_ui.request("GET", path + "/workers")
    assert status == 200 and "trainer-rest-run-rgb" in raw.decode()
    screenshot(browser, airflow_ui.url + path, DAG_RUN_SCREENSHOT)
    with Image.open(DAG_RUN_SCREENSHOT) as image:
        pixels = np.asarray(image.convert("RGB"))
    assert _non_white(pixels[150:800]) > 0.03 and _colours(pixels[800:1700]) > 500


@pytest.mark.fault
@pytest.mark.long
def test_a_triggerer_restarted_during_a_pause_longer_than_the_epoch_timeout_does_not_time_out(airflow_ui, tmp_path):
    # issue 11, fault 9, on the real thing: the run is paused, its train tasks defer on its first epoch,
    # the triggerer is stopped for longer than the epoch timeout and started again; the rebuilt triggers
    # leave the paused time out of the timeout (the run's pause ledger in Redis), and after the resume
    # the run finishes.
    from essp.datasets.ingest import ingest_directory
    from essp.datasets.synth import synthesize
    from essp.stack.airflow import AirflowClient

    settings = airflow_ui.settings

    def control(command: str) -> None:  # as a user does it
        done = subprocess.run([str(Path(sys.executable).parent / "essp"), "control", command, "--run", "pause-run"],
                              env={**os.environ, **settings.as_env()}, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stdout + done.stderr

    synthesize(tmp_path / "videos", classes=3, videos_per_class=4, frames=24, height=48, width=48, keyint=6, seed=4)
    ingest_directory(settings, tmp_path / "videos", "pausing")
    timeout_s = 30
    conf = {**REST_CONF, "dataset": "pausing", "run": "pause-run", "registry": "pausing", "epochs": 2,
            "epoch_timeout_s": timeout_s}
    client = AirflowClient(settings)
    client.wait_for_dag("essp_train", timeout_s=120)
    run = client.trigger("essp_train", conf)
    run_id = run["dag_run_id"]
    control("pause")  # before its first epoch: a tiny epoch would be over before a later pause

    def states() -> dict[tuple[str, int], str]:
        return {(t["task_id"], t.get("map_index", -1)): t["state"] for t in client.tasks("essp_train", run_id)}

    deadline = time.monotonic() + 600
    while not any(task == "train" and state == "deferred" for (task, _), state in states().items()):
        assert time.monotonic() < deadline, f"no train task deferred: {states()}"
        assert client.run("essp_train", run_id)["state"] in ("queued", "running"), states()
        time.sleep(1)
    stack = AirflowStack(settings)
    assert stack.stop("triggerer")
    time.sleep(timeout_s + 10)  # no triggerer, and paused, for longer than the epoch timeout
    assert stack.up()["triggerer"] == "started"
    time.sleep(15)  # the restarted triggerer runs the rebuilt triggers, still paused
    during = states()
    assert client.run("essp_train", run_id)["state"] == "running", during
    assert not [k for k, v in during.items() if v in ("failed", "up_for_retry", "upstream_failed")], during
    control("resume")
    final = client.wait("essp_train", run_id, timeout_s=900, poll_s=2)
    assert final["state"] == "success", states()
    assert set(states().values()) == {"success"}, states()
    tries = {(t["task_id"], t.get("map_index", -1)): t["try_number"] for t in client.tasks("essp_train", run_id)
             if t["task_id"] == "train"}
    assert tries and set(tries.values()) == {1}, f"a train task was tried again (its epoch timed out?): {tries}"


# --- The trigger form, as a new user meets it: the React UI in headless Chromium (CDP) ---------------------
# A DAG's params must make a form that triggers at its defaults (an optional param is optional in its schema:
# default None, "null" among its types) and that refuses an out-of-range value with its reason, never changing
# it behind the user's back (the form's number input clamps to a schema's top-level minimum/maximum on blur).

REASON = re.compile(r"minimum|maximum|at least|at most|less than|greater than", re.I)
FORM_STATE_JS = """(() => {
  const submit = document.querySelector('[data-testid=trigger-dag-submit]');
  const dialog = submit && submit.closest('[role=dialog]');
  if (!dialog) return null;
  const sections = [...dialog.querySelectorAll('[data-scope=accordion][data-part=item-trigger]')];
  return {
    disabled: submit.disabled,
    red_sections: sections  // a section with an error shows an icon besides its open/close chevron
      .filter(s => [...s.querySelectorAll('svg')].some(i => !i.closest('[data-part=item-indicator]')))
      .map(s => s.innerText.trim()),
    field_errors: Object.fromEntries([...dialog.querySelectorAll('[data-scope=field][data-part=root]')]
      .map(row => [(row.querySelector('[name^=element_]') || {name: row.innerText.split('\\n')[0]}).name,
                   [...row.querySelectorAll('[data-part=error-text]')].map(e => e.innerText.trim()).join(' ')])
      .filter(([, error]) => error)),
    alerts: [...dialog.querySelectorAll('.chakra-alert__root, [data-scope=alert][data-part=root], [role=alert]')]
              .map(e => e.innerText.trim()).filter(Boolean),
  };
})()"""


def _field(name: str) -> str:
    return f"[role=dialog] [name=element_{name}]"


def _dag_params(ui: AirflowUI, dag_id: str) -> dict[str, dict[str, Any]]:
    """The DAG's params (value: the default, schema) as the api-server serves them to the form."""
    for _ in range(60):  # the dag-processor parses the DAG folder at start
        status, _, raw = ui.request("GET", f"/api/v2/dags/{dag_id}/details")
        if status == 200:
            return json.loads(raw)["params"]
        errors = [e for e in ui.call("GET", "/api/v2/importErrors")["import_errors"]
                  if Path(e["filename"]).name == f"{dag_id}.py"]
        assert not errors, f"{dag_id} does not import:\n{errors[0]['stack_trace'][-1500:]}"
        time.sleep(2)
    raise AssertionError(f"{dag_id} was not parsed: {status} {raw[:500]!r}")


def _run_ids(ui: AirflowUI, dag_id: str) -> set[str]:
    return {r["dag_run_id"] for r in ui.call("GET", f"/api/v2/dags/{dag_id}/dagRuns?limit=100")["dag_runs"]}


def _essp_processes(settings: Settings) -> set[str]:
    """ESSP processes (workers, trainers) running under the stack's state folder; Airflow's are not counted."""
    from essp.stack.procs import ProcessTable

    table = ProcessTable(settings.state_dir)
    names = [p.stem for p in table.run_dir.glob("*.pid")] if table.run_dir.exists() else []
    return {n for n in names if not n.startswith("airflow-") and table.record(n) is not None}


def _open_trigger_form(b: Browser, ui: AirflowUI, dag_id: str, params: dict[str, dict]) -> dict[str, Any]:
    """Open the DAG's trigger dialog ("Trigger" on its page) and wait for its params' fields; its state."""
    b.navigate(f"{ui.url}/dags/{dag_id}")
    b.click("[data-testid=trigger-dag-button]")
    b.wait_selector("[role=dialog] [data-testid=trigger-dag-submit]")
    first = next(n for n, p in params.items() if not isinstance(p["value"], dict | list))
    b.wait_for(f"document.querySelector({json.dumps(_field(first))})", what=f"the form's {first} field")
    time.sleep(0.5)  # the form marks its sections once its params are in
    return b.evaluate(FORM_STATE_JS)


def _submit(b: Browser, ui: AirflowUI, dag_id: str, before: set[str]) -> tuple[dict | None, dict[str, Any]]:
    """Click Trigger; the DAG run it created (None if none, e.g. the API refused) and the dialog's state."""
    b.click("[role=dialog] [data-testid=trigger-dag-submit]")
    deadline = time.monotonic() + FORM_TIMEOUT_S
    while time.monotonic() < deadline:
        new = _run_ids(ui, dag_id) - before
        state = b.evaluate(FORM_STATE_JS)
        if new:
            [run_id] = new
            return ui.call("GET", f"/api/v2/dags/{dag_id}/dagRuns/{quote(run_id, safe='')}"), state
        if state and state["alerts"]:
            return None, state
        time.sleep(0.3)
    return None, b.evaluate(FORM_STATE_JS)


def _stop(ui: AirflowUI, run: dict) -> None:
    """Mark the run failed (its tasks would fail later: the test's buckets have no dataset) and wait until it
    stays failed with no task running (a run the scheduler was starting meanwhile may come back: marked again)."""
    path = f"/api/v2/dags/{run['dag_id']}/dagRuns/{quote(run['dag_run_id'], safe='')}"
    deadline, settled = time.monotonic() + 60, 0
    while settled < 2:
        state = ui.call("GET", path)["state"]
        busy = [t["task_id"] for t in ui.call("GET", path + "/taskInstances")["task_instances"]
                if t["state"] in ("running", "queued", "scheduled", "deferred", "restarting", "up_for_retry")]
        settled = settled + 1 if state == "failed" and not busy else 0
        assert time.monotonic() < deadline, f"{run['dag_run_id']} still {state}, tasks {busy} busy"
        if state != "failed":
            ui.call("PATCH", path, {"state": "failed"})
        time.sleep(0.5)


def _check_triggers_at_defaults(b: Browser, ui: AirflowUI, dag_id: str) -> None:
    params = _dag_params(ui, dag_id)
    defaults = {name: param["value"] for name, param in params.items()}
    before, processes = _run_ids(ui, dag_id), _essp_processes(ui.settings)
    state = _open_trigger_form(b, ui, dag_id, params)
    assert not state["disabled"], (
        f"{dag_id}: the Trigger button is disabled at the defaults; sections marked red: {state['red_sections']}, "
        f"field errors: {state['field_errors'] or 'none'} (screenshot {b.screenshot()})")
    run, state = _submit(b, ui, dag_id, before)
    assert run is not None, f"{dag_id}: Trigger at the defaults created no DAG run; dialog: {state}"
    try:
        assert run["conf"] == defaults, (f"{dag_id}: the form submitted other values than the defaults: "
                                         f"{ {k: v for k, v in run['conf'].items() if defaults.get(k) != v} }")
    finally:
        _stop(ui, run)
    assert _essp_processes(ui.settings) <= processes, "the DAG run left ESSP processes behind"


def _check_out_of_range_refused(b: Browser, ui: AirflowUI, dag_id: str, name: str) -> None:
    """Type 0 into ``name`` (its minimum is 1) as a user would, move on, Trigger: refused, with the reason."""
    params = _dag_params(ui, dag_id)
    before = _run_ids(ui, dag_id)
    _open_trigger_form(b, ui, dag_id, params)
    section = params[name]["schema"].get("section")
    if section and not b.evaluate(f"document.querySelector({json.dumps(_field(name))}).getClientRects().length"):
        b.click("[role=dialog] [data-scope=accordion][data-part=item-trigger]", text=section)  # open its section
    b.type(_field(name), "0")
    b.key("Tab", keycode=9)  # leave the field
    time.sleep(0.3)
    shown = b.evaluate(f"document.querySelector({json.dumps(_field(name))}).value")
    run, state = (_submit(b, ui, dag_id, before) if not b.evaluate(FORM_STATE_JS)["disabled"]
                  else (None, b.evaluate(FORM_STATE_JS)))
    shot = b.screenshot()
    if run is not None:
        _stop(ui, run)
    assert run is None, (f"{dag_id}: {name} 0 typed into the form was submitted as {name} "
                         f"{run['conf'].get(name)!r} (DAG run {run['dag_run_id']} created; screenshot {shot})")
    assert shown == "0", (f"{dag_id}: the form changed {name} 0 into {shown!r} when the field was left, "
                          f"without a word (screenshot {shot})")
    banner = [a for a in state["alerts"] if name in a and REASON.search(a)]  # the API's 400, shown in the dialog
    inline = state["field_errors"].get(f"element_{name}")  # or the field's own error
    assert banner or inline, (f"{dag_id}: {name} 0 was refused without a visible reason; dialog: {state} "
                              f"(screenshot {shot})")
    assert _run_ids(ui, dag_id) == before


def test_trigger_form_of_essp_train_triggers_at_the_defaults(airflow_ui, browser):
    _check_triggers_at_defaults(browser, airflow_ui, "essp_train")


def test_trigger_form_of_essp_train_refuses_an_out_of_range_value_with_its_reason(airflow_ui, browser):
    _check_out_of_range_refused(browser, airflow_ui, "essp_train", "epochs")


def test_trigger_form_of_essp_predict_triggers_at_the_defaults(airflow_ui, browser):
    _check_triggers_at_defaults(browser, airflow_ui, "essp_predict")


def test_trigger_form_of_essp_predict_refuses_an_out_of_range_value_with_its_reason(airflow_ui, browser):
    _check_out_of_range_refused(browser, airflow_ui, "essp_predict", "top")
