"""The Airflow UI as an ML engineer meets it, walked in a real browser (headless Chromium over CDP, signed in
on Airflow's login page) against a real Airflow (`essp airflow up` on its own ports and database):

1. the DAG list says what each DAG does (on its name), and essp_train's graph has one edge per dependency;
2. essp_train is triggered from its form: a small run typed into the form's Configuration JSON, and the
   fusion strategy overridden in its own field;
3. the run's "ESSP report" tab shows it training: the phase in words, a curve point per finished epoch,
   samples/s and data wait per stream, while the run is still running;
4. the worker logs open from the running ``train`` task's page, inside the Airflow UI;
5. the finished report says what the registry did (v1, promoted), and links to its DAG run in the UI;
6. a second run is stopped from essp_control's form: essp_control's tab says what it did, the run's tab says
   it is stopped, and the run ends without training on;
7. a bad combination (``fusion: weighted`` with a weight for one stream of two) fails the run's first task
   with one line, no traceback: in the task's log, as the run's note and on its report tab.

Each step asserts what the page shows (its text), not a status code; each step's screenshot is written to
docs/img/ui-walk-*.png (docs/orchestration.md shows them). `make ui-test` runs this module (CI does)."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any
from urllib.parse import quote

import airflowkit
import pytest
from airflowkit import AirflowUI, screenshot
from cdp import Browser

from essp.stack.airflow import AirflowClient

pytestmark = [pytest.mark.ui, pytest.mark.slow]
airflow_ui, browser = airflowkit.airflow_ui, airflowkit.browser  # the module's fixtures

REPO = Path(__file__).resolve().parents[1]
IMG = REPO / "docs" / "img"
SHOT = (1400, 1000)
TINY = {"dataset": "walk", "rgb_arch": "tiny", "flow_arch": "tiny", "length": 4, "size": 32, "batch_size": 8,
        "lr": 0.05, "snippets": 2, "samples_per_epoch": 24, "replicas": {"decode": 1, "flow": 1, "rgb": 1},
        "registry": "walk"}
RUN_S = 900  # a run of the walk on 2 busy cores takes a few minutes
DIALOG = "[data-testid=trigger-dag-submit]"
TABS = {"ESSP report": "essp-report", "Worker logs": "essp-worker-logs"}  # plugins/essp_plugin.py's url_routes


def _shot(b: Browser, name: str) -> Path:
    return screenshot(b, None, IMG / f"ui-walk-{name}.png", SHOT)


def _run_path(dag_id: str, run_id: str) -> str:
    return f"/dags/{dag_id}/runs/{quote(run_id, safe='')}"


def _section(b: Browser, title: str) -> None:
    """Open a section of the trigger form (closed ones hide their fields)."""
    if not b.evaluate(f"[...document.querySelectorAll('[role=dialog] [data-scope=accordion][data-part=item-trigger]')]"
                      f".some(s => s.innerText.trim() === {json.dumps(title)} && s.getAttribute('aria-expanded')"
                      " === 'true')"):
        b.click("[role=dialog] [data-scope=accordion][data-part=item-trigger]", text=title)
        time.sleep(0.4)


def _choose(b: Browser, name: str, option: str) -> None:
    """Pick ``option`` in the form's select ``name`` as a user does: click it, type, Enter."""
    b.click(f"#element_{name} input[role=combobox]")
    b.send("Input.insertText", text=option)
    time.sleep(0.4)
    b.key("Enter", keycode=13)
    b.wait_for(f"document.querySelector('[name=element_{name}]').value === {json.dumps(option)}",
               what=f"{name} set to {option}")


def _trigger(b: Browser, ui: AirflowUI, dag_id: str, conf: dict[str, Any] | None,
             fields: dict[str, str] | None = None, selects: dict[str, str] | None = None,
             shot: str | None = None) -> dict[str, Any]:
    """Open the DAG's trigger form, type ``conf`` (merged into the defaults the form shows) into its
    Configuration JSON, set ``fields`` (text) and ``selects`` in their own fields, click Trigger; the DAG run."""
    params = ui.call("GET", f"/api/v2/dags/{dag_id}/details")["params"]
    before = {r["dag_run_id"] for r in ui.call("GET", f"/api/v2/dags/{dag_id}/dagRuns?limit=100")["dag_runs"]}
    b.navigate(f"{ui.url}/dags/{dag_id}")
    b.click("[data-testid=trigger-dag-button]")
    b.wait_selector(f"[role=dialog] {DIALOG}")
    time.sleep(0.5)
    if conf is not None:  # the whole conf: the form keeps a field only for the params the JSON has
        _section(b, "Advanced Options")
        b.click("[role=dialog] .monaco-editor .view-lines")
        b.key("a", code="KeyA", keycode=65, modifiers=2)
        b.key("Backspace", keycode=8)
        b.send("Input.insertText", text=json.dumps({**{k: p["value"] for k, p in params.items()}, **conf}))
        b.click("[role=dialog] label", text="Dag Run Note")  # leaving the editor updates the fields
        time.sleep(0.8)
    for name, value in {**(fields or {}), **(selects or {})}.items():
        _section(b, params[name]["schema"]["section"])
        if name in (selects or {}):
            _choose(b, name, value)
        else:
            b.type(f"[role=dialog] [name=element_{name}]", value)
    if shot:
        _shot(b, shot)
    b.click(f"[role=dialog] {DIALOG}")
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        new = {r["dag_run_id"] for r in ui.call("GET", f"/api/v2/dags/{dag_id}/dagRuns?limit=100")["dag_runs"]} - before
        if new:
            [run_id] = new
            return ui.call("GET", f"/api/v2/dags/{dag_id}/dagRuns/{quote(run_id, safe='')}")
        time.sleep(0.5)
    raise AssertionError(f"Trigger created no {dag_id} run; the page: {b.text()[-2000:]} (screenshot {b.screenshot()})")


def _tab(b: Browser, ui: AirflowUI, run: dict[str, Any], tab: str = "ESSP report") -> None:
    """The DAG run's page, on its tab ``tab`` (clicked, as a user does)."""
    b.navigate(ui.url + _run_path(run["dag_id"], run["dag_run_id"]))
    _click_tab(b, TABS[tab], tab)


def _click_tab(b: Browser, route: str, text: str) -> None:
    """Click the plugin tab ``route`` (its label ``text``) of the page, and wait for its page in the frame."""
    from cdp import BrowserTimeout

    for attempt in range(4):  # a click while the page still lays itself out can miss: click again
        time.sleep(0.5 * attempt)
        b.click(f"a[href$='/plugin/{route}']", text=text)
        try:
            b.wait_for(f"location.pathname.endsWith('/plugin/{route}')", what=f"the {text} tab", timeout_s=5)
            break
        except BrowserTimeout:
            if attempt == 3:
                raise
    b.wait_frame("doc.body.innerText.length > 0", what="the tab's page")


def _wait_while_running(b: Browser, client: AirflowClient, run: dict[str, Any], condition: str, what: str) -> None:
    """Until ``condition`` holds in the tab's frame; fails at once, with the tasks' states, if the DAG run ends."""
    from cdp import BrowserTimeout

    deadline = time.monotonic() + RUN_S
    while True:
        try:
            b.wait_frame(condition, what=what, timeout_s=10)
            return
        except BrowserTimeout:
            state = client.run(run["dag_id"], run["dag_run_id"])["state"]
            tasks = {(t["task_id"], t.get("map_index", -1)): t["state"]
                     for t in client.tasks(run["dag_id"], run["dag_run_id"])}
            assert state in ("queued", "running") and time.monotonic() < deadline, \
                f"{what}: not shown, and the DAG run is {state}: {tasks} (page: {b.frame_text()[:1500]})"


def _phase(b: Browser) -> str:
    return b.frame_evaluate("(doc && doc.querySelector('[data-phase]') || {}).innerText || ''")


def _curve_points(b: Browser) -> dict[str, int]:
    """Stream -> points of its loss curve, as the report tab draws it."""
    return b.frame_evaluate("""Object.fromEntries([...(doc ? doc.querySelectorAll(
        'svg[data-curve=loss] polyline:not([data-validation])') : [])]
        .map(p => [p.dataset.stream, p.getAttribute('points').trim().split(/\\s+/).length]))""") or {}


def _task_log(ui: AirflowUI, run: dict[str, Any], task_id: str) -> str:
    path = f"{_run_path(run['dag_id'], run['dag_run_id']).replace('/runs/', '/dagRuns/')}/taskInstances/{task_id}"
    found = ui.call("GET", f"/api/v2{path}/logs/1?full_content=true")
    return "\n".join(e if isinstance(e, str) else json.dumps(e) for e in found.get("content", []))


@pytest.mark.timeout(1800)  # the walk trains three runs one after the other
def test_an_ml_engineer_walks_the_ui_from_trigger_to_report(airflow_ui, browser, tmp_path):
    from essp.datasets.ingest import ingest_directory
    from essp.datasets.synth import synthesize

    ui, b = airflow_ui, browser
    settings = ui.settings
    synthesize(tmp_path / "videos", classes=3, videos_per_class=4, frames=24, height=48, width=48, keyint=6, seed=8)
    ingest_directory(settings, tmp_path / "videos", "walk")
    client = AirflowClient(settings)
    for dag_id in ("essp_train", "essp_control"):
        client.wait_for_dag(dag_id, timeout_s=180)

    # 1. the DAG list says what each DAG does (the description, on the DAG's name), and the nav bar has ESSP
    b.navigate(f"{ui.url}/dags")
    b.hover("a", text="essp_control")
    b.wait_text("Pause, resume or stop a running training run")
    b.hover("a", text="essp_train")
    b.wait_text("Train a two-stream video classifier on a dataset, through the resident workers.")
    assert b.evaluate("[...document.querySelectorAll('a')].some(a => a.innerText.trim() === 'ESSP' && "
                      "a.getAttribute('href').endsWith('/plugin/essp-reports'))")
    _shot(b, "1-dags")

    # 1b. essp_train's graph, as it opens: one edge per dependency between its steps (the task groups closed)
    b.navigate(f"{ui.url}/dags/essp_train")
    graph = "button[aria-label='panel.buttons.showGraphShortcut']"
    b.wait_for(f"document.querySelector({json.dumps(graph)})", what="the graph button")
    b.evaluate(f"document.querySelector({json.dumps(graph)}).click()")
    b.wait_for("document.querySelectorAll('.react-flow__node').length >= 6", what="the graph's nodes")
    time.sleep(1)
    edges = b.evaluate("[...document.querySelectorAll('.react-flow__edge')].map(e => e.getAttribute('data-testid'))")
    assert sorted(edges) == sorted(f"rf__edge-{a}-{z}" for a, z in (
        ("validate_params", "prepare"), ("prepare", "training"), ("training", "evaluation"),
        ("evaluation", "registry"), ("registry", "release_workers"), ("prepare", "release_workers"))), edges
    _shot(b, "1-graph")
    labels = b.evaluate("[...document.querySelectorAll('button[aria-label]')].map(e => e.getAttribute('aria-label'))")
    assert b.evaluate("(() => { const g = [...document.querySelectorAll('button[aria-label]')].find(e => "
                      "/grid/i.test(e.getAttribute('aria-label'))); if (g) g.click(); return !!g; })()"), labels
    b.wait_for("!document.querySelector('.react-flow__node')", what="the grid view again")  # as it was

    # 2. essp_train from its form: a small run in the Configuration JSON, the fusion in its own field
    run = _trigger(b, ui, "essp_train", {**TINY, "epochs": 3, "run": "walk-a"}, selects={"fusion": "max"},
                   shot="2-trigger")
    assert run["conf"]["fusion"] == "max" and run["conf"]["run"] == "walk-a" and run["conf"]["epochs"] == 3

    # 3. the report tab, while the run trains: the phase in words, a point per finished epoch, the figures
    _tab(b, ui, run)
    _wait_while_running(b, client, run, "doc.querySelector('svg[data-curve=loss] polyline')",
                        "a first epoch on the loss curve")
    phase = _phase(b)
    assert client.run("essp_train", run["dag_run_id"])["state"] == "running"
    assert phase.startswith(("Training epoch 2 of 3", "Training epoch 3 of 3", "Epoch")), phase
    points = _curve_points(b)
    assert points and all(1 <= n <= 3 for n in points.values()), points
    rows = b.frame_evaluate("[...doc.querySelectorAll('tr[data-figures]')].map(r => r.innerText)")
    assert any("/ 3" in r and "%" in r for r in rows), rows  # epochs done, accuracy and data wait per stream
    _shot(b, "3-live")

    # 4. the worker logs, from the running train task's page, inside the UI
    b.navigate(ui.url + _run_path("essp_train", run["dag_run_id"]) + "/tasks/train/mapped/0")
    _click_tab(b, "essp-task-worker-logs", "Worker logs")  # the tab, not the extra link
    b.wait_frame_text("trainer-walk-a-rgb")
    b.wait_frame_text("serving run walk-a stream rgb")
    train = [t for t in client.tasks("essp_train", run["dag_run_id"]) if t["task_id"] == "train"]
    assert b.url.endswith("/plugin/essp-task-worker-logs") and "Worker logs" in b.text()
    _shot(b, "4-worker-logs")
    assert any(t["state"] in ("running", "deferred", "queued", "scheduled") for t in train) or \
        client.run("essp_train", run["dag_run_id"])["state"] == "running", train

    # 5. the finished report: what the registry did, and the way back to the DAG run
    final = client.wait("essp_train", run["dag_run_id"], timeout_s=RUN_S, poll_s=2)
    assert final["state"] == "success", client.tasks("essp_train", run["dag_run_id"])
    _tab(b, ui, run)
    b.wait_frame_text("v1 of walk: promoted", timeout_s=30)
    text = b.frame_text()
    assert "selected fusion\nmax" in text and "Streams and fusion strategies" in text
    _shot(b, "5-report")
    b.navigate(f"{ui.url}/plugin/essp-reports")  # the reports list (the ESSP item of the nav bar)
    b.wait_frame_text("walk-a")
    assert "v1 of walk" in b.frame_text()
    b.click_in_frame("a[data-top]", text="essp_train")
    b.wait_for(f"location.pathname === {json.dumps(_run_path('essp_train', run['dag_run_id']))} || "
               f"decodeURIComponent(location.pathname) === {json.dumps(_run_path('essp_train', run['dag_run_id']))}",
               what="the DAG run's page in the Airflow UI")
    b.wait_text("Task Instances")

    # 6. a run stopped from essp_control's form
    long = _trigger(b, ui, "essp_train", {**TINY, "epochs": 40, "run": "walk-stop", "registry": "walk-stop"})
    _tab(b, ui, long)
    _wait_while_running(b, client, long, "doc.querySelector('svg[data-curve=loss] polyline')",
                        "walk-stop's first epoch")
    control = _trigger(b, ui, "essp_control", None, fields={"run": "walk-stop"}, selects={"command": "stop"},
                       shot="6-control-form")
    done = client.wait("essp_control", control["dag_run_id"], timeout_s=180, poll_s=1)
    assert done["state"] == "success", client.tasks("essp_control", control["dag_run_id"])
    _tab(b, ui, control)
    b.wait_frame_text("stop sent to run walk-stop")
    b.wait_frame_text("Run walk-stop is now stopped (it was running)")
    _shot(b, "6-stopped")
    ended = client.wait("essp_train", long["dag_run_id"], timeout_s=300, poll_s=2)
    assert ended["state"] == "failed"  # its train tasks end "stopped"; trigger it again to go on
    _tab(b, ui, long)
    b.wait_frame("doc.querySelector('[data-phase=stopped]')", what="walk-stop's phase: stopped")
    assert _phase(b).startswith("Stopped after ") and "of 40 epochs" in _phase(b)

    # 7. a bad combination: one line, no traceback, in the task's log, as the run's note, on its tab
    bad = _trigger(b, ui, "essp_train", {**TINY, "epochs": 1, "run": "walk-bad", "fusion": "weighted",
                                         "fusion_weights": {"rgb": 1}})
    failed = client.wait("essp_train", bad["dag_run_id"], timeout_s=180, poll_s=1)
    assert failed["state"] == "failed"
    line = "fusion_weights: must name each stream exactly once (unknown: none, missing: ['flow'])"
    log = _task_log(ui, bad, "validate_params")
    assert line in log and "Traceback" not in log, log[-3000:]
    b.navigate(ui.url + _run_path("essp_train", bad["dag_run_id"]))
    b.wait_text(line)  # the run's note, on its page
    _tab(b, ui, bad)
    b.wait_frame_text("The run was refused before it started")
    assert line in b.frame_text()
    _shot(b, "7-refused")
